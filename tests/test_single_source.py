"""One definition of each thing: these fail when a field is added in one place only.

- EngineSpec's options must be settable from `sage llm engine start`, a preset file,
  the management API and ControlPlane.start_engine, and reach the spec unchanged;
  `engine start`'s options are built from the fields, and no one else lists them.
- Every GatewayConfig field must be reachable from `sage llm serve`.
- Engine statuses are spelled once, in core/lifecycle.py.
"""

from __future__ import annotations

import ast
import dataclasses
import types
from pathlib import Path

import pytest
from conftest import invoke

from sagellm_cli.core.records import EngineSpec, option_fields

# A non-default value for every option, in the form each surface takes it.
SAMPLES = {
    "model": "org/model",
    "kind": "embedding",
    "runtime": "vllm",
    "use_gpu": False,
    "tensor_parallel": 2,
    "pipeline_parallel": 3,
    "port": 18123,
    "host": "localhost",
    "label": "lbl",
    "served_model_name": "served",
    "max_model_len": 77,
    "kv_cache_gb": 0.5,
    "gpu_memory_gb": 3.5,
    "gpus": [0, 1],
    "placement": "spread",
    "extra_args": ["--seed", "1"],
    "env": {"OMP_NUM_THREADS": "1"},
    "role": "decode",
    "kv_connector": "NixlConnector",
    "cost_per_1k_tokens": 0.25,
    "max_inflight": 4,
    "cache": "private",
    "restart": "always",
    "max_restarts": 2,
    "keep_alive": 300.0,
    "unload": "sleep",
    "pin": True,
    "cluster": "ray://head.example:10001",
    "enable_lora": True,
    "max_lora_rank": 32,
    "lora_adapters": {"sql": "/adapters/sql"},
    "kv_events": True,
}
# Options whose CLI form is not `--field-name VALUE`.
CLI_FORMS = {
    "model": lambda v: [v],
    "kind": lambda v: ["--engine-kind", v],
    "use_gpu": lambda v: ["--use-gpu" if v else "--no-gpu"],
    "gpus": lambda v: ["--gpus", ",".join(map(str, v))],
    "extra_args": lambda v: [arg for a in v for arg in ("--extra-arg", a)],
    "env": lambda v: [arg for k, x in v.items() for arg in ("--env", f"{k}={x}")],
    "enable_lora": lambda v: ["--enable-lora"] if v else [],
    "pin": lambda v: ["--pin"] if v else [],
    "kv_events": lambda v: ["--kv-events"] if v else [],
    "lora_adapters": lambda v: [a for k, x in v.items() for a in ("--lora-adapter", f"{k}={x}")],
}


def test_every_option_has_a_sample_that_differs_from_its_default():
    assert set(SAMPLES) == set(option_fields()), "add the new EngineSpec field to SAMPLES"
    defaults = {f.name: f.default for f in dataclasses.fields(EngineSpec)}
    for name in option_fields():
        assert SAMPLES[name] != defaults[name], name


def test_engine_start_reaches_every_spec_field(home, monkeypatch):
    from sagellm_cli.core.engines.manager import EngineManager

    captured: list[EngineSpec] = []

    class Captured(Exception):
        pass

    def spawn(self, spec, **kwargs):
        captured.append(spec)
        raise Captured

    monkeypatch.setattr(EngineManager, "spawn", spawn)
    args: list[str] = []
    for name in option_fields():
        value = SAMPLES[name]
        form = CLI_FORMS.get(name, lambda v, n=name: ["--" + n.replace("_", "-"), str(v)])
        args += form(value)
    result = invoke("llm", "engine", "start", *args)
    assert captured, result.output
    spec = captured[0]
    for name in option_fields():
        assert getattr(spec, name) == SAMPLES[name], f"engine start does not set {name}"


# `engine start`'s options that are no EngineSpec field (cli/engine.py).
START_ONLY = {"wait", "timeout", "json_out"}


def _start_command():
    import typer

    from sagellm_cli.cli.engine import app

    return typer.main.get_command(app).commands["start"]


def test_every_user_settable_spec_field_is_an_engine_start_option():
    """The options are built from EngineSpec: each field's flags, help and default are
    the ones on the field, and none is spelled a second time in cli/engine.py."""
    from sagellm_cli.core.inputs.options import cli_fields

    params = {p.name: p for p in _start_command().params}
    internal = {f.name for f in dataclasses.fields(EngineSpec) if f.metadata.get("internal")}
    user_settable = {f.name for f in dataclasses.fields(EngineSpec)} - internal
    assert set(params) - START_ONLY == user_settable == set(option_fields())
    for field in cli_fields(EngineSpec):
        param = params[field.name]
        assert param.help == field.option.help, field.name
        if field.option.argument:
            continue
        assert param.default == field.default, field.name
        assert field.flag in param.opts, field.name


