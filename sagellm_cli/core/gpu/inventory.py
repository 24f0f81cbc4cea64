"""GPU inventory from NVML (nvidia-ml-py), or mock GPUs from `SAGELLM_MOCK_GPUS`.

`read_inventory()` never raises for a missing driver or library: it returns an
`Inventory` with `nvml=False` and a reason. Every per-GPU field is read on its own,
so a field the GPU does not support (power on some boards, NVLink on PCIe cards)
becomes None instead of hiding the GPU. pynvml is imported lazily.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.lifecycle import Status

MIB = 1024**2
GIB = 1024**3

ENV_DISABLE = "SAGELLM_DISABLE_NVML"
ENV_MOCK = "SAGELLM_MOCK_GPUS"
ENV_MOCK_NVLINK = "SAGELLM_MOCK_NVLINK"

# nvmlGpuTopologyLevel_t values, named like `nvidia-smi topo -m` does.
_TOPOLOGY_NAMES = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
# Lower is closer; NVLink is closest of all. Used to prefer tight GPU sets.
TOPOLOGY_RANK = {"X": 0, "NV": 1, "PIX": 2, "PXB": 3, "PHB": 4, "NODE": 5, "SYS": 6, "?": 7}


@dataclass
class GpuProcess:
    """A process holding memory on one GPU; `engine_id` is ours when we can attribute it."""

    pid: int
    used_mib: int | None
    name: str | None = None
    engine_id: str | None = None


@dataclass
class GpuInfo:
    """One GPU as NVML reports it (MiB like nvidia-smi; None where unsupported)."""

    index: int
    name: str
    uuid: str
    pci_bus_id: str | None
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    memory_driver_reserved_mib: int = 0
    utilization_gpu_pct: int | None = None
    utilization_memory_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    nvlink_active_links: int | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    mock: bool = False
    error: str | None = None

    @property
    def total_gib(self) -> float:
        return self.memory_total_mib / 1024

    @property
    def occupied_gib(self) -> float:
        """Everything not free: processes plus the driver's own reserve."""
        return max(self.memory_total_mib - self.memory_free_mib, 0) / 1024

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Inventory:
    """What `sage llm gpu` shows before reservations are added."""

    nvml: bool
    reason: str | None = None
    mock: bool = False
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    # topology[i][j]: "X" on the diagonal, "NV<links>" for NVLink, else PIX/PXB/PHB/NODE/SYS.
    topology: list[list[str]] = field(default_factory=list)
    nvlink_pairs: set[frozenset[int]] = field(default_factory=set)

    @property
    def available(self) -> bool:
        """True if there is at least one usable GPU (real or mock)."""
        return any(g.error is None for g in self.gpus)

    def gpu(self, index: int) -> GpuInfo | None:
        return next((g for g in self.gpus if g.index == index), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nvml": self.nvml,
            "reason": self.reason,
            "mock": self.mock,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "gpus": [g.to_dict() for g in self.gpus],
            "topology": self.topology,
            "nvlink_pairs": sorted(sorted(p) for p in self.nvlink_pairs),
        }


# --------------------------------------------------------------------------- mock GPUs


_MOCK_PART = re.compile(r"^\s*(?:(\d+)\s*[xX*]\s*)?(\d+(?:\.\d+)?)\s*(?:gib|gb|g)?\s*$", re.I)


def parse_mock_spec(text: str) -> list[float]:
    """`2x80` -> [80.0, 80.0]; `2x80,1x40` mixes sizes. Raises BadInput when malformed."""
    sizes: list[float] = []
    for part in text.split(","):
        if not part.strip():
            continue
        match = _MOCK_PART.match(part)
        if not match:
            raise BadInput(
                f"{ENV_MOCK}={text!r} is not COUNTxGiB",
                hint=f"write it like {ENV_MOCK}=2x80 (two 80 GiB mock GPUs)",
            )
        count = int(match.group(1) or 1)
        size = float(match.group(2))
        if count < 1 or count > 64 or size <= 0:
            raise BadInput(
                f"{ENV_MOCK}={text!r} asks for {count} GPUs of {size} GiB",
                hint="use 1 to 64 GPUs of more than 0 GiB",
            )
        sizes += [size] * count
    if not sizes:
        raise BadInput(f"{ENV_MOCK} is empty", hint=f"unset it or write e.g. {ENV_MOCK}=2x80")
    return sizes


