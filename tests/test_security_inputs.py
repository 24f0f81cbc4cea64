"""Issue 25: what the management API may hand an engine, trusting the state dir, byte limits.

Every refused request here is refused before anything is spawned, so no engine is needed:
the gateway is a real `sage llm serve` (or the app in-process), and each test checks that
the state file is byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import httpx
import pytest
from conftest import sage
from test_gateway_support import running_gateway

from sagellm_cli.core.credentials import SAFE_ENV_KEYS, env_allowed_remotely, read_admin_token
from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.inputs import limits
from sagellm_cli.core.inputs.engine_args import API_ENGINE_FLAGS, refused_api_arg

ENGINES = "/management/engines"
MB = 1024 * 1024


def _state_bytes(home) -> bytes | None:
    path = home / "state.json"
    return path.read_bytes() if path.exists() else None


def _one_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- 1. allow-lists


@pytest.fixture
def evil_config(tmp_path):
    """A vLLM --config file that turns on trust_remote_code (the issue's side door)."""
    path = tmp_path / "evil.yaml"
    path.write_text("trust-remote-code: true\nmax-num-seqs: 4\n")
    return str(path)


# One case per family of the issue: flags that import a class, load a plugin or read a file.
CODE_LOADING_ARGS = [
    ["--config", "{evil}"],
    ["--config={evil}"],
    ["--worker-cls", "evil.Worker"],
    ["--scheduler-cls", "evil.Scheduler"],
    ["--model-class-overrides", '{"Qwen2ForCausalLM": "evil.Model"}'],
    ["--log-config-file", "/tmp/log.json"],
    ["--logging-config", "/tmp/log.json"],
    ["--logging-config.handlers.x.class", "evil.Handler"],
    ["--kv-transfer-config", '{"kv_connector": "X", "kv_connector_module_path": "evil"}'],
    ["--tool-parser-plugin", "/tmp/p.py"],
    ["--reasoning-parser-plugin", "/tmp/p.py"],
    ["--io-processor-plugin", "evil"],
    ["--distributed-executor-backend", "evil.Executor"],
    ["--trust-remote-code"],
    ["--trust_remote_code"],
    ["--trust-rem"],  # an argparse abbreviation
    ["--max-num-seqs", "--trust-remote-code"],  # a flag where a value belongs
    ["--host", "0.0.0.0"],  # spec fields are set through the spec, which is checked
    ["-O3"],
    ["serve"],
]
DANGEROUS_ENV = ["CUDA_INJECTION64_PATH", "NCCL_NET_PLUGIN", "OMP_TOOL_LIBRARIES", "HF_ENDPOINT",
                 "NCCL_TUNER_PLUGIN", "HF_HOME", "LD_PRELOAD", "VLLM_PLUGINS"]  # fmt: skip


@pytest.mark.parametrize("args", CODE_LOADING_ARGS, ids=lambda a: a[0][:30])
def test_flags_outside_the_allow_list_are_refused(args, evil_config):
    args = [a.replace("{evil}", evil_config) for a in args]
    refused = refused_api_arg(args)
    assert refused is not None
    assert refused[0] in args


@pytest.mark.parametrize("name", DANGEROUS_ENV)
def test_env_names_that_load_code_are_refused(name):
    assert not env_allowed_remotely(name)
    # Exact names: no prefix admits a name (HF_, CUDA_, NCCL_, OMP_ used to).
    assert not env_allowed_remotely(name + "_X")


def test_allowed_flags_pass_in_every_spelling():
    assert refused_api_arg([]) is None
    assert refused_api_arg(["--max-num-seqs", "8", "--max_num_batched_tokens=512"]) is None
    assert (
        refused_api_arg(["--enforce-eager", "--no-enable-prefix-caching", "--seed", "-1"]) is None
    )
    # Every boolean flag, every value flag with a value.
    for flag, takes_value in API_ENGINE_FLAGS.items():
        assert refused_api_arg([flag, "1"] if takes_value else [flag]) is None, flag
        if takes_value:
            assert refused_api_arg([flag]) is not None, flag  # missing value
        else:
            assert refused_api_arg([f"{flag}=1"]) is not None, flag
    assert "HF_TOKEN" in SAFE_ENV_KEYS and env_allowed_remotely("CUDA_VISIBLE_DEVICES")


def test_the_gateway_refuses_each_family_and_records_nothing(home, evil_config):
    with running_gateway(home) as gw:
        before = _state_bytes(home)
        for args in CODE_LOADING_ARGS:
            body = {"model": "m", "extra_args": [a.replace("{evil}", evil_config) for a in args]}
            r = httpx.post(gw.v1 + ENGINES + "?wait=false", json=body, headers=gw.admin)
            assert r.status_code == 403, (args, r.text)
            error = r.json()["error"]
            assert (
                error["code"] == "forbidden" and "--allow-remote-engine-config" in error["message"]
            )
            assert args[0].split("=")[0] in error["message"]
        for name in DANGEROUS_ENV:
            body = {"model": "m", "env": {name: "/tmp/evil.so"}}
            r = httpx.post(gw.v1 + ENGINES + "?wait=false", json=body, headers=gw.admin)
            assert r.status_code == 403 and name in r.json()["error"]["message"], r.text
        assert _state_bytes(home) == before
        assert httpx.get(gw.v1 + ENGINES, headers=gw.admin).json() == []


def test_the_opt_in_still_allows_everything(evil_config):
    from sagellm_cli.gateway.control.management import Forbidden, spec_from_body

    body = {"model": "m", "extra_args": ["--config", evil_config], "env": {"HF_ENDPOINT": "x"}}
    with pytest.raises(Forbidden, match="--config"):
        spec_from_body({**body, "env": {}})
    spec = spec_from_body(body, allow_remote_config=True)
    assert spec.extra_args == ["--config", evil_config] and spec.env == {"HF_ENDPOINT": "x"}


# --------------------------------------------------------------------------- 2. trust on first use


def _plant(home, dir_mode: int, token_mode: int, token: str = "their-token"):
    home.mkdir(parents=True)
    os.chmod(home, dir_mode)
    (home / "admin-token").write_text(token + "\n")
    os.chmod(home / "admin-token", token_mode)


@pytest.mark.parametrize(
    ("dir_mode", "token_mode", "says"),
    [
        (0o777, 0o666, "chmod go-w"),  # the issue: planted by another user
        (0o700, 0o666, "chmod 600"),
        (0o700, 0o644, "chmod 600"),  # readable by others: the secret is no secret
        (0o770, 0o600, "chmod go-w"),
    ],
)
def test_a_planted_token_or_open_state_dir_is_refused(
    home, monkeypatch, dir_mode, token_mode, says
):
    monkeypatch.delenv("SAGELLM_ADMIN_TOKEN", raising=False)
    _plant(home, dir_mode, token_mode)
    for args in (["--show-admin-token"], ["--background", "--port", "1"]):
        proc = sage("llm", "serve", *args, home=home, timeout=60)
        line = _one_error_line(proc, 2)
        assert says in line and str(home) in line
        assert "their-token" not in proc.stdout
    assert not (home / "state.json").exists()  # no gateway recorded
    assert (home / "admin-token").read_text() == "their-token\n"  # never "repaired" silently
    with pytest.raises(BadInput) as refused:
        read_admin_token()
    assert says in refused.value.one_line()


def test_the_in_process_gateway_refuses_to_start_on_an_open_state_dir(home):
    from sagellm_cli.core.state import StateStore
    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.http.app import Gateway

    home.mkdir()
    os.chmod(home, 0o777)
    with pytest.raises(BadInput, match="writable by group or others"):
        Gateway(GatewayConfig(port=1, admin_token="given"), StateStore(home / "state.json"))
    # Every command that touches the state refuses too.
    line = _one_error_line(sage("llm", "engine", "list", home=home), 2)
    assert "chmod go-w" in line


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another user")
@pytest.mark.parametrize("what", ["token", "dir"])
def test_files_of_another_user_are_refused(home, what):
    _plant(home, 0o700, 0o600)
    os.chown(home / "admin-token" if what == "token" else home, 65534, -1)
    line = _one_error_line(sage("llm", "serve", "--show-admin-token", home=home), 2)
    assert "uid 65534" in line and "chown" in line


def test_a_fresh_state_dir_and_token_are_private(home):
    old = os.umask(0)  # whatever the umask (the child inherits it), we create 0700 / 0600
    try:
        proc = sage("llm", "serve", "--show-admin-token", home=home, check=True)
    finally:
        os.umask(old)
    assert proc.stdout.strip() == read_admin_token()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "admin-token").stat().st_mode) == 0o600