def test_engine_start_keeps_its_flags_and_short_flags():
    params = {p.name: p for p in _start_command().params}
    assert params["kind"].opts == ["--engine-kind", "-k"]
    assert params["tensor_parallel"].opts == ["--tensor-parallel", "-tp"]
    assert params["pipeline_parallel"].opts == ["--pipeline-parallel", "-pp"]
    assert params["use_gpu"].secondary_opts == ["--no-gpu"]
    assert params["enable_lora"].is_flag and not params["enable_lora"].secondary_opts
    assert params["keep_alive"].default == "-1"
    assert params["model"].required and params["model"].param_type_name == "argument"


def test_the_library_takes_every_spec_field_by_name(home, monkeypatch):
    from sagellm_cli import ControlPlane
    from sagellm_cli.core.engines.manager import EngineManager
    from sagellm_cli.core.errors import BadInput

    captured: list[EngineSpec] = []
    record = types.SimpleNamespace(id="e")
    monkeypatch.setattr(EngineManager, "spawn", lambda self, spec: captured.append(spec) or record)
    monkeypatch.setattr(EngineManager, "wait_ready", lambda self, engine_id, timeout: record)
    options = {k: v for k, v in SAMPLES.items() if k not in ("model", "kind")}
    assert ControlPlane().start_engine(SAMPLES["model"], SAMPLES["kind"], **options) is record
    for name in option_fields():
        assert getattr(captured[0], name) == SAMPLES[name], f"start_engine does not set {name}"
    with pytest.raises(BadInput) as err:
        ControlPlane().start_engine("m", served_model="typo")
    assert err.value.hint == "accepted: " + ", ".join(option_fields())


def test_spec_field_names_are_listed_only_by_records():
    """A list, tuple or set literal of mostly (three or more) EngineSpec field names
    outside core/records.py is a second list of the options: derive it instead."""
    root = Path(__file__).resolve().parent.parent / "sagellm_cli"
    names = set(option_fields())
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "records.py" and path.parent.name == "core":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                spec_names = [i for i in items if i in names]
                if len(spec_names) >= 3 and len(spec_names) * 3 >= len(items) * 2:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {items}")
    assert not found, "use core.records.option_fields():\n" + "\n".join(found)


def test_preset_keys_are_the_spec_options_plus_name_replicas_and_url():
    from sagellm_cli.core.presets.schema import ENGINE_KEYS

    # `url` registers an external engine (docs/cluster.md) instead of starting one.
    assert set(ENGINE_KEYS) == set(option_fields()) | {"name", "replicas", "url"}


def test_a_preset_entry_maps_onto_the_spec(home, tmp_path):
    import yaml

    from sagellm_cli.core.presets.plan import ModelInfo, _spec_for
    from sagellm_cli.core.presets.schema import parse_preset

    entry = {"name": "e", **{k: v for k, v in SAMPLES.items() if k != "port"}, "port": 18123}
    text = yaml.safe_dump({"version": 1, "name": "p", "engines": [entry]})
    config = parse_preset(text, "p.yaml").engines[0]
    model = ModelInfo("org/model", "org/model", None, "hub", False)
    spec = _spec_for(config, "p", 1, model)
    for name in option_fields():
        assert getattr(spec, name) == SAMPLES[name], f"presets do not carry {name}"
    assert (spec.preset, spec.preset_engine) == ("p", "e")


def test_the_management_api_validates_every_spec_field():
    from sagellm_cli.core.inputs.spec_schema import parse_engine_options

    spec = parse_engine_options(dict(SAMPLES))
    for name in option_fields():
        assert getattr(spec, name) == SAMPLES[name]


# Gateway options whose sample can't be derived from the field's type and default.
GATEWAY_SAMPLES = {
    "host": ("localhost", "localhost"),
    "routing": ("prefix", "prefix"),
    "model_routing": ("m=affinity", {"m": "affinity"}),
    "api_key": ("k", "k"),
    "admin_token": ("a", "a"),
    "max_body_bytes": ("2", 2 * 1024 * 1024),
    "max_header_bytes": ("32", 32 * 1024),
    "scheduling": ("fifo", "fifo"),
    "eviction": ("lru", "lru"),
}


def _gateway_sample(name, option, default):
    """(CLI args, expected field value) that set `name` to something else than its default."""
    flag = option.flags.split("/")[0]
    if name in GATEWAY_SAMPLES:
        raw, value = GATEWAY_SAMPLES[name]
        return [flag, raw], value
    if isinstance(default, bool):
        return [flag], True
    if isinstance(default, int):
        return [flag, str(default + 1)], default + 1
    if isinstance(default, float):
        return [flag, str(default + 1.5)], default + 1.5
    if isinstance(default, list):
        return [flag, "x.example"], ["x.example"]
    raise AssertionError(f"add GatewayConfig.{name} to GATEWAY_SAMPLES")