def parse_mock_nvlink(text: str | None, count: int) -> set[frozenset[int]]:
    """`0,1;2,3` -> NVLink between 0-1 and between 2-3 (each group fully connected)."""
    pairs: set[frozenset[int]] = set()
    if not text:
        return pairs
    for group in text.split(";"):
        try:
            members = sorted({int(x) for x in group.split(",") if x.strip()})
        except ValueError:
            raise BadInput(
                f"{ENV_MOCK_NVLINK}={text!r} is malformed",
                hint="write groups of GPU indices like 0,1;2,3",
            ) from None
        if any(m < 0 or m >= count for m in members):
            raise BadInput(f"{ENV_MOCK_NVLINK}={text!r} names a GPU that the mock does not have")
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                pairs.add(frozenset((a, b)))
    return pairs


def mock_inventory(spec: str, nvlink: str | None = None) -> Inventory:
    """Fake GPUs for CPU machines: empty, labelled mock, optionally NVLinked."""
    sizes = parse_mock_spec(spec)
    gpus = []
    for i, size in enumerate(sizes):
        total = int(round(size * 1024))
        gpus.append(
            GpuInfo(
                index=i,
                name="Mock GPU",
                uuid=f"GPU-mock-{i:04d}",
                pci_bus_id=f"00000000:{i + 1:02X}:00.0",
                memory_total_mib=total,
                memory_used_mib=0,
                memory_free_mib=total,
                mock=True,
            )
        )
    pairs = parse_mock_nvlink(nvlink, len(gpus))
    topo = [
        [
            "X" if i == j else ("NV1" if frozenset((i, j)) in pairs else "SYS")
            for j in range(len(gpus))
        ]
        for i in range(len(gpus))
    ]
    return Inventory(
        nvml=False,
        reason="mock GPUs from " + ENV_MOCK,
        mock=True,
        driver_version="mock",
        cuda_version="mock",
        gpus=gpus,
        topology=topo,
        nvlink_pairs=pairs,
    )


# --------------------------------------------------------------------------- real NVML


