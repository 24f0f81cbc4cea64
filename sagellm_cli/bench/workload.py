"""What the bench sends: synthetic prompts or a JSONL dataset, with a priority/SLO mix.

Every request is a pure function of (seed, index), so two runs with the same
options send the same prompts in the same order whatever the load pattern.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm_cli.core.errors import BadInput

PRIORITY_CLASSES = ("critical", "high", "normal", "low")
DEFAULT_CLASS = "default"
CHARS_PER_TOKEN = 4  # the usual estimate for English text when no tokenizer is at hand

# Plain words, so that prompts look like text to a tokenizer (random bytes would
# tokenize into many more tokens than characters / 4).
_WORD_TEXT = (
    "the of and to in is it you that was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find "
    "any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell "
    "does set three want air well also play small end put home read hand port large spell add "
    "even land here must big high such follow act why ask men change went light kind off need "
    "house picture try us again animal point mother world near build self earth father head "
    "stand own page should country found answer school grow study still learn plant cover food "
    "sun four between state keep eye never last let thought city tree cross farm hard start "
    "might story saw far sea draw left late run while press close night real life few north"
)
_WORDS = tuple(_WORD_TEXT.split())


# ---------------------------------------------------------------- parsing options


@dataclass(frozen=True)
class LengthSpec:
    """A token length: fixed (`128`), `uniform:LO-HI` or `normal:MEAN,STD` (clipped to >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str | int, option: str) -> LengthSpec:
        """Parse an option value; BadInput names the option and the accepted forms."""
        raw = str(text).strip()
        forms = f"write {option} as 128, uniform:64-256 or normal:128,32"
        try:
            if ":" not in raw:
                value = int(raw)
                if value < 1:
                    raise ValueError
                return cls("fixed", value)
            kind, _, rest = raw.partition(":")
            kind = kind.strip().lower()
            if kind == "uniform":
                lo, _, hi = rest.partition("-")
                lo_i, hi_i = int(lo), int(hi)
                if lo_i < 1 or hi_i < lo_i:
                    raise ValueError
                return cls("uniform", lo_i, hi_i)
            if kind == "normal":
                mean, _, std = rest.partition(",")
                mean_f, std_f = float(mean), float(std)
                if mean_f < 1 or std_f < 0:
                    raise ValueError
                return cls("normal", mean_f, std_f)
        except ValueError:
            pass
        raise BadInput(f"{option} {raw!r} is not a length", hint=forms)

    def sample(self, rng: random.Random) -> int:
        """One length drawn from `rng`."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def mean(self) -> float:
        """The expected length (before clipping, for `normal`)."""
        return self.a if self.kind != "uniform" else (self.a + self.b) / 2

    def describe(self) -> str:
        """Back to the option's syntax."""
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}-{int(self.b)}"
        return f"normal:{self.a:g},{self.b:g}"


def parse_mix(text: str | None) -> list[tuple[str, float]]:
    """`critical:0.1,normal:0.9` -> [("critical", 0.1), ("normal", 0.9)], weights normalised."""
    if not text:
        return []
    hint = 'write --mix as "critical:0.1,normal:0.9" with classes ' + "|".join(PRIORITY_CLASSES)
    mix: list[tuple[str, float]] = []
    for part in text.split(","):
        name, sep, weight = part.strip().partition(":")
        name = name.strip().lower()
        if not sep or name not in PRIORITY_CLASSES:
            raise BadInput(f"--mix entry {part.strip()!r} is not CLASS:WEIGHT", hint=hint)
        try:
            value = float(weight)
        except ValueError:
            raise BadInput(f"--mix weight {weight!r} is not a number", hint=hint) from None
        if value < 0 or not math.isfinite(value):
            raise BadInput(f"--mix weight {weight!r} must be >= 0", hint=hint)
        if any(existing == name for existing, _ in mix):
            raise BadInput(f"--mix names {name!r} twice", hint=hint)
        mix.append((name, value))
    total = sum(w for _, w in mix)
    if total <= 0:
        raise BadInput("--mix weights add up to 0", hint=hint)
    return [(name, w / total) for name, w in mix]


def parse_slo(text: str | float | None, option: str) -> dict[str, float]:
    """`500` -> {"*": 500}; `critical:200,normal:2000` -> per-class milliseconds."""
    if text is None or text == "":
        return {}
    hint = f"write {option} as milliseconds (500) or per class (critical:200,normal:2000)"
    out: dict[str, float] = {}
    for part in str(text).split(","):
        name, sep, value = part.strip().rpartition(":")
        name = name.strip().lower() if sep else "*"
        if sep and name not in PRIORITY_CLASSES and name != DEFAULT_CLASS:
            raise BadInput(f"{option}: unknown class {name!r}", hint=hint)
        try:
            ms = float(value)
        except ValueError:
            raise BadInput(f"{option} {part.strip()!r} is not milliseconds", hint=hint) from None
        if ms <= 0 or not math.isfinite(ms):
            raise BadInput(f"{option} {part.strip()!r} must be > 0", hint=hint)
        out[name] = ms
    return out


