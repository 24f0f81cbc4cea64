"""The progress line: vLLM's phase and its last message, read from an engine's log."""

from __future__ import annotations

from sagellm_cli.core.engines import logs

LOG = """\
[sagellm] 2026-11-30 00:07:38 starting engine e1: python -m vllm.entrypoints.openai.api_server
(APIServer pid=1) WARNING 11-30 00:07:40 [vllm.py:1703] Enforce eager set, disabling torch.compile
(EngineCore pid=2) INFO 11-30 00:07:48 [cpu_model_runner.py:68] Starting to load model tiny...
(EngineCore pid=2) INFO 11-30 00:07:49 [base_loader.py:82] Initializing model took 0.57 seconds
"""


def test_phase_follows_vllms_log(tmp_path):
    path = tmp_path / "e.log"
    path.write_text(LOG)
    assert logs.loading_view(path)[0] == "loading weights"  # "disabling torch.compile" is no phase
    with path.open("a") as fh:
        fh.write("(EngineCore pid=2) INFO 11-30 00:07:50 [gpu_worker.py:1] Memory profiling "
                 "takes 3.2 seconds\n")  # fmt: skip
    assert logs.loading_view(path)[0] == "profiling"
    with path.open("a") as fh:
        fh.write("(EngineCore pid=2) INFO 11-30 00:07:55 [backends.py:1] Compiling a graph for "
                 "compile range (1, 8192)\n")  # fmt: skip
        fh.write("(EngineCore pid=2) INFO 11-30 00:08:20 [gpu_model_runner.py:1] Capturing "
                 "CUDA graphs (mixed prefill-decode, PIECEWISE): 100%\n")  # fmt: skip
    assert logs.loading_view(path)[0] == "capturing CUDA graphs"
    assert logs.loading_view(tmp_path / "missing.log")[0] is None


def test_last_line_drops_the_prefix_and_cuts_on_the_right(tmp_path):
    path = tmp_path / "e.log"
    path.write_text(LOG + "(APIServer pid=1) INFO 11-30 00:09:00 [api_server.py:1] " + "x" * 300)
    line = logs.loading_view(path, width=50)[1]
    assert line.startswith("xxx") and len(line) == 50 and line.endswith("…")
    path.write_text(LOG)
    assert logs.loading_view(path)[1] == "Initializing model took 0.57 seconds"


def test_failure_cause_is_the_root_exception_in_one_line():
    """What `engine start` says when an engine dies loading: the exception, not the
    traceback; past a wrapper's "see root cause above"; pydantic's detail line joined."""
    engine_core = [
        "(EngineCore_DP0 pid=7) ERROR 12-04 22:38:20 [core.py:700] EngineCore failed to start.",
        "Traceback (most recent call last):",
        '  File "/x/vllm/v1/engine/core.py", line 691, in run_engine_core',
        "    raise ValueError(msg)",
        "ValueError: No available memory for the cache blocks. Try increasing "
        "`gpu_memory_utilization` when initializing the engine.",
        "Traceback (most recent call last):",
        '  File "/x/vllm/entrypoints/openai/api_server.py", line 1, in <module>',
        "\x1b[1;31mRuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}\x1b[0m",
        "[sagellm] engine process exited with code 1",
    ]
    assert logs.failure_cause(engine_core) == (
        "ValueError: No available memory for the cache blocks. Try increasing "
        "`gpu_memory_utilization` when initializing the engine."
    )
    pydantic = [
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "  Value error, Invalid repository ID or local directory specified: '/tmp/x'.",
        "Please verify the following requirements:",
    ]
    assert logs.failure_cause(pydantic) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: "
        "Value error, Invalid repository ID or local directory specified: '/tmp/x'."
    )
    assert logs.failure_cause(["INFO loading weights", "[sagellm] exited with code -9"]) is None
    assert len(logs.failure_cause(["OSError: " + "x" * 500], width=80)) == 80


def test_crash_note_quotes_the_exception_or_else_the_last_lines(tmp_path):
    """A failed record's `error`: the exception that ended the engine; after a kill, which
    leaves none, its last lines."""
    crashed = tmp_path / "crashed.log"
    crashed.write_text(
        'INFO starting\nTraceback (most recent call last):\n  File "x.py", line 1\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
        "[sagellm] engine process exited with code 1\n"
    )
    assert logs.crash_note(crashed, 3) == (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    killed = tmp_path / "killed.log"
    killed.write_text("INFO loading\n\nINFO serving\n")
    assert logs.crash_note(killed, 3) == "last log lines: INFO loading | INFO serving"
