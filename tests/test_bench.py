"""`sage llm bench`: its numbers against an upstream whose latency we set.

The upstream is the shared FAKE OpenAI server (tests/fakes.py, in-process on
127.0.0.1, in its own thread and event loop). It exists only to isolate the bench's
own code: it waits a known TTFT, then streams a known number of chunks at a known
interval and reports usage, so every measured number has a known right answer.
Timing assertions use generous ranges (a shared 2-core machine is noisy);
counts, classes and SLO verdicts are asserted exactly.
"""

from __future__ import annotations

import json
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import pytest
from conftest import invoke as sage_cli
from fakes import FakeUpstream

from sagellm_cli.bench.compare import compare, labels_for
from sagellm_cli.bench.load import BenchRunner, LoadConfig, arrival_offsets, base_url
from sagellm_cli.bench.metrics import RequestRecord, percentile, summarize
from sagellm_cli.bench.workload import (
    LengthSpec,
    TokenCounter,
    Workload,
    WorkloadConfig,
    load_dataset,
    parse_mix,
    parse_slo,
)
from sagellm_cli.core.errors import BadInput

TTFT = 0.050  # seconds the fake waits before its first chunk
ITL = 0.010  # seconds between its chunks


# ---------------------------------------------------------------- the fake upstream


@pytest.fixture
def fake():
    """The shared fake (tests/fakes.py), in a thread, answering as the bench expects of vLLM."""
    with FakeUpstream(
        model="fake-model",
        ttft=TTFT,
        itl=ITL,
        role_delta=True,  # vLLM opens a chat stream with a role-only delta: not a token
        error_message="fake says {status}",
    ) as server:
        yield server


def bench(fake: FakeUpstream, workload: WorkloadConfig | None = None, **load):
    load.setdefault("model", "fake-model")
    cfg = LoadConfig(url=fake.url, **load)
    return BenchRunner(
        cfg, Workload(workload or WorkloadConfig(input_len=LengthSpec("fixed", 16)))
    ).run()


def ms(summary_group: dict, metric: str, stat: str = "p50") -> float:
    return summary_group[f"{metric}_ms"][stat]


# ---------------------------------------------------------------- numbers against the fake


