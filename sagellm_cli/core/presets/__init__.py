"""Presets: YAML files of engines that `sage llm preset apply` brings up as one unit.

schema (the file format), loader (built-ins and files), plan (what apply will do,
computed without side effects), apply (start, wait, roll back; down).
"""

from sagellm_cli.core.presets.apply import ApplyResult, EngineEvent, apply_plan, down
from sagellm_cli.core.presets.loader import (
    LoadedPreset,
    PresetSummary,
    list_builtin,
    load,
    summaries,
)
from sagellm_cli.core.presets.plan import PresetPlan, make_plan
from sagellm_cli.core.presets.schema import PresetConfig, PresetInvalid, parse_preset

__all__ = [
    "ApplyResult",
    "EngineEvent",
    "LoadedPreset",
    "PresetConfig",
    "PresetInvalid",
    "PresetPlan",
    "PresetSummary",
    "apply_plan",
    "down",
    "list_builtin",
    "load",
    "make_plan",
    "parse_preset",
    "summaries",
]