def test_every_gateway_option_is_reachable_from_serve(home, monkeypatch):
    from sagellm_cli.gateway import daemon
    from sagellm_cli.gateway.config import GatewayConfig, cli_options

    captured: list[GatewayConfig] = []
    monkeypatch.setattr(daemon, "run", lambda config, announce=None: captured.append(config))
    defaults = GatewayConfig()
    args: list[str] = []
    expected = {}
    for field in dataclasses.fields(GatewayConfig):
        option = cli_options()[field.name]
        field_args, expected[field.name] = _gateway_sample(
            field.name, option, getattr(defaults, field.name)
        )
        args += field_args
    result = invoke("llm", "serve", *args)
    assert result.exit_code == 0 and captured, result.output
    config = captured[0]
    for name, value in expected.items():
        assert getattr(config, name) == value, f"serve does not set {name}"
        assert value != getattr(defaults, name), f"{name}: the sample is the default"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(EngineSpec)])
def test_spec_fields_round_trip_through_the_state_file(field):
    from sagellm_cli.core.records import decode

    spec = EngineSpec(**{k: v for k, v in SAMPLES.items() if k in option_fields()})
    assert decode(EngineSpec, spec.to_dict()) == spec


def _status_literals(node) -> list[str]:
    """The engine-status words among the string constants of `node` (a tuple/set/list too)."""
    from sagellm_cli.core.lifecycle import Status

    items = node.elts if isinstance(node, (ast.Tuple, ast.Set, ast.List)) else [node]
    words = {s.value for s in Status}
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in words]


def _mentions_status(node) -> bool:
    return "status" in ast.unparse(node)


def test_engine_statuses_are_read_from_the_enum_never_written_as_literals():
    """Only core/lifecycle.py spells an engine status: elsewhere `status == "ready"`,
    `status in ("idle", ...)`, `x.status = "failed"` or `status="ready"` is a second,
    unchecked definition of the state machine."""
    root = Path(__file__).resolve().parent.parent / "sagellm_cli"
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "lifecycle.py" and path.parent.name == "core":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            hits: list[str] = []
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_mentions_status(s) for s in sides):
                    hits = [w for s in sides for w in _status_literals(s)]
            elif (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Attribute) and t.attr == "status" for t in node.targets)
                or isinstance(node, ast.keyword)
                and node.arg == "status"
            ):
                hits = _status_literals(node.value)
            if hits:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {hits}")
    assert not found, "use core.lifecycle.Status:\n" + "\n".join(found)


def _protocol_literals() -> tuple[set[str], set[str]]:
    """core/protocol.py's header names, and its routes (with their forms under /v1)."""
    from sagellm_cli.core import protocol

    values = [v for k, v in vars(protocol).items() if k.isupper() and isinstance(v, str)]
    headers = {v for v in values if v.startswith("x-") or v == protocol.AUTHORIZATION}
    routes = {v for v in values if v.startswith("/")}
    routes |= {protocol.v1_relative(r) for r in routes if r.startswith(protocol.V1 + "/")}
    return headers, routes


def _code_strings(tree: ast.AST):
    """Every string constant of a module but its docstrings."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in docstrings:
            value = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            if isinstance(value, str):
                yield node.lineno, value


def test_header_names_and_routes_are_spelled_only_in_protocol():
    """A header name or route written as a literal outside core/protocol.py is a second
    definition of what the gateway, its clients and the engines agree on."""
    headers, routes = _protocol_literals()
    root = Path(__file__).resolve().parent.parent / "sagellm_cli"
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "protocol.py" and path.parent.name == "core":
            continue
        for line, value in _code_strings(ast.parse(path.read_text(encoding="utf-8"))):
            route = any(value == r or value.startswith((r + "/", r + "?")) for r in routes)
            if value.lower() in headers or route:
                found.append(f"{path.relative_to(root)}:{line}: {value!r}")
    assert not found, "use sagellm_cli.core.protocol:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("::1", "http://[::1]:8000"),
        ("[::1]", "http://[::1]:8000"),
        ("fe80::2", "http://[fe80::2]:8000"),
        ("node-7", "http://node-7:8000"),
    ],
)
def test_base_url_reaches_the_bound_host(host, url):
    from sagellm_cli.core.protocol import base_url
    from sagellm_cli.core.records import EngineRecord

    assert base_url(host, 8000) == url
    record = EngineRecord(id="e", kind="llm", runtime="vllm", model="m",
                          served_model_name="m", host=host, port=8000)  # fmt: skip
    assert record.url == url  # an engine bound to `::` is reached on ::1, not [::]


def test_the_library_names_the_seed_manager_without_importing_the_seeds():
    """sagellm_cli/__init__.py is the one table of where each public name lives; library.py
    re-exports ControlPlaneManager through it, so it never imports seed/ (which imports it)."""
    from sagellm_cli.library import ControlPlaneManager
    from sagellm_cli.seed.manager import ControlPlaneManager as defined

    assert ControlPlaneManager is defined
    path = Path(__file__).resolve().parent.parent / "sagellm_cli" / "library.py"
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not [m for m in imported if m and m.startswith("sagellm_cli.seed")], imported