def _slo_for(slos: dict[str, float], cls: str) -> float | None:
    return slos.get(cls, slos.get("*"))


# ---------------------------------------------------------------- token counting


class TokenCounter:
    """Counts and makes text of a given token length.

    With a local model directory holding `tokenizer.json`, the model's own
    tokenizer is used (the `tokenizers` library, loaded on first use: never
    transformers, which costs seconds to import). Otherwise lengths are
    estimated at ~4 characters per token.
    """

    def __init__(self, tokenizer_file: Path | None = None):
        self.tokenizer_file = tokenizer_file
        self._tok: Any = None

    @classmethod
    def for_model(cls, model: str | None, tokenizer: str | None = None) -> TokenCounter:
        """The model's tokenizer when `tokenizer` or `model` is a local dir, else the estimate."""
        if tokenizer:
            path = Path(tokenizer).expanduser()
            file = path / "tokenizer.json" if path.is_dir() else path
            if not file.is_file():
                raise BadInput(
                    f"--tokenizer {tokenizer!r} has no tokenizer.json",
                    hint="point it at a model directory or a tokenizer.json file",
                )
            return cls(file)
        if model:
            file = Path(model).expanduser() / "tokenizer.json"
            if file.is_file():
                return cls(file)
        return cls(None)

    @property
    def kind(self) -> str:
        """`tokenizer:PATH` or `estimate:4chars`, for the report."""
        if self.tokenizer_file is None:
            return f"estimate:{CHARS_PER_TOKEN}chars"
        return f"tokenizer:{self.tokenizer_file}"

    def _tokenizer(self):
        if self._tok is None:
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise BadInput(
                    "counting tokens with the model's tokenizer needs the `tokenizers` package",
                    hint="pip install tokenizers, or leave out --tokenizer",
                ) from None
            try:
                self._tok = Tokenizer.from_file(str(self.tokenizer_file))
            except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
                raise BadInput(
                    f"can't load {self.tokenizer_file}: {exc}",
                    hint="pass --tokenizer with a valid tokenizer.json",
                ) from None
        return self._tok

    def count(self, text: str) -> int:
        """Tokens in `text` (no special tokens added)."""
        if self.tokenizer_file is None:
            return max(1, round(len(text) / CHARS_PER_TOKEN)) if text else 0
        return len(self._tokenizer().encode(text, add_special_tokens=False).ids)

    def make_text(self, n_tokens: int, rng: random.Random) -> str:
        """Random words that come to about `n_tokens` tokens."""
        if n_tokens <= 0:
            return ""
        if self.tokenizer_file is None:
            target = n_tokens * CHARS_PER_TOKEN
            # Words average ~4.5 characters with their space: draw a few too many, cut.
            text = " ".join(rng.choices(_WORDS, k=n_tokens + 8))
            while len(text) < target:  # pragma: no cover - only with very short words
                text += " " + " ".join(rng.choices(_WORDS, k=n_tokens))
            return text[:target].rstrip() or "a"
        tok = self._tokenizer()
        # A word is at most a few tokens: draw enough, then cut at exactly n ids.
        text = " ".join(rng.choices(_WORDS, k=n_tokens + 8))
        ids = tok.encode(text, add_special_tokens=False).ids
        while len(ids) < n_tokens:  # pragma: no cover - only with odd tokenizers
            text += " " + " ".join(rng.choices(_WORDS, k=n_tokens))
            ids = tok.encode(text, add_special_tokens=False).ids
        return tok.decode(ids[:n_tokens])


# ---------------------------------------------------------------- requests


@dataclass
class BenchRequest:
    """One request's content; the load module turns it into HTTP for an endpoint."""

    index: int
    cls: str = DEFAULT_CLASS
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    input_tokens: int | None = None
    slo_ttft_ms: float | None = None
    slo_e2e_ms: float | None = None
    priority_set: bool = False  # whether to send X-Priority (a mix or the dataset named it)

    def text(self) -> str:
        """The prompt as one string (messages joined), for completions and embeddings."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(_content_text(m.get("content")) for m in self.messages or [])

    def chat_messages(self) -> list[dict[str, Any]]:
        """The prompt as chat messages."""
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.prompt or ""}]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


@dataclass
class DatasetEntry:
    """One line of a `--dataset` JSONL file."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    priority: str | None = None
    max_tokens: int | None = None