def test_closed_loop_numbers_match_the_upstream(fake):
    k = 8
    result = bench(
        fake, WorkloadConfig(output_len=LengthSpec("fixed", k)), concurrency=4, num_requests=12
    )
    s = result.summary["all"]
    assert (s["requests"], s["ok"], s["errors"]) == (12, 12, 0)
    assert len(fake.seen) == 12
    for rec in result.records:
        assert rec.output_tokens == k and rec.token_source == "usage"
        assert len(rec.itl_s) == k - 1
        assert rec.input_tokens == 7  # the server's usage.prompt_tokens wins over our count
    assert s["total_output_tokens"] == 12 * k
    # The fake's TTFT is 50 ms and ITL 10 ms; E2E = 50 + 7 * 10 = 120 ms.
    assert 45 <= ms(s, "ttft") <= 150
    assert 8 <= ms(s, "itl") <= 30
    assert 8 <= ms(s, "tpot") <= 30
    assert 115 <= ms(s, "e2e") <= 300
    assert ms(s, "ttft") <= ms(s, "ttft", "p90") <= ms(s, "ttft", "p99")
    # 4 in flight, each >= 120 ms: at most 4 / 0.12 = 33 req/s.
    assert 8 <= s["request_throughput"] <= 34
    assert s["output_throughput"] == pytest.approx(s["request_throughput"] * k)
    assert s["goodput"] is None  # no SLO given
    body = fake.seen[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == k and body["ignore_eos"] is True
    assert body["messages"][0]["role"] == "user"
    assert "x-priority" not in {k.lower() for k in fake.seen[0]["headers"]}


def test_tokens_counted_from_chunks_without_usage(fake):
    fake.usage = False
    result = bench(
        fake,
        WorkloadConfig(output_len=LengthSpec("fixed", 5)),
        num_requests=3,
        endpoint="completions",
    )
    assert [r.output_tokens for r in result.records] == [5, 5, 5]
    assert {r.token_source for r in result.records} == {"chunks"}
    assert "prompt" in fake.seen[0]["body"]


def test_no_stream_and_embeddings(fake):
    result = bench(
        fake, WorkloadConfig(output_len=LengthSpec("fixed", 4)), num_requests=2, stream=False
    )
    for rec in result.records:
        assert rec.ok and rec.ttft_s is None and rec.output_tokens == 4
        assert rec.e2e_s >= TTFT
    assert "stream" not in fake.seen[0]["body"]
    result = bench(fake, num_requests=2, endpoint="embeddings")
    s = result.summary["all"]
    assert s["ok"] == 2 and s["total_output_tokens"] == 0 and s["total_input_tokens"] == 22
    assert s["ttft_ms"]["count"] == 0 and 45 <= ms(s, "e2e") <= 200
    assert set(fake.seen[-1]["body"]) == {"model", "input"}


def test_goodput_and_per_class_split(fake):
    # critical answers in 10 ms, normal in 150 ms; the TTFT SLO is 80 ms.
    fake.ttft_by_class = {"critical": 0.010, "normal": 0.150}
    wl = WorkloadConfig(
        input_len=LengthSpec("fixed", 8),
        output_len=LengthSpec("fixed", 2),
        mix=parse_mix("critical:0.3,normal:0.7"),
        slo_ttft_ms=parse_slo("80", "--slo-ttft-ms"),
        slo_e2e_ms=parse_slo("critical:1000,normal:2000", "--slo-e2e-ms"),
        seed=7,
    )
    result = bench(fake, wl, concurrency=8, num_requests=20)
    classes = result.summary["classes"]
    n_crit = sum(1 for r in result.records if r.cls == "critical")
    assert 0 < n_crit < 20
    assert set(classes) == {"critical", "normal"}
    assert classes["critical"]["requests"] == n_crit
    assert classes["normal"]["requests"] == 20 - n_crit
    assert classes["critical"]["slo_attainment"] == 1.0
    assert classes["normal"]["slo_attainment"] == 0.0
    assert result.summary["all"]["slo_met"] == n_crit
    assert classes["critical"]["ttft_ms"]["p99"] < 80 < classes["normal"]["ttft_ms"]["p50"]
    # Each request carried its class and its E2E deadline.
    # HTTP header names are case-insensitive.
    heads = [{k.lower(): v for k, v in s["headers"].items()} for s in fake.seen]
    sent = sorted((h["x-priority"], h["x-slo-deadline-ms"]) for h in heads)
    assert sent.count(("critical", "1000")) == n_crit
    assert sent.count(("normal", "2000")) == 20 - n_crit
    assert all("priority" not in s["body"] for s in fake.seen)  # body field is opt-in
    # The same seed gives the same classes.
    again = bench(fake, wl, concurrency=8, num_requests=20)
    assert [r.cls for r in sorted(again.records, key=lambda r: r.index)] == [
        r.cls for r in sorted(result.records, key=lambda r: r.index)
    ]


def test_errors_are_counted_not_raised(fake):
    fake.status_by_model = {"busy": 429}
    result = bench(fake, num_requests=4, model="busy", concurrency=2)
    s = result.summary["all"]
    assert (s["ok"], s["errors"]) == (0, 4)
    assert s["error_kinds"] == {"HTTP 429: fake says 429": 4}
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = LoadConfig(url=f"http://127.0.0.1:{port}", model="m", num_requests=2)
    result = BenchRunner(cfg, Workload(WorkloadConfig())).run()
    assert result.summary["all"]["errors"] == 2
    assert all("can't connect" in r.error for r in result.records)


def test_warmup_is_left_out(fake):
    result = bench(
        fake,
        WorkloadConfig(output_len=LengthSpec("fixed", 2)),
        num_requests=5,
        warmup=3,
        concurrency=2,
    )
    assert len(result.records) == 8 and sum(r.warmup for r in result.records) == 3
    assert result.summary["all"]["requests"] == 5


def test_duration_mode_stops_sending(fake):
    t = time.monotonic()
    result = bench(
        fake, WorkloadConfig(output_len=LengthSpec("fixed", 2)), duration_s=0.5, concurrency=2
    )
    elapsed = time.monotonic() - t
    n = result.summary["all"]["requests"]
    # Each request takes >= 60 ms: 2 workers for 0.5 s send at most ~18.
    assert 2 <= n <= 18 and result.summary["all"]["ok"] == n
    assert elapsed < 3


def test_open_loop_follows_the_arrival_schedule(fake):
    fake.ttft = 0.005
    result = bench(
        fake,
        WorkloadConfig(output_len=LengthSpec("fixed", 1)),
        request_rate=40,
        num_requests=15,
        seed=3,
    )
    assert result.summary["all"]["ok"] == 15
    starts = [r.start_s for r in sorted(result.records, key=lambda r: r.index)]
    offsets = arrival_offsets(15, 40, 1.0, 3)
    for start, due in zip(starts, offsets, strict=True):
        assert start >= due - 0.002  # never early
        assert start <= due + 0.25  # and not badly late
    assert result.config["mode"] == "open"


# ---------------------------------------------------------------- the Poisson generator alone


def test_poisson_arrivals_rate_and_shape():
    offsets = arrival_offsets(20000, rate=5.0, burstiness=1.0, seed=1)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.2, rel=0.03)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    regular = arrival_offsets(20000, rate=5.0, burstiness=4.0, seed=1)
    rgaps = [b - a for a, b in zip(regular, regular[1:], strict=False)]
    assert statistics.fmean(rgaps) == pytest.approx(0.2, rel=0.03)  # same rate
    assert statistics.pstdev(rgaps) / statistics.fmean(rgaps) == pytest.approx(0.5, rel=0.05)
    assert offsets[0] == 0.0
    assert arrival_offsets(50, 5.0, 1.0, 1) == offsets[:50]  # deterministic with the seed
    assert arrival_offsets(50, 5.0, 1.0, 2) != offsets[:50]
    assert arrival_offsets(5, float("inf"), 1.0, 1) == [0.0] * 5


