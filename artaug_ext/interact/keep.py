"""Which pairs to keep: the filter rule over a scorer's scores of an original and its enhanced image.

Apart from scoring images (`scorers.py`): a scorer says what its scores mean, this module
decides with them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scorers import Scorer


@dataclass
class FilterConfig:
    """When a pair is kept: enhanced beats original by `margin` on every quality score (absolute,
    or relative to |original| when `relative`), and no alignment score drops by more than
    `alignment_tolerance`. With the default 0, a pair whose enhancement changes anything the
    prompt asks for that the scorer reads (the heuristic scorer's `prompt_match`: the named
    colours, shape, position, lighting) is rejected."""

    margin: float = 0.0
    relative: bool = False
    alignment_tolerance: float = 0.0
    quality_keys: list[str] | None = field(default=None)

    def to_dict(self) -> dict:
        return {"margin": self.margin, "relative": self.relative, "alignment_tolerance": self.alignment_tolerance,
                "quality_keys": self.quality_keys}


def keep_pair(original: dict, enhanced: dict, scorer: Scorer, cfg: FilterConfig) -> tuple[bool, str, float]:
    """(keep, why, gain): gain is the smallest quality improvement (relative if configured)."""
    keys = cfg.quality_keys or list(scorer.quality_keys)
    if not keys:
        return False, "the scorer has no quality score", 0.0
    gains = []
    for k in keys:
        a, b = float(original[k]), float(enhanced[k])
        gains.append((b - a) / max(abs(a), 1e-8) if cfg.relative else b - a)
    gain = min(gains)
    if not math.isfinite(gain) or gain <= cfg.margin:
        return False, f"quality gain {gain:.4g} <= margin {cfg.margin:g}", gain
    for k in scorer.alignment_keys:
        a, b = float(original[k]), float(enhanced[k])
        if math.isnan(a) and math.isnan(b):
            continue  # not measurable for this prompt (outside the scorer's grammar): not judged on it
        if not (math.isfinite(a) and math.isfinite(b)):
            return False, f"text alignment {k} is not finite ({a:.4g} -> {b:.4g})", gain
        if b < a - cfg.alignment_tolerance:
            return False, f"text alignment {k} dropped {float(original[k]):.4g} -> {float(enhanced[k]):.4g}", gain
    return True, f"quality gain {gain:.4g} > margin {cfg.margin:g}", gain
