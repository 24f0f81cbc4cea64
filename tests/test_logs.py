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
