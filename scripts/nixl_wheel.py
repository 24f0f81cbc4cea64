"""NIXL wheels for the GPU machine (which has no registry), small enough to carry.

`nixl-cu13` is ~59 MB, over what one device call carries next to the tree; 28 MB of it is
`nixl_ep_cu13/` (NIXL's expert-parallel kernels, which vLLM's NixlConnector never imports).
This downloads `nixl-cu13` and the `nixl` meta package (whose `nixl` module picks
`nixl_cu13`) for the GPU machine's Python, drops `nixl_ep_cu13/` from the wheel (and from its
RECORD), and leaves both in DEST (default .whl/, which `gpu_device_run.sh install` installs
into /tmp/site):

    python3 scripts/nixl_wheel.py [DEST] [--python-version 3.12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DROP = "nixl_ep_cu13/"


def slim(src: Path, dest: Path) -> Path:
    """A copy of the wheel `src` in `dest` without DROP (RECORD rewritten to match)."""
    out = dest / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename.startswith(DROP):
                continue
            data = zin.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(x for x in lines if not x.startswith(DROP)).encode()
            zout.writestr(item, data)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", nargs="?", type=Path, default=Path(".whl"))
    p.add_argument("--python-version", default="3.12", help="the GPU machine's (3.12)")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", args.python_version, "--platform", "manylinux_2_28_x86_64",
             "-d", tmp, "nixl-cu13", "nixl"],
            check=True,
        )  # fmt: skip
        for wheel in sorted(Path(tmp).glob("*.whl")):
            if wheel.name.startswith("nixl_cu13-"):
                out = slim(wheel, args.dest)
            else:
                out = args.dest / wheel.name
                out.write_bytes(wheel.read_bytes())
            print(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