# ---------------------------------------------------------------- workload and parsing


def test_length_specs():
    rng = random.Random(0)
    assert LengthSpec.parse("128", "--x").sample(rng) == 128
    u = LengthSpec.parse("uniform:64-256", "--x")
    draws = [u.sample(rng) for _ in range(2000)]
    assert min(draws) >= 64 and max(draws) <= 256 and abs(statistics.fmean(draws) - 160) < 6
    n = LengthSpec.parse("normal:128,32", "--x")
    draws = [n.sample(rng) for _ in range(2000)]
    assert abs(statistics.fmean(draws) - 128) < 4 and min(draws) >= 1
    assert n.describe() == "normal:128,32"
    for bad in ("0", "abc", "uniform:5-1", "normal:1", "zipf:3"):
        with pytest.raises(BadInput, match="is not a length"):
            LengthSpec.parse(bad, "--input-len")


def test_mix_and_slo_parsing():
    assert parse_mix("critical:1,normal:3") == [("critical", 0.25), ("normal", 0.75)]
    for bad in ("vip:1", "critical", "critical:x", "critical:0", "critical:1,critical:2"):
        with pytest.raises(BadInput):
            parse_mix(bad)
    assert parse_slo("500", "--slo") == {"*": 500.0}
    assert parse_slo("critical:200,low:5000", "--slo") == {"critical": 200.0, "low": 5000.0}
    with pytest.raises(BadInput):
        parse_slo("vip:3", "--slo")


def _word_tokenizer(dest: Path) -> Path:
    """A small BPE tokenizer trained on the bench's own word list (no download)."""
    pytest.importorskip("tokenizers", reason="tokenizers is not installed (the cpu extra)")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from sagellm_cli.bench import workload

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(workload._WORDS)] * 3, trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    return dest


def test_prompts_have_the_asked_token_counts_and_prefix(tmp_path):
    model_dir = _word_tokenizer(tmp_path / "model")
    counter = TokenCounter.for_model(str(model_dir))
    assert counter.kind.startswith("tokenizer:")
    wl = Workload(
        WorkloadConfig(input_len=LengthSpec("fixed", 50), shared_prefix_len=30, seed=5), counter
    )
    a, b = wl.request(0), wl.request(1)
    prefix = wl.prefix
    assert counter.count(prefix) == 30
    assert a.prompt.startswith(prefix) and b.prompt.startswith(prefix)
    assert a.prompt[len(prefix) :] != b.prompt[len(prefix) :]
    for req in (a, b):
        # prefix + "N: " + 50 tokens; token boundaries may merge or split by a few
        assert 80 <= req.input_tokens <= 90, req.input_tokens
    assert wl.request(0).prompt == a.prompt  # deterministic
    # Without a tokenizer: ~4 characters per token.
    est = Workload(
        WorkloadConfig(input_len=LengthSpec("fixed", 100)), TokenCounter.for_model("gpt-x")
    )
    req = est.request(0)
    assert est.counter.kind == "estimate:4chars"
    assert 95 <= req.input_tokens <= 105


def test_dataset(tmp_path, fake):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "hello there", "priority": "critical", "max_tokens": 3})
        + "\n\n"
        + json.dumps(
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
        )
        + "\n"
    )
    entries = load_dataset(path)
    wl = WorkloadConfig(dataset=entries, output_len=LengthSpec("fixed", 6))
    result = bench(fake, wl, num_requests=4)
    assert result.summary["all"]["ok"] == 4
    bodies = [s["body"] for s in fake.seen]
    first = [b for b in bodies if b["messages"] == [{"role": "user", "content": "hello there"}]]
    second = [b for b in bodies if b["messages"][0]["role"] == "system"]
    assert len(first) == 2 and len(second) == 2  # the file is cycled
    assert {b["max_tokens"] for b in first} == {3} and {b["max_tokens"] for b in second} == {6}
    assert sorted(r.cls for r in result.records) == ["critical", "critical", "default", "default"]
    bad = tmp_path / "bad.jsonl"
    for line, needle in (
        ("not json", "is not JSON"),
        ('{"prompt": 1}', "exactly one of"),
        ('{"prompt": "x", "priority": "vip"}', "is not one of"),
        ('{"prompt": "x", "max_tokens": 0}', "positive integer"),
    ):
        bad.write_text(line + "\n")
        with pytest.raises(BadInput, match=needle):
            load_dataset(bad)