def _nvml_failure_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "Library Not Found" in text:
        return "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver installed"
    if "Driver Not Loaded" in text:
        return "NVIDIA driver not loaded"
    if "Insufficient Permissions" in text or "No Permission" in text:
        return "no permission to query NVML"
    return f"NVML failed to initialise: {text}"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _safe(fn: Callable[..., Any], *args: Any, default: Any = None) -> Any:
    """One NVML field: any failure (Not Supported, missing symbol, ...) gives `default`."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - per-field tolerance is the point
        return default


def _process_name(pid: int, nvml: Any) -> str | None:
    with contextlib.suppress(Exception):
        import psutil

        return psutil.Process(pid).name()
    name = _safe(nvml.nvmlSystemGetProcessName, pid)
    return os.path.basename(_text(name)) if name else None


def _gpu_processes(nvml: Any, handle: Any, pid_map: dict[int, str]) -> list[GpuProcess]:
    found: dict[int, int | None] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        fn = getattr(nvml, getter, None)
        for proc in (_safe(fn, handle, default=[]) if fn else []) or []:
            used = getattr(proc, "usedGpuMemory", None)
            used_mib = int(used // MIB) if isinstance(used, int) else None
            # A process can be listed as both compute and graphics: keep the larger figure.
            prev = found.get(proc.pid)
            if prev is None or (used_mib is not None and used_mib > prev):
                found[proc.pid] = used_mib
    return [
        GpuProcess(
            pid=pid, used_mib=used, name=_process_name(pid, nvml), engine_id=pid_map.get(pid)
        )
        for pid, used in sorted(found.items())
    ]


def _memory(nvml: Any, handle: Any) -> tuple[int, int, int, int]:
    """(total, used, free, driver-reserved) in MiB; `used` excludes the driver's reserve
    when the driver reports it separately (as nvidia-smi shows it)."""
    v2 = getattr(nvml, "nvmlMemory_v2", None)
    if v2 is not None:
        mem = _safe(nvml.nvmlDeviceGetMemoryInfo, handle, v2)
        if mem is not None:
            return (mem.total // MIB, mem.used // MIB, mem.free // MIB, mem.reserved // MIB)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    return (mem.total // MIB, mem.used // MIB, mem.free // MIB, 0)


def _nvlink_links(nvml: Any, handle: Any) -> int | None:
    max_links = getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)
    active = 0
    for link in range(max_links):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link):
                active += 1
        except Exception:  # noqa: BLE001
            # Not Supported on the first link: no NVLink at all; later: no more links.
            if link == 0:
                return None
            break
    return active


def _read_gpu(nvml: Any, index: int, pid_map: dict[int, str]) -> tuple[GpuInfo, Any]:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        total, used, free, reserved = _memory(nvml, handle)
    except Exception as exc:  # noqa: BLE001 - a lost GPU must not hide the others
        return (
            GpuInfo(
                index=index,
                name="unavailable",
                uuid="",
                pci_bus_id=None,
                memory_total_mib=0,
                memory_used_mib=0,
                memory_free_mib=0,
                error=str(exc) or type(exc).__name__,
            ),
            None,
        )
    pci = _safe(nvml.nvmlDeviceGetPciInfo, handle)
    util = _safe(nvml.nvmlDeviceGetUtilizationRates, handle)
    power_mw = _safe(nvml.nvmlDeviceGetPowerUsage, handle)
    limit_mw = _safe(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    temp = _safe(nvml.nvmlDeviceGetTemperature, handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
    info = GpuInfo(
        index=index,
        name=_text(_safe(nvml.nvmlDeviceGetName, handle, default="unknown")),
        uuid=_text(_safe(nvml.nvmlDeviceGetUUID, handle, default="")),
        pci_bus_id=_text(pci.busId) if pci is not None else None,
        memory_total_mib=int(total),
        memory_used_mib=int(used),
        memory_free_mib=int(free),
        memory_driver_reserved_mib=int(reserved),
        utilization_gpu_pct=int(util.gpu) if util is not None else None,
        utilization_memory_pct=int(util.memory) if util is not None else None,
        temperature_c=int(temp) if temp is not None else None,
        power_w=round(power_mw / 1000, 1) if power_mw is not None else None,
        power_limit_w=round(limit_mw / 1000, 1) if limit_mw is not None else None,
        nvlink_active_links=_nvlink_links(nvml, handle),
        processes=_gpu_processes(nvml, handle, pid_map),
    )
    return info, handle


def _nvlinked(nvml: Any, a: Any, b: Any) -> bool:
    """P2P over NVLink between two GPUs (covers NVSwitch systems too)."""
    index = getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", 2)
    ok = getattr(nvml, "NVML_P2P_STATUS_OK", 0)
    status = _safe(nvml.nvmlDeviceGetP2PStatus, a, b, index)
    return status == ok


def _topology(nvml: Any, gpus: list[GpuInfo], handles: list[Any]):
    n = len(gpus)
    topo = [["?"] * n for _ in range(n)]
    pairs: set[frozenset[int]] = set()
    for i in range(n):
        topo[i][i] = "X"
        for j in range(i + 1, n):
            a, b = handles[i], handles[j]
            if a is None or b is None:
                continue
            if _nvlinked(nvml, a, b):
                pairs.add(frozenset((gpus[i].index, gpus[j].index)))
                links = min(gpus[i].nvlink_active_links or 0, gpus[j].nvlink_active_links or 0)
                name = f"NV{links}" if links else "NV"
            else:
                level = _safe(nvml.nvmlDeviceGetTopologyCommonAncestor, a, b)
                name = _TOPOLOGY_NAMES.get(level, "?") if level is not None else "?"
            topo[i][j] = topo[j][i] = name
    return topo, pairs


def _cuda_version(nvml: Any) -> str | None:
    for getter in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
        fn = getattr(nvml, getter, None)
        value = _safe(fn) if fn else None
        if value:
            return f"{value // 1000}.{value % 1000 // 10}"
    return None


def nvml_inventory(pid_map: dict[int, str] | None = None) -> Inventory:
    """Read real GPUs through NVML; any failure to start NVML becomes a reason."""
    pid_map = pid_map or {}
    try:
        import pynvml as nvml
    except Exception:  # noqa: BLE001 - ImportError or a broken install
        return Inventory(nvml=False, reason="nvidia-ml-py (pynvml) is not installed")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001
        return Inventory(nvml=False, reason=_nvml_failure_reason(exc))
    try:
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:  # noqa: BLE001
            return Inventory(nvml=False, reason=f"NVML could not count GPUs: {exc}")
        gpus: list[GpuInfo] = []
        handles: list[Any] = []
        for index in range(count):
            info, handle = _read_gpu(nvml, index, pid_map)
            gpus.append(info)
            handles.append(handle)
        topo, pairs = _topology(nvml, gpus, handles)
        driver = _safe(nvml.nvmlSystemGetDriverVersion)
        return Inventory(
            nvml=True,
            reason=None if gpus else "NVML found no GPUs",
            driver_version=_text(driver) if driver else None,
            cuda_version=_cuda_version(nvml),
            gpus=gpus,
            topology=topo,
            nvlink_pairs=pairs,
        )
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def read_inventory(pid_map: dict[int, str] | None = None) -> Inventory:
    """Mock GPUs if `SAGELLM_MOCK_GPUS` is set, else NVML unless disabled.

    `pid_map` (pid -> engine id, see `engine_pid_map`) labels GPU processes.
    Raises BadInput only for a malformed `SAGELLM_MOCK_GPUS`.
    """
    mock = os.environ.get(ENV_MOCK, "").strip()
    if mock:
        return mock_inventory(mock, os.environ.get(ENV_MOCK_NVLINK))
    if os.environ.get(ENV_DISABLE, "").strip() not in ("", "0", "false", "no"):
        return Inventory(nvml=False, reason=f"NVML disabled by {ENV_DISABLE}=1")
    return nvml_inventory(pid_map)


# --------------------------------------------------------------------------- attribution


def engine_pid_map(state: Any) -> dict[int, str]:
    """pid -> engine id for every process of every live engine (group and descendants).

    This is what lets NVML's per-process usage be attributed to our engines, so a
    running engine is not counted once as NVML-used and again as reserved. One pass
    over the process table serves all engines.
    """
    import psutil

    live = [
        r
        for r in state.engines.values()
        if r.is_live and r.status != Status.IDLE and (r.pid or r.pgid)
    ]
    if not live:
        return {}
    by_pgid = {r.pgid: r for r in live if r.pgid}
    mapping: dict[int, str] = {}
    children: dict[int, list[int]] = {}
    created_at: dict[int, float] = {}
    for proc in psutil.process_iter(["pid", "ppid", "create_time"]):
        pid = proc.info["pid"]
        children.setdefault(proc.info["ppid"] or 0, []).append(pid)
        created_at[pid] = proc.info["create_time"] or 0.0
        try:
            pgid = os.getpgid(pid)
        except OSError:
            continue
        record = by_pgid.get(pgid)
        if record is None:
            continue
        # Guard against a recycled pgid: our engine's processes are never older than it.
        not_before = record.pid_create_time or record.started_at or record.created_at
        created = proc.info["create_time"] or 0.0
        if not_before and created < not_before - 1.0:
            continue
        mapping[pid] = record.id
    # Descendants that left the group (setsid children) still belong to the engine.
    for record in live:
        roots = [p for p, e in mapping.items() if e == record.id]
        if record.pid in created_at and (
            record.pid_create_time is None
            or abs(created_at[record.pid] - record.pid_create_time) < 1.0
        ):
            roots.append(record.pid)
        stack = list(dict.fromkeys(roots))
        while stack:
            pid = stack.pop()
            if mapping.setdefault(pid, record.id) != record.id:
                continue
            stack.extend(c for c in children.get(pid, []) if c not in mapping)
    return mapping
