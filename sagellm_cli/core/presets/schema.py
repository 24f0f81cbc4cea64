"""The preset file format (version 1): strict pydantic models and line-aware YAML loading.

Every problem is reported with the file and line it comes from, the engine it belongs
to, and a "did you mean" suggestion for misspelt keys, so that a user can fix a preset
without reading a traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.inputs.limits import MAX_PRESET_EXPANDED_BYTES, MAX_PRESET_FILE_BYTES
from sagellm_cli.core.inputs.spec_schema import STRICT, engine_options_model, error_message
from sagellm_cli.core.inputs.spec_schema import key_path as spec_key
from sagellm_cli.core.records import NAME_PATTERN

MAX_REPLICAS = 64


# --------------------------------------------------------------------------- models


class EngineConfig(engine_options_model(preset=True)):
    """One `engines:` entry: EngineSpec's options plus a name and `replicas: N`
    (N identical engines)."""

    model_config = STRICT

    name: str = Field(pattern=NAME_PATTERN)
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    # An engine something else runs (docs/cluster.md): registered by URL, never started;
    # `model` then names the model it serves (default: the only one its /v1/models lists).
    url: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _url_stands_for_model(cls, data: Any) -> Any:
        # Without `model`, the URL stands in for it until registration asks the server
        # (`served_model()`); `model` stays required for engines started here.
        if isinstance(data, dict) and data.get("url") and "model" not in data:
            return {**data, "model": data["url"]}
        return data

    @model_validator(mode="after")
    def _one_server(self) -> EngineConfig:
        if self.url is not None and self.replicas != 1:
            raise ValueError("an engine given by 'url' is one server: no 'replicas'")
        return self

    def served_model(self) -> str | None:
        """An external engine's model as written, None when left to the server."""
        return None if self.model == self.url else self.model

    @field_validator("env", mode="before")
    @classmethod
    def _numbers_as_strings(cls, value: Any) -> Any:
        # `OMP_NUM_THREADS: 2` is what people write in YAML; environment values are strings.
        if isinstance(value, dict):
            return {
                k: (str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                for k, v in value.items()
            }
        return value

    def engine_label(self, preset: str, replica: int) -> str:
        """The label of replica `replica` (1-based): `<label>` or `<label>-<i>` with replicas."""
        base = self.label or f"{preset}-{self.name}"
        return base if self.replicas == 1 else f"{base}-{replica}"

    def engine_port(self, replica: int) -> int | None:
        """Replicas of an engine with a fixed port take consecutive ports."""
        return None if self.port is None else self.port + replica - 1


class PresetConfig(BaseModel):
    """A whole preset file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: Literal[1]
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    # A Ray cluster for every engine that names none (docs/cluster.md).
    cluster: str | None = Field(None, min_length=1)
    engines: list[EngineConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _cluster_for_every_engine(self) -> PresetConfig:
        for engine in self.engines:
            if engine.cluster is None and engine.url is None:
                engine.cluster = self.cluster
        return self


ENGINE_KEYS: tuple[str, ...] = tuple(EngineConfig.model_fields)
TOP_KEYS: tuple[str, ...] = tuple(PresetConfig.model_fields)


# --------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """One thing wrong with a preset file."""

    file: str
    line: int | None
    message: str
    engine: str | None = None
    key: str | None = None
    suggestion: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        who = f"engine {self.engine!r}: " if self.engine else ""
        hint = f" (did you mean {self.suggestion!r}?)" if self.suggestion else ""
        return f"{where}: {who}{self.message}{hint}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "engine": self.engine,
            "key": self.key,
            "message": self.message,
            "suggestion": self.suggestion,
        }


class PresetInvalid(BadInput):
    """A preset file that can't be used (exit 2); `problems` lists every issue found."""

    def __init__(self, problems: list[Problem]):
        first = str(problems[0])
        more = f" and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
        details = "\n".join(str(p) for p in problems) if len(problems) > 1 else None
        super().__init__(
            f"invalid preset: {first}{more}",
            hint="see docs/presets.md for the schema",
            details=details,
        )
        self.problems = problems

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["problems"] = [p.to_dict() for p in self.problems]
        return data


# --------------------------------------------------------------------------- YAML with lines


class LineDict(dict):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class LineList(list):
    """A sequence that remembers its line and the line of each item."""

    line: int = 0
    item_lines: list[int]


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int):
        self.key, self.line, self.first = key, line, first


# A real preset has a few dozen nodes, a handful of levels and few aliases. Aliases are
# shared when composed but copied when validated, so a 400-byte "billion laughs" file
# expands to gigabytes: the composed graph is measured before anything is constructed.
MAX_YAML_NODES = 100_000
MAX_YAML_ALIASES = 100
MAX_YAML_DEPTH = 32


class _TooComplex(Exception):
    def __init__(self, what: str):
        self.what = what


