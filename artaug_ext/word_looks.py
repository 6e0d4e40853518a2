"""What the words of the tiny scene grammar look like, and how the heuristic critic reads an image against them.

The critic may know what each word means, never how a scene is drawn: it does not call
`scenes.render`, read the palette's RGB, the lighting formulas or a scene's sizes and masks.
What it knows is one table, `word_looks.json`, measured by `benchmarks/calibrate_critic.py`
on the tiny model's training scenes (`scenes.random_scene(seed, held_out=False)`, never a
held-out one) with the readings of this module, and checked by a test to be what that
script writes:

- `regions`: per position word and size word, the box (fractions of the sides) an object of
  that description covers;
- `areas`: per shape word and size word, the least share of the image such an object covers;
- `objects`: per colour word and lighting word, the L*a*b* an object of that colour shows
  under that lighting (median of its core) and how far training objects strayed from it;
- `backgrounds`: per background colour, style and lighting word, the L*a*b* of the image's
  border ring, and its spread;
- `shapes`: per shape word, the range of extent (area over bounding box) and solidity (area
  over convex hull) of training objects;
- `speckle`: the largest share of speckled pixels at a training object's edge;
- `lightings`: per lighting word, the range (1st..99th percentile) of exposure, contrast,
  saturation and sharpness of the 3x3 cells (`grid_cells`) of training images under it: what
  the heuristic scorer's quality expects of an image that names that lighting.

The critic, the heuristic scorer and the caption analyser read this one table.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image

from .colours import srgb_to_lab

SIZE = 128  # the side every image is read at (box-filtered)
SEARCH_MARGIN = 0.03  # an object may sit this far (fraction of the side) outside its word's box
FOREGROUND = 0.1  # RGB distance in [0, 1] from the background model that makes a pixel an object's
SPECKLE = 0.2  # RGB distance from the 3x3 median that makes an edge pixel a speckle


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """The calibrated table (see the module docstring)."""
    return json.loads(resources.files("artaug_ext").joinpath("assets/word_looks.json").read_text("utf-8"))


def read_pixels(image) -> np.ndarray:
    """An image as float RGB in [0, 1] at SIZE x SIZE (box filter)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8)[..., :3])
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(image, dtype=np.float64) / 255.0


def grid_cells(px: np.ndarray) -> list[np.ndarray]:
    """The 3x3 grid of an image's pixels, row by row."""
    h, w = px.shape[:2]
    return [px[h * r // 3:h * (r + 1) // 3, w * c // 3:w * (c + 1) // 3] for r in range(3) for c in range(3)]


def pixel_box(box, margin: float = 0.0) -> tuple[int, int, int, int]:
    """A box of fractions, grown by `margin`, as pixel bounds (x0, y0, x1, y1) at SIZE."""
    x0, y0, x1, y1 = box
    lo = lambda v: max(0, int(np.floor((v - margin) * SIZE)))  # noqa: E731
    hi = lambda v: min(SIZE, int(np.ceil((v + margin) * SIZE)))  # noqa: E731
    return lo(x0), lo(y0), hi(x1), hi(y1)


def background_model(px: np.ndarray, boxes: list) -> np.ndarray:
    """The background under the named objects: outside their boxes (grown by SEARCH_MARGIN) the
    image itself; inside, each row interpolated between the nearest background pixels left and
    right of it (vertical gradients and a soft halo follow)."""
    known = np.ones((SIZE, SIZE), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = pixel_box(box, SEARCH_MARGIN)
        known[y0:y1, x0:x1] = False
    bg = px.copy()
    xs = np.arange(SIZE)
    rows = np.nonzero(~known.all(1))[0]
    for y in rows:
        k = known[y]
        if not k.any():
            bg[y] = np.median(px[known], axis=0) if known.any() else np.median(px.reshape(-1, 3), axis=0)
            continue
        for c in range(3):
            bg[y, ~k, c] = np.interp(xs[~k], xs[k], px[y, k, c])
    return bg


def border_lab(px: np.ndarray) -> np.ndarray:
    """L*a*b* of the median of the image's border ring (3 pixels wide at SIZE)."""
    b = 3
    ring = np.concatenate([px[:b].reshape(-1, 3), px[-b:].reshape(-1, 3),
                           px[b:-b, :b].reshape(-1, 3), px[b:-b, -b:].reshape(-1, 3)])
    return srgb_to_lab(np.median(ring, axis=0))


@dataclass
class ObjectReading:
    """What the image shows in one object's search box: its largest foreground region."""

    area: float  # share of the image
    lab: np.ndarray | None  # median L*a*b* of its core; None when nothing is there
    extent: float = 0.0
    solidity: float = 0.0
    speckle: float = 0.0  # share of its edge pixels that are speckles


def hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of a mask's pixel squares (the solidity of a shape is area / hull)."""
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(mask)
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        return float(ConvexHull(pts).volume)
    except (QhullError, ValueError):
        return float(mask.sum())


def read_object(px: np.ndarray, bg: np.ndarray, box, others: list) -> ObjectReading:
    """The largest region differing from the background model inside `box` (grown by
    SEARCH_MARGIN), leaving out the other named objects' boxes."""
    from scipy import ndimage

    x0, y0, x1, y1 = pixel_box(box, SEARCH_MARGIN)
    fg = np.zeros((SIZE, SIZE), dtype=bool)
    fg[y0:y1, x0:x1] = np.sqrt(((px[y0:y1, x0:x1] - bg[y0:y1, x0:x1]) ** 2).sum(-1)) > FOREGROUND
    own = np.zeros_like(fg)
    ox0, oy0, ox1, oy1 = pixel_box(box)
    own[oy0:oy1, ox0:ox1] = True
    for other in others:
        a0, b0, a1, b1 = pixel_box(other)
        cut = np.zeros_like(fg)
        cut[b0:b1, a0:a1] = True
        fg &= ~(cut & ~own)
    labels, count = ndimage.label(fg)
    if count == 0:
        return ObjectReading(0.0, None)
    sizes = ndimage.sum(fg, labels, index=np.arange(1, count + 1))
    mask = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    area = float(mask.sum())
    core = ndimage.binary_erosion(mask, iterations=2)
    pixels = px[core] if core.sum() >= 4 else px[mask]
    ys, xs = np.nonzero(mask)
    extent = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    edge = ndimage.binary_dilation(mask, iterations=1) & ~ndimage.binary_erosion(mask, iterations=1)
    median = ndimage.median_filter(px, size=(3, 3, 1))
    speckled = np.sqrt(((px - median) ** 2).sum(-1)) > SPECKLE
    return ObjectReading(area / SIZE ** 2, srgb_to_lab(np.median(pixels, axis=0)), extent,
                         area / max(hull_area(mask), 1.0), float(speckled[edge].mean()) if edge.any() else 0.0)


def delta_e(a, b) -> float:
    return float(np.sqrt(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).sum()))
