"""Build a tiny random-weight Qwen2 chat model offline, for tests that run real vLLM.

The model is ~1 MB, has a ChatML chat template and a byte-level BPE tokenizer
trained on local Python stdlib sources, so nothing is downloaded. Outputs are
random text: tests should check protocol shape, never wording.

Usage:  python tests/tinymodel.py DEST [--broken]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# Bump when the produced files change, so stale cached models are rebuilt.
BUILD_VERSION = 1
MARKER = ".tinymodel-complete"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 2048
# Bounded training text keeps tokenizer training around a second.
TRAIN_BYTES = 1_000_000

# Qwen2's pre-tokenizer split. transformers' Qwen2Tokenizer forces this split
# regardless of tokenizer.json, so training with it keeps every loader consistent.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as used by Qwen2 instruct models. Handles string content and
# OpenAI-style lists of text parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _marker_text(broken: bool) -> str:
    return json.dumps({"version": BUILD_VERSION, "broken": broken})


def is_complete(dest: Path, *, broken: bool = False) -> bool:
    """True if dest already holds a finished build of the requested kind."""
    marker = Path(dest) / MARKER
    try:
        return marker.read_text() == _marker_text(broken)
    except OSError:
        return False


def _training_files() -> list[str]:
    """A deterministic, bounded list of local text files to train the tokenizer on."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            size = path.stat().st_size
        except OSError:
            continue
        files.append(str(path))
        total += size
        if total >= TRAIN_BYTES:
            break
    if not files:
        raise RuntimeError(f"no Python sources found under {stdlib} to train a tokenizer")
    return files


def _build_tokenizer(out: Path) -> dict[str, int]:
    """Train a byte-level BPE tokenizer, save it as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(_training_files(), trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # Make tokenizer_config.json readable by transformers 4.x as well as 5.x:
    # 5.x writes a generic class and a list-valued extra_special_tokens, which
    # 4.x rejects; 4.x also only reads chat_template from this file.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("extra_special_tokens", None)
    cfg.pop("backend", None)
    cfg.update(
        tokenizer_class="Qwen2Tokenizer",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
    )
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


# The tiny shape; `--hidden/--layers` build bigger random models for GPU measurements
# (hidden 2048 x 24 layers is about 1.2 B parameters, 2.4 GB in bf16).
TINY_SHAPE = {"hidden": 64, "layers": 2, "heads": 2, "dtype": "float32"}


def _build_model(
    out: Path, ids: dict[str, int], *, broken: bool, shape: dict | None = None
) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    shape = shape or TINY_SHAPE
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape["hidden"],
        intermediate_size=shape["hidden"] * 2,
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],  # head_dim 32 at least: vLLM CPU rejects 16
        num_key_value_heads=shape["heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        torch_dtype=shape["dtype"],
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, shape["dtype"]))
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    ).save_pretrained(str(out))

    if broken:
        # Config and tokenizer stay valid, so vLLM passes argument/config checks
        # and starts the engine; weight loading then finds no weight files and the
        # server process exits non-zero (no hang).
        for f in out.glob("*.safetensors"):
            f.unlink()


def build_tiny_qwen2(dest: Path, *, broken: bool = False, shape: dict | None = None) -> Path:
    """Create (or reuse) a tiny random Qwen2 chat model in dest and return dest.

    broken=True gives a model directory that vLLM accepts at launch but that
    fails during weight loading, making the server exit non-zero.
    Runs fully offline; safe to call concurrently (atomic rename into place).
    """
    dest = Path(dest)
    if is_complete(dest, broken=broken):
        return dest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    try:
        ids = _build_tokenizer(tmp)
        _build_model(tmp, ids, broken=broken, shape=shape)
        (tmp / MARKER).write_text(_marker_text(broken))
        if dest.exists():
            if is_complete(dest, broken=broken):  # built by a concurrent caller
                return dest
            shutil.rmtree(dest)
        try:
            tmp.rename(dest)
        except OSError:
            # Lost a race with another builder; theirs is as good as ours.
            if not is_complete(dest, broken=broken):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def default_tiny_model() -> Path:
    """The shared tiny chat model (in `$SAGELLM_TEST_MODELS`, else `.tinymodels/`), built
    if missing: the one tests and benchmarks use."""
    root = os.environ.get("SAGELLM_TEST_MODELS") or Path(__file__).resolve().parent.parent / (
        ".tinymodels"
    )
    return build_tiny_qwen2(Path(root) / "tiny-qwen2")


def build_tiny_lora(dest: Path, base: Path, *, rank: int = 8, seed: int = 0) -> Path:
    """A random rank-`rank` LoRA adapter (q_proj, v_proj) for the tiny model at `base`,
    written by hand in PEFT's format (no peft needed); rebuilt only if missing."""
    import torch
    from safetensors.torch import save_file

    dest = Path(dest)
    if (dest / "adapter_model.safetensors").exists():
        return dest
    config = json.loads((Path(base) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = hidden // config["num_attention_heads"]
    out = {"q_proj": hidden, "v_proj": config["num_key_value_heads"] * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out_dim in out.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.02
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        adapter_config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "lora_dropout": 0.0, "bias": "none", "target_modules": list(out),
            "base_model_name_or_path": str(base), "fan_in_fan_out": False,
            "modules_to_save": None, "use_rslora": False, "use_dora": False,
        }  # fmt: skip
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        # Another builder may have won the race; theirs is as good as ours.
        with contextlib.suppress(OSError):
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a tiny random Qwen2 model offline.")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--broken", action="store_true", help="omit weights: vLLM fails at load")
    parser.add_argument("--hidden", type=int, help="hidden size (bigger models, bf16)")
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args(argv)
    start = time.monotonic()
    shape = None
    if args.hidden:
        heads = max(args.hidden // 128, 2)
        shape = {"hidden": args.hidden, "layers": args.layers, "heads": heads, "dtype": "bfloat16"}
    path = build_tiny_qwen2(args.dest, broken=args.broken, shape=shape)
    print(f"{path} ({time.monotonic() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
