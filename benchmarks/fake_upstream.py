"""The fake OpenAI upstream for the gateway overhead benchmark: a thin CLI over tests/fakes.py.

The fake itself (one for the tests and the benchmarks) lives in tests/fakes.py; this
runs it in the foreground of its own process, so that a benchmark can record its pid.
It answers at once by default, so that what the benchmark measures is the gateway's
own cost, not an engine's.

    python benchmarks/fake_upstream.py --port 9001 [--model fake] [--chunks 16]
        [--status 200] [--delay-ms 0] [--break-after N]

`--delay-ms` waits before a unary answer and between SSE chunks;
`--status 500` answers every inference request with that status;
`--break-after N` drops the connection after N SSE chunks (mid-stream failure).
tests/fakes.py's other options (--ttft-ms, --itl-ms, --held, ...) work here too.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fakes  # noqa: E402 - found through the path above


def main(argv: list[str] | None = None) -> None:
    parser = fakes.parser(__doc__.splitlines()[0])
    parser.set_defaults(chunks=16)
    args = parser.parse_args(argv)
    fake = fakes.from_args(args)
    fake.record = False  # a benchmark sends more requests than are worth keeping
    fakes.serve(fake, uvloop=True)


if __name__ == "__main__":
    main()
