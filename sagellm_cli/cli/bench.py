"""`sage llm bench run|compare`: load-test an OpenAI-compatible endpoint (docs/bench.md)."""

from __future__ import annotations

import math

import typer

from sagellm_cli.cli.common import emit_json, stderr_console, stdout_console
from sagellm_cli.core.errors import BadInput, OperationFailed

app = typer.Typer(
    help="Load-test an OpenAI-compatible endpoint (gateway or engine) and compare runs.",
    no_args_is_help=True,
)


def _progress(console, load):
    """A rich progress bar on stderr and the per-record callback that advances it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    by_time = load.duration_s is not None
    progress = Progress(
        TextColumn("[bold]bench[/]"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%") if by_time else MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,
    )
    total = load.duration_s if by_time else load.num_requests
    task = progress.add_task("bench", total=total, status="")
    counts = {"done": 0, "errors": 0, "warmup": 0, "t0": None}

    def on_record(rec) -> None:
        import time

        if rec.warmup:
            counts["warmup"] += 1
            progress.update(task, status=f"[dim]warm-up {counts['warmup']}/{load.warmup}[/]")
            return
        if counts["t0"] is None:
            counts["t0"] = time.monotonic() - (rec.e2e_s or 0)
        counts["done"] += 1
        counts["errors"] += 0 if rec.ok else 1
        status = f"{counts['done']} done" + (
            f", [red]{counts['errors']} errors[/]" if counts["errors"] else ""
        )
        if by_time:
            progress.update(
                task, completed=min(time.monotonic() - counts["t0"], total), status=status
            )
        else:
            progress.update(task, completed=counts["done"], status=status)

    return progress, on_record


@app.command("run")
def run(
    url: str = typer.Option(..., help="Server base URL, with or without /v1."),
    model: str | None = typer.Option(
        None, help="Model name as served. Default: the first of the server's /v1/models."
    ),
    endpoint: str = typer.Option("chat", help="chat, completions or embeddings."),
    api_key: str | None = typer.Option(None, help="Sent as a Bearer token."),
    stream: bool = typer.Option(
        True, "--stream/--no-stream", help="Stream (needed for TTFT and ITL)."
    ),
    input_len: str = typer.Option(
        "128", help="Prompt tokens: 128, uniform:64-256 or normal:128,32."
    ),
    output_len: str = typer.Option("128", help="max_tokens: same forms as --input-len."),
    shared_prefix_len: int = typer.Option(
        0, min=0, help="Tokens of a prefix shared by every prompt (prepended to --input-len)."
    ),
    tokenizer: str | None = typer.Option(
        None, help="tokenizer.json or model dir for counting. Default: --model if a local dir."
    ),
    dataset: str | None = typer.Option(
        None, help='JSONL of {"prompt"|"messages", "priority"?, "max_tokens"?}.'
    ),
    mix: str | None = typer.Option(
        None, help='Priority classes, e.g. "critical:0.1,normal:0.9" (sent as X-Priority).'
    ),
    slo_ttft_ms: str | None = typer.Option(
        None, help="TTFT SLO in ms, or per class: critical:200,normal:2000."
    ),
    slo_e2e_ms: str | None = typer.Option(
        None, help="End-to-end SLO in ms (also sent as X-SLO-Deadline-Ms), or per class."
    ),
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        "-c",
        help="Closed loop with C in flight; with --request-rate, a cap.",
    ),
    request_rate: float | None = typer.Option(
        None, "--request-rate", "-r", help="Open loop: arrivals per second (inf = all at once)."
    ),
    burstiness: float = typer.Option(
        1.0, help="Gamma shape of the gaps: 1 = Poisson, <1 burstier."
    ),
    num_requests: int | None = typer.Option(
        None, "--num-requests", "-n", help="Measured requests (default 100)."
    ),
    duration: float | None = typer.Option(None, help="Measure for S seconds instead of -n."),
    warmup: int = typer.Option(0, min=0, help="Requests sent first and left out of the stats."),
    seed: int = typer.Option(0, help="Seed for prompts, lengths, classes and arrivals."),
    timeout: float = typer.Option(600.0, help="Seconds per request before it counts as an error."),
    ignore_eos: bool = typer.Option(
        True, "--ignore-eos/--no-ignore-eos", help="Ask for exactly max_tokens (vLLM's ignore_eos)."
    ),
    priority_body: bool = typer.Option(
        False,
        "--priority-body",
        help="Also send the class as body field `priority` (for the gateway; vLLM rejects it).",
    ),
    output: str | None = typer.Option(
        None, "--output", "-o", help="Write records and summary as JSON to FILE."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print records and summary as JSON on stdout (tables to stderr)."
    ),
    plot_out: str | None = typer.Option(None, "--plot", help="Write a latency/throughput PNG."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Send a workload at a load pattern and report TTFT, TPOT, ITL, E2E, throughput, goodput."""
    from sagellm_cli.bench.load import BenchRunner, LoadConfig, detect_model
    from sagellm_cli.bench.report import (
        check_plot_available,
        check_writable,
        plot,
        render_summary,
        write_json,
    )
    from sagellm_cli.bench.workload import (
        LengthSpec,
        TokenCounter,
        Workload,
        WorkloadConfig,
        load_dataset,
        parse_mix,
        parse_slo,
    )

    # Fail before a long run, not after it.
    if plot_out:
        check_plot_available()
        check_writable(plot_out, "--plot")
    if output:
        check_writable(output, "--output")
    if request_rate is not None and math.isnan(request_rate):
        raise BadInput("--request-rate is not a number")
    workload_cfg = WorkloadConfig(
        input_len=LengthSpec.parse(input_len, "--input-len"),
        output_len=LengthSpec.parse(output_len, "--output-len"),
        shared_prefix_len=shared_prefix_len,
        mix=parse_mix(mix),
        slo_ttft_ms=parse_slo(slo_ttft_ms, "--slo-ttft-ms"),
        slo_e2e_ms=parse_slo(slo_e2e_ms, "--slo-e2e-ms"),
        dataset=load_dataset(dataset) if dataset else None,
        seed=seed,
    )
    load = LoadConfig(
        url=url,
        model=model or "(detect)",
        endpoint=endpoint,
        api_key=api_key,
        stream=stream,
        concurrency=concurrency,
        request_rate=request_rate,
        burstiness=burstiness,
        num_requests=num_requests,
        duration_s=duration,
        warmup=warmup,
        seed=seed,
        timeout_s=timeout,
        ignore_eos=ignore_eos,
        priority_body=priority_body,
    )
    load.validate()
    if not model:  # after every option is checked: this one talks to the server
        load.model = detect_model(load.url, api_key)
    workload = Workload(workload_cfg, TokenCounter.for_model(load.model, tokenizer))
    err = stderr_console()
    if quiet:
        result = BenchRunner(load, workload).run()
    else:
        runner = BenchRunner(load, workload)
        progress, runner.on_record = _progress(err, load)
        with progress:
            result = runner.run()
    data = result.to_dict()
    if output:
        write_json(data, output)
    if json_out:
        emit_json(data)
    render_summary(data, err if json_out else stdout_console())
    if plot_out:
        plot(data, plot_out)
    summary = data["summary"]["all"]
    if summary["requests"] and not summary["ok"]:
        top = next(iter(summary["error_kinds"]), "unknown error")
        raise OperationFailed(
            f"every request failed: {top}", hint="check --url, --model and the server's log"
        )


@app.command("compare")
def compare_cmd(
    files: list[str] = typer.Argument(..., help="Result files from `bench run --output`."),
    cls: str = typer.Option("all", "--class", help="Compare one priority class (default all)."),
    json_out: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Show runs side by side, with each value's ratio to the first run's."""
    from sagellm_cli.bench.compare import compare, labels_for, load_result, render, to_dict

    if len(files) < 2:
        raise BadInput(
            "compare needs at least two result files", hint="sage llm bench compare A.json B.json"
        )
    results = [load_result(f) for f in files]
    labels = labels_for(files)
    rows = compare(results, cls)
    if json_out:
        emit_json(to_dict(labels, rows, cls))
    else:
        render(labels, rows, cls, stdout_console())