def _measure(node: yaml.Node) -> None:
    """Raise _TooComplex if `node`, with aliases expanded, is too big, deep or aliased."""
    # id(node) -> (expanded values, height, expanded bytes of its scalars)
    seen: dict[int, tuple[int, int, int]] = {}
    aliases = 0

    def walk(current: yaml.Node, depth: int) -> tuple[int, int, int]:
        nonlocal aliases
        if depth > MAX_YAML_DEPTH:
            raise _TooComplex(f"nested more than {MAX_YAML_DEPTH} levels deep")
        known = seen.get(id(current))
        if known is not None:
            # Each edge is walked once, so a node met again is one alias use.
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise _TooComplex(f"more than {MAX_YAML_ALIASES} aliases")
            if known[1] + depth > MAX_YAML_DEPTH:
                raise _TooComplex(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return known
        children: list[yaml.Node] = []
        if isinstance(current, yaml.SequenceNode):
            children = list(current.value)
        elif isinstance(current, yaml.MappingNode):
            children = [n for pair in current.value for n in pair]
        size, height = 1, 0
        # A scalar's characters: what constructing, validating and printing it costs.
        nbytes = len(current.value) if isinstance(current, yaml.ScalarNode) else 0
        for child in children:
            child_size, child_height, child_bytes = walk(child, depth + 1)
            size += child_size
            nbytes += child_bytes
            height = max(height, child_height + 1)
            if size > MAX_YAML_NODES:
                raise _TooComplex(f"more than {MAX_YAML_NODES} values once aliases are expanded")
            if nbytes > MAX_PRESET_EXPANDED_BYTES:
                raise _TooComplex(
                    f"more than {MAX_PRESET_EXPANDED_BYTES} bytes once aliases are expanded"
                )
        seen[id(current)] = (size, height, nbytes)
        return size, height, nbytes

    walk(node, 0)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and lists carry line numbers, and that rejects duplicate keys,
    alias bombs and absurd nesting."""

    def get_single_node(self) -> yaml.Node | None:
        """Compose the document, then refuse it if it is too big to construct safely."""
        node = super().get_single_node()
        if node is not None:
            _measure(node)
        return node


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in result:
            raise _DuplicateKey(key, line, result.key_lines[key])
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _plain(value: Any) -> Any:
    """Strip the line-tracking types so pydantic sees ordinary dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_yaml(text: str, file: str) -> Any:
    """Parse YAML keeping line numbers; raise PresetInvalid for syntax errors and duplicate keys."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise PresetInvalid(
            [
                Problem(
                    file,
                    dup.line,
                    f"duplicate key {dup.key!r} (first at line {dup.first})",
                    key=str(dup.key),
                )
            ]
        ) from None
    except _TooComplex as exc:
        raise PresetInvalid([Problem(file, None, f"YAML is too complex: {exc.what}")]) from None
    except RecursionError:
        # The composer recurses once per level; `[[[[...` thousands deep ends here.
        raise PresetInvalid(
            [Problem(file, None, f"YAML is too complex: nested more than {MAX_YAML_DEPTH} levels")]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PresetInvalid([Problem(file, line, f"invalid YAML: {what}")]) from None


# --------------------------------------------------------------------------- validation


def _suggest(key: Any, choices: tuple[str, ...]) -> str | None:
    matches = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _locate(raw: Any, loc: tuple[Any, ...]) -> tuple[int | None, str | None]:
    """The line of the deepest located element of `loc`, and the engine name on the way."""
    node, line, engine = raw, getattr(raw, "line", None), None
    for depth, part in enumerate(loc):
        if isinstance(node, LineDict) and part in node:
            line = node.key_lines.get(part, line)
            node = node[part]
        elif isinstance(node, LineList) and isinstance(part, int) and 0 <= part < len(node):
            line = node.item_lines[part]
            node = node[part]
            if depth == 1 and loc[0] == "engines" and isinstance(node, dict):
                name = node.get("name")
                engine = name if isinstance(name, str) else f"#{part + 1}"
        else:
            break
    return line, engine


def _describe_error(err: dict[str, Any], raw: Any, file: str) -> Problem:
    loc = tuple(err["loc"])
    line, engine = _locate(raw, loc)
    in_engine = len(loc) >= 2 and loc[0] == "engines" and isinstance(loc[1], int)
    key_path = loc[2:] if in_engine else loc
    key = spec_key(key_path)
    kind = err["type"]
    if kind == "extra_forbidden":
        name = key_path[-1] if key_path else loc[-1]
        choices = ENGINE_KEYS if in_engine and len(key_path) == 1 else TOP_KEYS
        return Problem(
            file,
            line,
            f"unknown key {str(name)!r}",
            engine=engine,
            key=str(name),
            suggestion=_suggest(name, choices),
        )
    if kind == "missing":
        # The line of the mapping that lacks the key.
        parent_line, _ = _locate(raw, loc[:-1])
        return Problem(file, parent_line, f"missing required key {key!r}", engine=engine, key=key)
    if kind == "literal_error" and key == "version":
        message = f"unsupported version {_short(err.get('input'))}; this sagellm reads version 1"
        return Problem(file, line, message, engine=engine, key=key)
    return Problem(file, line, error_message(err, key), engine=engine, key=key)


def _semantic_problems(preset: PresetConfig, raw: Any, file: str) -> list[Problem]:
    """Checks across engines: unique names, labels and fixed ports."""
    problems: list[Problem] = []
    seen_names: dict[str, int] = {}
    seen_labels: dict[str, str] = {}
    seen_ports: dict[int, str] = {}
    for index, engine in enumerate(preset.engines):
        line, _ = _locate(raw, ("engines", index, "name"))
        if engine.name in seen_names:
            problems.append(
                Problem(
                    file,
                    line,
                    f"duplicate engine name {engine.name!r} (also engine #{seen_names[engine.name] + 1})",
                    engine=engine.name,
                    key="name",
                )
            )
            continue
        seen_names[engine.name] = index
        for replica in range(1, engine.replicas + 1):
            label = engine.engine_label(preset.name, replica)
            if label in seen_labels:
                label_line, _ = _locate(raw, ("engines", index, "label"))
                problems.append(
                    Problem(
                        file,
                        label_line or line,
                        f"label {label!r} is also used by engine {seen_labels[label]!r}",
                        engine=engine.name,
                        key="label",
                    )
                )
            seen_labels[label] = engine.name
            port = engine.engine_port(replica)
            if port is not None:
                if port > 65535:
                    problems.append(
                        Problem(
                            file,
                            _locate(raw, ("engines", index, "port"))[0],
                            f"replica {replica} would need port {port}, above 65535",
                            engine=engine.name,
                            key="port",
                        )
                    )
                elif port in seen_ports:
                    problems.append(
                        Problem(
                            file,
                            _locate(raw, ("engines", index, "port"))[0],
                            f"port {port} is also used by engine {seen_ports[port]!r}",
                            engine=engine.name,
                            key="port",
                        )
                    )
                seen_ports[port] = engine.name
    return problems


def parse_preset(text: str, file: str) -> PresetConfig:
    """Parse and validate a preset document; raise PresetInvalid listing every problem."""
    if len(text) > MAX_PRESET_FILE_BYTES:
        raise PresetInvalid(
            [Problem(file, None, f"the preset is larger than {MAX_PRESET_FILE_BYTES} bytes")]
        )
    raw = load_yaml(text, file)
    if not isinstance(raw, dict):
        raise PresetInvalid(
            [Problem(file, getattr(raw, "line", 1) or 1, "the top level must be a mapping")]
        )
    try:
        preset = PresetConfig.model_validate(_plain(raw))
    except ValidationError as exc:
        errors = exc.errors()
        problems = [_describe_error(err, raw, file) for err in errors]
        # Group by engine (file order); within one, unknown keys (with their suggestion)
        # first, because a misspelt key usually also causes the "missing key" error.
        order = {"extra_forbidden": 0, "missing": 2}

        def rank(pair: tuple[dict[str, Any], Problem]) -> tuple[int, int, int]:
            err, problem = pair
            group = _locate(raw, tuple(err["loc"])[:2])[0] if err["loc"][0] == "engines" else 0
            return (group or 0, order.get(err["type"], 1), problem.line or 0)

        problems = [p for _, p in sorted(zip(errors, problems, strict=True), key=rank)]
        raise PresetInvalid(problems) from None
    problems = _semantic_problems(preset, raw, file)
    if problems:
        raise PresetInvalid(problems)
    return preset


def read_preset_file(path: Path) -> PresetConfig:
    """Read and validate a preset file (exit 3 if it does not exist, 2 if invalid)."""
    from sagellm_cli.core.errors import NotFound

    try:
        # Read one byte past the limit only: a huge file (or /dev/zero) is never loaded.
        with path.open("rb") as fh:
            data = fh.read(MAX_PRESET_FILE_BYTES + 1)
        if len(data) > MAX_PRESET_FILE_BYTES:
            raise BadInput(
                f"preset file {path} is larger than {MAX_PRESET_FILE_BYTES} bytes",
                hint="a preset is a few KiB; split it or remove what is not needed",
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise NotFound(f"preset file {path} does not exist") from None
    except IsADirectoryError:
        raise BadInput(f"preset file {path} is a directory") from None
    except UnicodeDecodeError:
        raise BadInput(f"preset file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise BadInput(f"cannot read preset file {path}: {exc.strerror}") from None
    return parse_preset(text, str(path))