def test_metric_helpers():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    rec = RequestRecord(0, "x", 0.0, ok=True, ttft_s=0.1, e2e_s=0.5, output_tokens=5)
    assert rec.tpot_s == pytest.approx(0.1)
    assert rec.met_slo is None
    rec.slo_e2e_ms = 400
    assert rec.met_slo is False
    rec.slo_e2e_ms = 600
    assert rec.met_slo is True
    failed = RequestRecord(1, "x", 0.1, ok=False, e2e_s=0.01, slo_e2e_ms=600)
    s = summarize([rec, failed], duration_s=1.0)["all"]
    assert s["slo_met"] == 1 and s["slo_attainment"] == 0.5 and s["goodput"] == 1.0
    assert (
        base_url("http://h:1/") == "http://h:1/v1" and base_url("http://h:1/v1/") == "http://h:1/v1"
    )
    assert labels_for(["a/x.json", "b/x.json"]) == ["x", "x#2"]


# ---------------------------------------------------------------- the CLI


def invoke(*args: str):
    return sage_cli("llm", "bench", *args)


def test_cli_run_json_and_compare(fake, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--url", fake.url + "/v1/", "--input-len", "16", "--output-len", "4", "-n", "8"]
    res = invoke("run", *common, "-c", "1", "--output", str(a))  # with the progress bar
    assert res.exit_code == 0, res.output
    assert "TTFT" in res.stdout and "fake-model" in res.stdout  # model found on /v1/models
    res = invoke("run", *common, "-c", "4", "-o", str(b), "--quiet")
    assert res.exit_code == 0, res.output
    data = json.loads(a.read_text())
    assert data["summary"]["all"]["requests"] == 8 and len(data["records"]) == 8
    assert data["config"]["concurrency"] == 1 and data["config"]["model"] == "fake-model"
    rows = {r.metric: r for r in compare([data, json.loads(b.read_text())])}
    # 4 in flight on an upstream that is never busy: about 4x the requests per second.
    assert rows["req/s"].ratios[0] == 1.0 and rows["req/s"].ratios[1] > 2
    res = invoke("compare", str(a), str(b))
    assert res.exit_code == 0 and "req/s" in res.stdout and "x)" in res.stdout
    res = invoke("compare", str(a), str(b), "--json")
    out = json.loads(res.stdout)
    assert out["runs"] == ["a", "b"] and out["rows"][0]["ratios"][0] == 1.0


def test_cli_json_to_stdout(fake):
    res = invoke(
        "run",
        "--url",
        fake.url,
        "--model",
        "m",
        "-n",
        "2",
        "--output-len",
        "2",
        "--json",
        "-q",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["all"]["ok"] == 2
    assert "TTFT" in res.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--endpoint", "rerank"], "unknown endpoint"),
        (["--input-len", "lots"], "is not a length"),
        (["--mix", "vip:1"], "is not CLASS:WEIGHT"),
        (["-n", "3", "--duration", "2"], "both given"),
        (["--request-rate", "0"], "must be > 0"),
        (["--dataset", "/nonexistent.jsonl"], "is not a file"),
        (["--output", __file__ + "/x.json"], "is not writable"),  # under a file
    ],
)
def test_cli_bad_input_exits_2(args, needle):
    res = invoke("run", "--url", "http://127.0.0.1:9", "--model", "m", *args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr


def test_cli_all_failed_exits_1(fake):
    fake.status_by_model = {"busy": 503}
    res = invoke("run", "--url", fake.url, "--model", "busy", "-n", "2", "-q")
    assert res.exit_code == 1
    assert "every request failed: HTTP 503" in res.stderr


def test_cli_compare_bad_files(tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    res = invoke("compare", str(junk), str(junk))
    assert res.exit_code == 2 and "not a bench result" in res.stderr
    assert invoke("compare", str(junk)).exit_code == 2


def test_plot_without_matplotlib_is_bad_input(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    res = invoke(
        "run", "--url", "http://127.0.0.1:9", "--model", "m", "--plot", str(tmp_path / "p.png")
    )
    assert res.exit_code == 2
    assert "pip install matplotlib" in res.stderr


def test_plot_writes_png(fake, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    res = invoke(
        "run", "--url", fake.url, "--model", "m", "-n", "6", "-c", "2", "--output-len", "3",
        "--mix", "critical:0.5,normal:0.5", "--plot", str(out), "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