def load_dataset(path: str | Path) -> list[DatasetEntry]:
    """Read a JSONL file of {"prompt": ...} or {"messages": [...]} with optional priority/max_tokens."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise BadInput(
            f"--dataset {str(path)!r} is not a file", hint="pass a JSONL file of prompts"
        )
    hint = 'each line must be {"prompt": "..."} or {"messages": [...]}'
    entries: list[DatasetEntry] = []
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{file.name}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{where} is not JSON ({exc.msg})", hint=hint) from None
            if not isinstance(obj, dict):
                raise BadInput(f"{where} is not a JSON object", hint=hint)
            prompt, messages = obj.get("prompt"), obj.get("messages")
            if isinstance(prompt, str) == isinstance(messages, list):
                raise BadInput(
                    f"{where} needs exactly one of prompt (string) or messages (list)", hint=hint
                )
            if messages is not None and not all(
                isinstance(m, dict) and "role" in m for m in messages
            ):
                raise BadInput(f"{where}: every message needs a role", hint=hint)
            priority = obj.get("priority")
            if priority is not None:
                priority = str(priority).lower()
                if priority not in PRIORITY_CLASSES:
                    raise BadInput(
                        f"{where}: priority {obj.get('priority')!r} is not one of "
                        + "|".join(PRIORITY_CLASSES),
                        hint=hint,
                    )
            max_tokens = obj.get("max_tokens")
            if max_tokens is not None and (
                not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
            ):
                raise BadInput(f"{where}: max_tokens must be a positive integer", hint=hint)
            entries.append(DatasetEntry(prompt, messages, priority, max_tokens))
    if not entries:
        raise BadInput(f"--dataset {str(path)!r} has no prompts", hint=hint)
    return entries


@dataclass
class WorkloadConfig:
    """Everything that decides what is sent (not when)."""

    input_len: LengthSpec = field(default_factory=lambda: LengthSpec("fixed", 128))
    output_len: LengthSpec = field(default_factory=lambda: LengthSpec("fixed", 128))
    shared_prefix_len: int = 0
    mix: list[tuple[str, float]] = field(default_factory=list)
    slo_ttft_ms: dict[str, float] = field(default_factory=dict)
    slo_e2e_ms: dict[str, float] = field(default_factory=dict)
    dataset: list[DatasetEntry] | None = None
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for the result file."""
        return {
            "input_len": None if self.dataset else self.input_len.describe(),
            "output_len": self.output_len.describe(),
            "shared_prefix_len": self.shared_prefix_len,
            "mix": dict(self.mix) or None,
            "slo_ttft_ms": self.slo_ttft_ms or None,
            "slo_e2e_ms": self.slo_e2e_ms or None,
            "dataset_size": len(self.dataset) if self.dataset else None,
            "seed": self.seed,
        }


class Workload:
    """Makes request `index` deterministically from the seed."""

    def __init__(self, config: WorkloadConfig, counter: TokenCounter | None = None):
        self.config = config
        self.counter = counter or TokenCounter(None)
        self._prefix: str | None = None

    @property
    def prefix(self) -> str:
        """The shared prefix (the same for every request of a run)."""
        if self._prefix is None:
            n = self.config.shared_prefix_len
            rng = random.Random(f"{self.config.seed}:prefix")
            self._prefix = self.counter.make_text(n, rng) if n > 0 else ""
        return self._prefix

    def _class(self, rng: random.Random) -> str:
        mix = self.config.mix
        if not mix:
            return DEFAULT_CLASS
        x = rng.random()
        for name, weight in mix:
            x -= weight
            if x < 0:
                return name
        return mix[-1][0]

    def request(self, index: int, *, warmup: bool = False) -> BenchRequest:
        """Request number `index`; warm-up requests come from their own stream."""
        cfg = self.config
        rng = random.Random(f"{cfg.seed}:{'warmup' if warmup else 'req'}:{index}")
        cls = self._class(rng)
        priority_set = bool(cfg.mix)
        max_tokens = cfg.output_len.sample(rng)
        if cfg.dataset:
            entry = cfg.dataset[index % len(cfg.dataset)]
            if entry.priority:
                cls, priority_set = entry.priority, True
            if entry.max_tokens:
                max_tokens = entry.max_tokens
            req = BenchRequest(
                index, cls, entry.prompt, entry.messages, max_tokens, priority_set=priority_set
            )
            req.input_tokens = self.counter.count(req.text())
        else:
            n_in = cfg.input_len.sample(rng)
            # The request number leads the unique part, so that no two requests share
            # more than the intended prefix (prefix caching would flatter the numbers).
            unique = f"{index}: " + self.counter.make_text(n_in, rng)
            prompt = f"{self.prefix} {unique}" if self.prefix else unique
            req = BenchRequest(index, cls, prompt, None, max_tokens, priority_set=priority_set)
            req.input_tokens = self.counter.count(prompt)
        req.slo_ttft_ms = _slo_for(cfg.slo_ttft_ms, cls)
        req.slo_e2e_ms = _slo_for(cfg.slo_e2e_ms, cls)
        return req
