"""Prompt length in tokens: the one conversion from text to a token count.

The model's own tokenizer (transformers' AutoTokenizer) when the model is a local
directory with tokenizer files; otherwise an estimate of `CHARS_PER_TOKEN` characters
per token (English-like text with BPE tokenizers averages about 4). Nothing reaches a
model hub: a hub id is estimated, never downloaded.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

CHARS_PER_TOKEN = 4
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def estimate_tokens(text: str) -> int:
    """`ceil(len(text) / CHARS_PER_TOKEN)`: the count used when no tokenizer is at hand."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@functools.lru_cache(maxsize=32)
def local_tokenizer(model: str) -> Any | None:
    """The tokenizer of a local model directory (cached per path), or None when `model`
    is not a local directory with tokenizer files or transformers can't load it."""
    path = Path(os.path.expanduser(model))
    if not path.is_dir() or not any((path / name).exists() for name in _TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - any load failure means: estimate instead
        return None


def count_tokens(text: str, model: str | None = None) -> int:
    """Tokens in `text` for `model` (its tokenizer if local, else the estimate); no
    special tokens are added (a chat template's are not counted either)."""
    tokenizer = local_tokenizer(model) if model else None
    if tokenizer is None:
        return estimate_tokens(text)
    return len(tokenizer.encode(text, add_special_tokens=False))
