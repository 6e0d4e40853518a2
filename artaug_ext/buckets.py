"""Aspect-ratio buckets: the size an image of a requested size is made and trained at.

A prompt may ask for a size (W x H, a prompt file's `size` column). FLUX works on 16-pixel
patches, and one batch must hold images of one shape, so sizes are snapped to buckets under a
pixel budget (the run's size, W0 x H0, or `[train] resolution` squared):

- a requested size whose area fits the budget is its own bucket (its sides are multiples of
  16, as every requested size must be);
- a larger one is scaled down to the budget: among the largest sizes on the 16-pixel grid within
  it (each width with the largest height the budget allows, and each height with the largest
  width), the one whose aspect W/H is nearest the requested one (by |log(W/H) - log(w/h)|),
  then the one of larger area, then the wider one.

So the area never exceeds the budget, a square request on a square budget is the budget's
size, and the same request always lands in the same bucket. Training (`training_bucket`) uses
the same rule with `[train] resolution` squared as the budget: each pair is resized to its
bucket there, and a training batch holds pairs of one bucket (`train.loop.BucketBatches`).
"""

from __future__ import annotations

import math
import re

PATCH = 16  # FLUX's patch side in pixels: every side a multiple of it
MAX_SIDE = 8192  # a requested side above this is refused (FLUX.1-dev is trained up to about 2 megapixels)
MAX_ASPECT = 8.0  # a requested aspect beyond 8:1 (either way) is refused
SIZE_FORMAT = "WxH, e.g. 1024x768 (width x height, multiples of 16)"

_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


class SizeError(ValueError):
    """A requested size that cannot be used: `problem` and `fix`, for a message naming where it was written."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}; {fix}")


def check_size(width, height) -> tuple[int, int]:
    """A requested (width, height) when it can be used; SizeError otherwise."""
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (width, height)):
        raise SizeError(f"size {width!r}x{height!r} is not two whole numbers", f"write {SIZE_FORMAT}")
    if width <= 0 or height <= 0:
        raise SizeError(f"size {width}x{height} has a side of 0 or less", f"write {SIZE_FORMAT}")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise SizeError(f"size {width}x{height} has a side above {MAX_SIDE} pixels",
                        f"ask for at most {MAX_SIDE}x{MAX_SIDE} (larger requests are scaled down to the run's size)")
    if width % PATCH or height % PATCH:
        near = [max(PATCH, (side + PATCH // 2) // PATCH * PATCH) for side in (width, height)]  # nearest, halves up
        raise SizeError(f"size {width}x{height}: both sides must be multiples of {PATCH} (FLUX's patches)",
                        f"use {near[0]}x{near[1]}")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise SizeError(f"size {width}x{height} is more elongated than {MAX_ASPECT:g}:1",
                        "ask for a less extreme aspect")
    return width, height


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) of a size written as WxH; SizeError with what is wrong and the fix."""
    match = _SIZE.match(str(text))
    if not match:
        raise SizeError(f"size {str(text)!r} is not WxH", f"write {SIZE_FORMAT}")
    return check_size(int(match.group(1)), int(match.group(2)))


def bucket_size(width: int, height: int, area: int) -> tuple[int, int]:
    """The bucket (W, H) of a requested size under a pixel budget `area` (the module docstring's rule)."""
    if area < PATCH * PATCH:
        raise ValueError(f"a pixel budget of {area} is below one {PATCH}x{PATCH} patch")
    if width * height <= area and not (width % PATCH or height % PATCH):
        return width, height
    target = math.log(width / height)
    best, best_key = None, None
    for side in range(PATCH, area // (PATCH * PATCH) * PATCH + 1, PATCH):
        other = (area // side) // PATCH * PATCH  # the largest other side this side allows
        for w, h in ((side, other), (other, side)):
            key = (abs(math.log(w / h) - target), -(w * h), -w)
            if best_key is None or key < best_key:
                best, best_key = (w, h), key
    return best


def training_bucket(width: int, height: int, resolution: int | None) -> tuple[int, int]:
    """The size a bucketed pair generated at width x height is trained at: its bucket under a
    budget of `resolution` squared pixels (None: as generated). For a square image this is
    resolution x resolution, what `[train] resolution` means for unbucketed runs too."""
    if resolution is None:
        return width, height
    return bucket_size(width, height, resolution * resolution)