def test_a_symlinked_token_file_is_refused(home, tmp_path):
    home.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_text("their-token\n")
    os.chmod(target, 0o600)
    (home / "admin-token").symlink_to(target)
    line = _one_error_line(sage("llm", "serve", "--show-admin-token", home=home), 2)
    assert "admin token file" in line


# --------------------------------------------------------------------------- 3. byte limits


def test_huge_fields_are_400_naming_the_limit_and_record_nothing(home):
    names = sorted(SAFE_ENV_KEYS)[:20]
    cases = [
        ({"model": "x" * MB}, f"{limits.MAX_MODEL_CHARS}"),
        ({"model": "m", "env": {"HF_TOKEN": "x" * MB}}, f"{limits.MAX_ENV_VALUE_CHARS}"),
        ({"model": "m", "label": "a" * MB}, f"{limits.MAX_LABEL_CHARS}"),
        ({"model": "m", "extra_args": ["--seed"] * (limits.MAX_EXTRA_ARGS + 1)}, "256 items"),
        ({"model": "m", "extra_args": ["--api-key", "k" * MB]}, f"{limits.MAX_ARG_CHARS}"),
        ({"model": "m", "served_model_name": "n" * MB}, f"{limits.MAX_NAME_CHARS}"),
        # A path component over NAME_MAX: was a 500 ("File name too long").
        ({"model": "/tmp/" + "a" * 300 + "/m"}, "File name too long"),
        # Each value within its limit, together over what one process may get.
        ({"model": "m", "env": {n: "x" * 30_000 for n in names}}, f"{limits.MAX_EXEC_BYTES}"),
    ]
    with running_gateway(home, "--max-body-mb", "8") as gw:
        before = _state_bytes(home)
        for body, says in cases:
            r = httpx.post(gw.v1 + ENGINES + "?wait=false", json=body, headers=gw.admin)
            assert r.status_code == 400, (says, r.text[:300])
            error = r.json()["error"]
            assert says in error["message"], error["message"][:300]
            assert len(r.content) < 2000  # the huge value is not echoed back
        registration = {"url": "http://127.0.0.1:1", "model": "m", "label": "a" * MB}
        r = httpx.post(gw.v1 + ENGINES + "/register", json=registration, headers=gw.admin)
        assert r.status_code == 400 and str(limits.MAX_LABEL_CHARS) in r.text
        assert _state_bytes(home) == before
        assert "Traceback" not in gw.log_text()


