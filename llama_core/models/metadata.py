"""Typed, range-checked reads of a GGUF file's `{arch}.*` hyperparameters.

Every key has an accepted range (about 4x the largest released model's), so a corrupt or
hostile value is refused by name, with the file's path, before anything is sized by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ukgpu.llama_core.errors import GGUFError

# Accepted range of each hyperparameter (`{arch}.` + key): about 4x the largest released
# model's, so a corrupt or hostile value is refused by name before anything is sized by it.
_BOUNDS: dict[str, tuple[float, float]] = {
    "block_count": (1, 4096), "embedding_length": (1, 1 << 17), "feed_forward_length": (1, 1 << 20),
    "attention.head_count": (1, 4096), "attention.head_count_kv": (1, 4096),
    "attention.key_length": (1, 4096), "rope.dimension_count": (2, 4096), "context_length": (1, 1 << 24),
    "rope.scaling.original_context_length": (1, 1 << 24), "attention.value_length": (1, 4096),
    "attention.sliding_window": (0, 1 << 24),
    # floats: finite and above the lower bound
    "rope.freq_base": (0.0, 1e12), "rope.scaling.factor": (0.0, 1e4), "attention.layer_norm_rms_epsilon": (0.0, 1.0),
    "rope.freq_base_swa": (0.0, 1e12), "rope.scaling.attn_factor": (0.0, 1e3),
    "rope.scaling.yarn_ext_factor": (-1.0, 1e3), "rope.scaling.yarn_attn_factor": (0.0, 1e3),
    "rope.scaling.yarn_beta_fast": (0.0, 1e4), "rope.scaling.yarn_beta_slow": (0.0, 1e4),
}
_ANY = (-math.inf, math.inf)


class Meta:
    """Typed, range-checked reads of `{arch}.*` keys with errors naming the key and the file."""

    def __init__(self, metadata: Mapping[str, Any], arch: str, path: Path):
        self.metadata, self.arch, self.path = metadata, arch, path

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        full = key.replace("{arch}", self.arch)
        if full not in self.metadata:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata key {full!r} is missing: the file is not a complete "
                                f"{self.arch} model")
            return default
        value = self.metadata[full]
        if not _is_kind(value, kind):
            raise GGUFError(f"{self.path}: metadata key {full!r} should be {kind.__name__}, got {value!r:.80}")
        value = kind(value)
        lo, hi = _BOUNDS.get(key.removeprefix("{arch}."), _ANY)
        if kind in (int, float) and not _in_range(value, lo, hi):
            raise GGUFError(f"{self.path}: metadata key {full!r} = {value} is outside {lo:g}..{hi:g}:"
                            " the file is corrupt")
        return value

    def fail(self, key: str, why: str) -> GGUFError:
        return GGUFError(f"{self.path}: metadata key {key.replace('{arch}', self.arch)!r} {why}: the file is corrupt")


def _in_range(value: float, lo: float, hi: float) -> bool:
    """lo <= value <= hi for an int; lo < value <= hi, and finite, for a float."""
    if isinstance(value, int):
        return lo <= value <= hi
    return math.isfinite(value) and lo < value <= hi


def _is_kind(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)
