"""The eval folder of `artaug eval` (as `eval/run.py` documents it): where each image lives."""

from __future__ import annotations

import os


def image_path(out_dir: str, arm: str, p: int, k: int) -> str:
    """The image of prompt `p`, seed `k` of an arm: images/{arm}/{prompt:05d}-s{k:02d}.png."""
    return os.path.join(out_dir, "images", arm, f"{p:05d}-s{k:02d}.png")