def _preset_with_aliases(path, size: int, aliases: int = 99) -> None:
    """The issue's preset: one big string referenced by `aliases` aliases."""
    lines = ["version: 1", "name: big", f'x-big: &big "{"x" * size}"', "engines:",
             "  - name: e", "    model: m", "    extra_args:"]  # fmt: skip
    lines += ["      - *big"] * aliases
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("size", "says"),
    [(5_000_000, f"larger than {limits.MAX_PRESET_FILE_BYTES} bytes"),
     (900_000, f"more than {limits.MAX_PRESET_EXPANDED_BYTES} bytes once aliases")],
)  # fmt: skip
def test_the_alias_bomb_preset_fails_fast_with_little_memory(home, tmp_path, size, says):
    import resource

    preset = tmp_path / "big.yaml"
    _preset_with_aliases(preset, size)

    def limit() -> None:  # 1 GiB of address space: the old behaviour took ~3 GB
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    proc = subprocess.run(
        [sys.executable, "-m", "sagellm_cli", "llm", "preset", "apply", "--dry-run",
         "--file", str(preset)],
        env={**os.environ, "SAGELLM_HOME": str(home)}, capture_output=True, text=True,
        timeout=60, preexec_fn=limit,
    )  # fmt: skip
    line = _one_error_line(proc, 2)
    assert says in line and len(proc.stdout) < 1000


@pytest.mark.parametrize("option", ["--api-key", "--admin-token"])
def test_an_empty_key_is_refused_not_taken_for_none(home, option):
    """`--api-key "$KEY"` with KEY unset must not start a gateway without auth (or, for
    the admin token, with the token file instead of the token the script meant)."""
    proc = sage("llm", "serve", option, "", "--port", "1", home=home, timeout=60)
    assert proc.returncode == 2
    assert f"error: {option} (or $SAGELLM_" in proc.stderr and "is empty" in proc.stderr
    assert "Traceback" not in proc.stderr
    status = sage("llm", "serve", "--status", "--json", home=home, timeout=60)
    assert json.loads(status.stdout) == {"running": False}
