"""`sage llm serve`: the OpenAI-compatible gateway in front of every engine."""

from __future__ import annotations

import inspect
from typing import Any

import typer

from sagellm_cli.cli.common import emit_json, human_duration, info
from sagellm_cli.cli.options import KW, Params, field_parameters, own_parameters, with_parameters
from sagellm_cli.core.credentials import (
    ADMIN_TOKEN_ENV,
    API_KEY_ENV,
    admin_token_path,
    ensure_admin_token,
)
from sagellm_cli.core.errors import BadInput

# The options of `serve` itself; every other option is a GatewayConfig field (config.py).
_COMMAND_OPTIONS: Params = [
    ("background", bool, typer.Option(
        False, "--background", "-d", help="Detach, record in the state file, wait until ready.")),
    ("status", bool, typer.Option(False, "--status", help="Show the running gateway.")),
    ("stop", bool, typer.Option(False, "--stop", help="Stop the running gateway (idempotent).")),
    ("show_admin_token", bool, typer.Option(
        False, "--show-admin-token",
        help="Print the admin token (creating $SAGELLM_HOME/admin-token if needed) and exit.")),
    ("timeout", float, typer.Option(
        60.0, help="With --background: seconds to wait for ready.")),
    ("json_out", bool, typer.Option(
        False, "--json", help="JSON output for --status/--stop/-d.")),
]  # fmt: skip


def _config(values: dict[str, Any]):
    """The GatewayConfig the options describe."""
    from sagellm_cli.core.inputs.options import to_fields
    from sagellm_cli.core.paths import trusted_state_dir
    from sagellm_cli.gateway.config import GatewayConfig

    trusted_state_dir()  # exit 2 before anything starts if others can write to it
    config = GatewayConfig(**to_fields(GatewayConfig, values))
    # Once, here (neither the app nor the server validates again), and before the default
    # below: an empty --api-key or --admin-token is refused, not taken for "none given".
    config.validate()
    # The management API always takes a token: the given one, else the token file's.
    config.admin_token = config.admin_token or ensure_admin_token()
    return config


def register(parent: typer.Typer) -> None:
    """Attach `serve` to the `llm` group, with its options built from GatewayConfig."""

    def serve(ctx: typer.Context, **values: Any) -> None:
        """Serve one OpenAI-compatible API in front of every engine (foreground by default)."""
        _serve(ctx, values)

    from sagellm_cli.gateway.config import GatewayConfig

    params = [inspect.Parameter("ctx", KW, annotation=typer.Context)]
    params += own_parameters(_COMMAND_OPTIONS) + field_parameters(GatewayConfig)
    parent.command("serve")(with_parameters(serve, params))


def _serve(ctx: typer.Context, values: dict[str, Any]) -> None:
    from sagellm_cli.gateway import daemon

    background, status, stop = values.pop("background"), values.pop("status"), values.pop("stop")
    show_token, json_out = values.pop("show_admin_token"), values.pop("json_out")
    timeout = values.pop("timeout")
    if status and stop:
        raise BadInput("give --status or --stop, not both")
    if show_token:
        typer.echo(values["admin_token"] or ensure_admin_token())
        return
    _warn_secrets_on_argv(ctx)
    if status:
        _show_status(_with_metrics(daemon.status()), json_out)
        return
    if stop:
        record = daemon.stop()
        if json_out:
            emit_json({"stopped": record is not None, "gateway": record and record.to_dict()})
        elif record is None:
            info("no gateway running")
        else:
            info(f"gateway (pid {record.pid}) at {record.url} stopped")
        return
    config = _config(values)
    if background:
        record = daemon.start_background(config, timeout=timeout)
        if json_out:
            emit_json(record.to_dict())
        else:
            info(f"gateway running at {record.url}/v1 (pid {record.pid})")
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


def _with_metrics(doc: dict) -> dict:
    """A running gateway's status plus its last-minute aggregates (`metrics`; null and
    `metrics_error` when they can't be read). `{"running": false}` stays as it was."""
    from sagellm_cli.core.credentials import read_admin_token
    from sagellm_cli.core.engines.monitor import fetch_metrics
    from sagellm_cli.core.errors import SageError

    if doc.get("running"):
        doc["metrics"] = None
        try:
            doc["metrics"] = fetch_metrics(doc["url"], read_admin_token())
        except SageError as exc:
            doc["metrics_error"] = exc.one_line()
    return doc


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
    total = (doc.get("metrics") or {}).get("total")
    if total:
        p95 = (total.get("latency_ms") or {}).get("p95")
        typer.echo(
            f"last {doc['metrics']['window_s']:g}s: {total['completed']} completed, "
            f"{total['failed']} failed, {total['inflight']} in flight, "
            f"{total['requests_per_s']:g} req/s, p95 "
            + ("-" if p95 is None else f"{p95:.0f} ms")
            + " (`sage llm top` for more)"
        )
    elif doc.get("metrics_error"):
        info(f"metrics: {doc['metrics_error']}")
