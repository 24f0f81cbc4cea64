"""The PD threshold in tokens: `core.models.tokens.count_tokens` and `length` routing with it."""

from __future__ import annotations

import pytest

from sagellm_cli.core.models.tokens import count_tokens, estimate_tokens
from sagellm_cli.core.records import EngineRecord
from sagellm_cli.gateway.config import GatewayConfig
from sagellm_cli.gateway.routing.backend import Backend
from sagellm_cli.gateway.routing.registry import Registry
from sagellm_cli.gateway.routing.strategies import Length, RouteInfo


def _backend(i: int, role: str, model: str) -> Backend:
    return Backend(EngineRecord(id=f"e{i}", kind="llm", runtime="vllm", model=model,
                                served_model_name="m", host="127.0.0.1", port=9000 + i,
                                status="ready", role=role))  # fmt: skip


def test_the_estimate_is_chars_over_four_without_a_local_tokenizer(tmp_path):
    assert estimate_tokens("") == 0 and estimate_tokens("abcde") == 2
    assert count_tokens("x" * 4000, "org/not-local") == 1000
    assert count_tokens("x" * 4000, str(tmp_path)) == 1000  # a directory with no tokenizer


def test_a_local_model_counts_with_its_own_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    text = "word " * 600
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    expected = len(tokenizer.encode(text, add_special_tokens=False))
    assert count_tokens(text, str(tiny_model)) == expected != estimate_tokens(text)


def test_length_routing_by_tokens(tiny_model):
    text = "word " * 600  # 3000 chars: 750 tokens by the estimate, more by the tokenizer
    assert count_tokens(text, str(tiny_model)) > 800 > estimate_tokens(text)
    local = [_backend(0, "prefill", str(tiny_model)), _backend(1, "decode", str(tiny_model))]
    remote = [_backend(2, "prefill", "org/m"), _backend(3, "decode", "org/m")]
    by_tokens = Length(threshold_tokens=800)
    assert by_tokens.choose(local, RouteInfo({"prompt": text}, None)) is local[0]
    assert by_tokens.choose(remote, RouteInfo({"prompt": text}, None)) is remote[1]
    assert by_tokens.choose(local, RouteInfo({"prompt": "hi"}, None)) is local[1]
    assert Length(2048).choose(remote, RouteInfo({"prompt": text}, None)) is remote[0]  # chars


def test_the_gateway_option_reaches_the_strategy():
    from sagellm_cli.core.errors import BadInput

    reg = Registry(GatewayConfig(routing="length", length_threshold_tokens=800))
    assert reg._strategy_for("llm", "m").threshold_tokens == 800
    with pytest.raises(BadInput, match="length-threshold-tokens"):
        GatewayConfig(length_threshold_tokens=-1).validate()
