"""`sage llm serve`: the OpenAI-compatible gateway in front of every engine."""

from __future__ import annotations

import typer

from sagellm_cli.cli.common import emit_json, human_duration, info
from sagellm_cli.core.credentials import (
    ADMIN_TOKEN_ENV,
    API_KEY_ENV,
    admin_token_path,
    ensure_admin_token,
)
from sagellm_cli.core.errors import BadInput


def _parse_model_routing(pairs: list[str] | None) -> dict[str, str]:
    routing: dict[str, str] = {}
    for pair in pairs or []:
        model, sep, strategy = pair.rpartition("=")
        if not sep or not model or not strategy:
            raise BadInput(
                f"--model-routing {pair!r} is not MODEL=STRATEGY",
                hint="e.g. --model-routing tiny=affinity",
            )
        routing[model] = strategy
    return routing


def register(parent: typer.Typer) -> None:
    """Attach `serve` to the `llm` group."""

    @parent.command("serve")
    def serve(
        ctx: typer.Context,
        host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
        port: int = typer.Option(8889, help="Port to listen on."),
        routing: str = typer.Option(
            "round_robin",
            help="round_robin, least_loaded, random, power_of_two, affinity, prefix or length.",
        ),
        model_routing: list[str] | None = typer.Option(
            None, "--model-routing", help="MODEL=STRATEGY: a strategy for one model (repeatable)."
        ),
        api_key: str | None = typer.Option(
            None,
            "--api-key",
            envvar="SAGELLM_API_KEY",
            help="Require `Authorization: Bearer KEY` on inference endpoints.",
        ),
        admin_token: str | None = typer.Option(
            None,
            "--admin-token",
            envvar="SAGELLM_ADMIN_TOKEN",
            help="Token for /v1/management (default: the one in $SAGELLM_HOME/admin-token, "
            "created at first start).",
        ),
        background: bool = typer.Option(
            False, "--background", "-d", help="Detach, record in the state file, wait until ready."
        ),
        status: bool = typer.Option(False, "--status", help="Show the running gateway."),
        stop: bool = typer.Option(False, "--stop", help="Stop the running gateway (idempotent)."),
        health_interval: float = typer.Option(2.0, help="Seconds between active health checks."),
        failure_threshold: int = typer.Option(
            3, help="Consecutive failures before an engine is taken out of rotation."
        ),
        max_body_mb: float = typer.Option(8.0, help="Largest request body accepted, in MiB."),
        prefix_chars: int = typer.Option(
            256, min=1, help="`prefix` routing: prompt characters that form the hash key."
        ),
        length_threshold: int = typer.Option(
            2048, min=1, help="`length` routing: prompts longer than this (chars) go to prefill."
        ),
        scheduling: str = typer.Option(
            "none",
            help="Admission control: none, fifo, priority, slo_aware, cost or adaptive "
            "(docs/scheduling.md).",
        ),
        max_queue: int = typer.Option(
            1000, min=0, help="Requests that may wait per model; beyond it 429 (0 = unbounded)."
        ),
        queue_timeout: float = typer.Option(
            0.0, min=0, help="Seconds a request may wait in the queue before 503 (0 = no limit)."
        ),
        max_inflight_per_engine: int = typer.Option(
            16,
            min=0,
            help="In-flight limit per engine unless its spec sets max_inflight (0 = no limit).",
        ),
        slo_reject: bool = typer.Option(
            False,
            "--slo-reject/--no-slo-reject",
            help="Reject (429) requests whose X-SLO-Deadline-Ms can no longer be met.",
        ),
        allowed_host: list[str] | None = typer.Option(
            None,
            "--allowed-host",
            help="Accept requests with this Host besides loopback and the bind address "
            "(repeatable; * for any). Guards against DNS rebinding.",
        ),
        allowed_origin: list[str] | None = typer.Option(
            None,
            "--allowed-origin",
            help="Accept browser requests from this Origin, e.g. http://localhost:3000 "
            "(repeatable). Other cross-site requests get 403.",
        ),
        allow_remote_engine_config: bool = typer.Option(
            False,
            "--allow-remote-engine-config",
            help="Let management API requests set any engine env, bind engines off loopback "
            "and pass code-loading flags. Off by default: docs/security.md.",
        ),
        show_admin_token: bool = typer.Option(
            False,
            "--show-admin-token",
            help="Print the admin token (creating $SAGELLM_HOME/admin-token if needed) and exit.",
        ),
        upstream_client: str = typer.Option(
            "aiohttp",
            help="Upstream HTTP client: aiohttp, httpx, or the experimental native.",
            hidden=True,
        ),
        timeout: float = typer.Option(60.0, help="With --background: seconds to wait for ready."),
        json_out: bool = typer.Option(False, "--json", help="JSON output for --status/--stop/-d."),
    ) -> None:
        """Serve one OpenAI-compatible API in front of every engine (foreground by default)."""
        from sagellm_cli.gateway import daemon
        from sagellm_cli.gateway.config import GatewayConfig

        if status and stop:
            raise BadInput("give --status or --stop, not both")
        if show_admin_token:
            typer.echo(admin_token or ensure_admin_token())
            return
        _warn_secrets_on_argv(ctx)
        if status:
            _show_status(daemon.status(), json_out)
            return
        if stop:
            record = daemon.stop()
            if json_out:
                emit_json({"stopped": record is not None, "gateway": record})
            elif record is None:
                info("no gateway running")
            else:
                info(f"gateway (pid {record['pid']}) at {record['url']} stopped")
            return
        config = GatewayConfig(
            host=host,
            port=port,
            routing=routing,
            model_routing=_parse_model_routing(model_routing),
            api_key=api_key or None,
            admin_token=admin_token or None,
            max_body_bytes=int(max_body_mb * 1024 * 1024),
            health_interval_s=health_interval,
            failure_threshold=failure_threshold,
            upstream_client=upstream_client,
            prefix_chars=prefix_chars,
            length_threshold_chars=length_threshold,
            scheduling=scheduling,
            max_queue=max_queue,
            queue_timeout_s=queue_timeout,
            max_inflight_per_engine=max_inflight_per_engine,
            slo_reject=slo_reject,
            allowed_hosts=list(allowed_host or []),
            allowed_origins=list(allowed_origin or []),
            allow_remote_engine_config=allow_remote_engine_config,
        )
        # The management API always takes a token: the given one, else the token file's.
        config.admin_token = config.admin_token or ensure_admin_token()
        config.validate()
        if background:
            record = daemon.start_background(config, timeout=timeout)
            if json_out:
                emit_json(record)
            else:
                info(f"gateway running at {record['url']}/v1 (pid {record['pid']})")
                info(f"log: {daemon.log_path()}; stop with `sage llm serve --stop`")
            return

        def announce(recorded: bool) -> None:
            info(
                f"gateway listening on {config.url}/v1 (routing: {config.routing}, "
                f"scheduling: {config.scheduling})"
            )
            info(f"management API: admin token in {admin_token_path()} (--show-admin-token)")
            if not recorded:
                info("note: another gateway is recorded for this state directory; not this one")

        daemon.run(config, announce)


def _warn_secrets_on_argv(ctx: typer.Context) -> None:
    """Secrets given as options are visible to every user in `ps`: say so."""
    for param, env in (("api_key", API_KEY_ENV), ("admin_token", ADMIN_TOKEN_ENV)):
        source = ctx.get_parameter_source(param)
        if source is not None and source.name == "COMMANDLINE":
            option = "--" + param.replace("_", "-")
            info(f"warning: {option} on the command line is visible to other users in `ps`; "
                 f"set {env} instead")  # fmt: skip


def _show_status(doc: dict, json_out: bool) -> None:
    import time

    if json_out:
        emit_json(doc)
        return
    if not doc.get("running"):
        info("no gateway running (start one with `sage llm serve --background`)")
        return
    health = "healthy" if doc.get("healthy") else "not answering /health"
    uptime = human_duration(time.time() - doc.get("started_at", time.time()))
    typer.echo(
        f"gateway {doc['url']}/v1  pid {doc['pid']}  {health}  up {uptime}  "
        f"routing {doc.get('routing')}"
    )
