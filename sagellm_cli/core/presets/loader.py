"""Finding presets: built-ins shipped with sagellm, or a file given by the user."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sagellm_cli.core.errors import BadInput, NotFound
from sagellm_cli.core.presets.schema import PresetConfig, read_preset_file
from sagellm_cli.core.records import AppliedPreset

_PACKAGE_DIR = Path(__file__).resolve().parent.parent.parent  # sagellm_cli/


def builtin_dir() -> Path | None:
    """The folder of built-in presets: `sagellm_cli/_presets` in a wheel, `presets/` in a checkout."""
    for candidate in (_PACKAGE_DIR / "_presets", _PACKAGE_DIR.parent / "presets"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return None


@dataclass
class LoadedPreset:
    """A validated preset and where it came from."""

    config: PresetConfig
    path: Path
    builtin: bool

    @property
    def name(self) -> str:
        return self.config.name


def builtin_paths() -> dict[str, Path]:
    """Built-in preset name (the file stem) -> file."""
    folder = builtin_dir()
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def list_builtin() -> list[LoadedPreset]:
    """Every built-in preset, validated."""
    return [
        LoadedPreset(read_preset_file(path), path, builtin=True)
        for path in builtin_paths().values()
    ]


def load_builtin(name: str) -> LoadedPreset:
    """A built-in preset by name (exit 3 with a suggestion if unknown)."""
    known = builtin_paths()
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise NotFound(
            f"no built-in preset {name!r}",
            hint=f"{hint}see `sage llm preset list`, or pass --file PATH",
        )
    return LoadedPreset(read_preset_file(known[name]), known[name], builtin=True)


def load_file(path: str | Path) -> LoadedPreset:
    """A preset from a user file."""
    resolved = Path(path).expanduser().resolve()
    return LoadedPreset(read_preset_file(resolved), resolved, builtin=False)


def load(name: str | None = None, file: str | Path | None = None) -> LoadedPreset:
    """Exactly one of a built-in `name` or a `file`."""
    if (name is None) == (file is None):
        raise BadInput("give a preset name or --file (not both)", hint="sage llm preset list")
    return load_builtin(name) if name is not None else load_file(file)


@dataclass
class PresetSummary:
    """One row of `sage llm preset list`: a built-in preset, or one applied from a file."""

    name: str
    description: str
    engines: int
    file: str | None
    applied: bool

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return asdict(self)


def summaries(applied: dict[str, AppliedPreset]) -> list[PresetSummary]:
    """Every built-in preset, then presets applied from files (so `down` targets show up)."""
    rows = [
        PresetSummary(
            p.name,
            p.config.description,
            sum(e.replicas for e in p.config.engines),
            str(p.path),
            p.name in applied,
        )
        for p in list_builtin()
    ]
    builtin = {row.name for row in rows}
    rows += [
        PresetSummary(name, entry.description, len(entry.engines), entry.file, True)
        for name, entry in sorted(applied.items())
        if name not in builtin
    ]
    return rows
