"""Caption-fidelity analyser: what does an image of a procedural scene show?

Pixel statistics over the scene grammar (`artaug_ext.scenes`), no learned model, so it can
judge the tiny model's images without a download: the background colour (from the image
border), the main object (the largest connected region that differs from the background),
its colour, its shape (solidity and bounding-box fill), its position (bounding-box centre on
the 3x3 grid of named positions) and, given the prompt's words, the lighting.

Like the heuristic critic it knows what the words look like, not how a scene is drawn: colours
and lightings are read against `word_looks` (the L*a*b* of each colour word under each lighting
word, and of each background, measured on training scenes), never the palette's RGB, the
lighting formulas or `scenes.render`. The fidelity judge (`eval/fidelity.py`) is the one that
compares with the exact render.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass

import numpy as np

from . import scenes, word_looks
from .colours import srgb_to_lab

logger = logging.getLogger(__name__)

ANALYSIS_SIZE = word_looks.SIZE  # the side the words' looks were measured at
ATTRIBUTES = ("colour", "shape", "position", "background", "lighting")
# A lighting is read only when the image is within this Delta E*ab (per look compared, on
# average) of what the prompt's words look like under it; further (noise, another scene) it is None.
LIGHTING_FAR = 25.0
LIGHTNESS_WEIGHT = 0.5  # colour words: chroma counts more than L* (lighting scales brightness)


@dataclass
class Analysis:
    colour: str | None
    shape: str | None
    position: str | None
    background: str
    brightness: float  # mean of the image in [0, 1]
    area: float = 0.0  # main object's area as a fraction of the image
    lighting: str | None = None  # read only against the prompt's words (`analyse(image, scene)`)

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def _colour_looks() -> tuple[np.ndarray, list[str]]:
    """Every look of a colour word in the calibrated table (objects under each lighting,
    backgrounds of each style under each lighting), labelled by the word."""
    table = word_looks.table()
    labs, names = [], []
    for part in ("objects", "backgrounds"):
        for key, look in sorted(table[part].items()):
            labs.append(look["lab"])
            names.append(key.split("|")[0])
    return np.array(labs, dtype=np.float64), names


def classify_colour(rgb) -> str:
    """The colour word whose calibrated look (under any lighting) is nearest an RGB triple in [0, 1]."""
    labs, names = _colour_looks()
    d = np.asarray(srgb_to_lab(np.asarray(rgb, dtype=np.float64))) - labs
    d[:, 0] *= LIGHTNESS_WEIGHT
    return names[int(np.argmin((d ** 2).sum(-1)))]


def read_lighting(border_lab: np.ndarray, object_lab: np.ndarray | None, scene: scenes.Scene) -> str | None:
    """The lighting word under which the prompt's background (colour and style) and main object
    colour look most like the image's border ring and main object (L*a*b*), from the calibrated
    looks; None when no lighting's looks are known for these words or all are further than
    LIGHTING_FAR."""
    table = word_looks.table()
    best, best_d = None, float("inf")
    for light in scenes.LIGHTINGS:
        parts = []
        bg = table["backgrounds"].get(f"{scene.background}|{scene.background_style}|{light}")
        if bg is not None:
            parts.append(word_looks.delta_e(border_lab, bg["lab"]))
        obj = table["objects"].get(f"{scene.main.colour}|{light}")
        if obj is not None and object_lab is not None:
            parts.append(word_looks.delta_e(object_lab, obj["lab"]))
        if parts and np.mean(parts) < best_d:
            best, best_d = light, float(np.mean(parts))
    return best if best_d <= LIGHTING_FAR else None


def _to_float(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
            image = image.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.BOX)
        return np.asarray(image, dtype=np.float32) / 255.0
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    return _to_float(Image.fromarray(arr[..., :3]))


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def classify_shape(mask: np.ndarray) -> str:
    """Square fills its box, a circle ~79%, a triangle ~50%; a star is far from convex."""
    ys, xs = np.nonzero(mask)
    area = float(mask.sum())
    extent = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    solidity = area / max(word_looks.hull_area(mask), 1.0)
    if solidity < 0.8:
        return "star"
    if extent > 0.88:
        return "square"
    if extent > 0.64:
        return "circle"
    return "triangle"


def classify_position(cx: float, cy: float) -> str:
    col = "left" if cx < 0.375 else "right" if cx > 0.625 else ""
    row = "top" if cy < 0.375 else "bottom" if cy > 0.625 else ""
    return f"{row} {col}".strip() or "center"


def _segment(img: np.ndarray):
    """(main object mask or None, per-row background colour, border ring pixels) of a scene image."""
    from scipy import ndimage

    n = img.shape[0]
    b = max(n // 40, 2)
    # Background per row from the left and right borders (follows vertical gradients),
    # smoothed over rows so a shape near the border does not leak into it.
    sides = np.concatenate([img[:, :b], img[:, -b:]], axis=1)
    row_bg = np.median(sides, axis=1)
    row_bg = ndimage.median_filter(row_bg, size=(n // 8 + 1, 1), mode="nearest")
    ring = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), sides.reshape(-1, 3)])
    dist = np.sqrt(((img - row_bg[:, None, :]) ** 2).sum(-1))
    thr = max(_otsu(dist), 0.12)
    fg = dist > thr
    fg = ndimage.binary_opening(fg, iterations=1)
    labels, count = ndimage.label(fg)
    if count == 0:
        return None, row_bg, ring
    sizes = ndimage.sum(fg, labels, index=np.arange(1, count + 1))
    main = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(main), row_bg, ring


def analyse(image, scene: scenes.Scene | None = None) -> Analysis:
    """Read the main object and the background of a scene image (PIL image or array), and the
    lighting when the prompt's scene is given (a lighting is only readable against the words:
    a dark yellow background in normal light is a yellow one in dim light)."""
    from scipy import ndimage

    img = _to_float(image)
    n = img.shape[0]
    main, _, ring = _segment(img)
    background = classify_colour(np.median(ring, axis=0))
    brightness = float(img.mean())
    border = word_looks.border_lab(img.astype(np.float64))  # read at word_looks.SIZE, as calibrated
    if main is None:
        lighting = read_lighting(border, None, scene) if scene is not None else None
        return Analysis(None, None, None, background, brightness, lighting=lighting)
    ys, xs = np.nonzero(main)
    cx = (xs.min() + xs.max() + 1) / 2 / n
    cy = (ys.min() + ys.max() + 1) / 2 / n
    core = ndimage.binary_erosion(main, iterations=2)
    pixels = img[core] if core.sum() >= 4 else img[main]
    colour = np.median(pixels, axis=0)
    return Analysis(
        colour=classify_colour(colour),
        shape=classify_shape(main),
        position=classify_position(cx, cy),
        background=background,
        brightness=brightness,
        area=float(main.sum()) / (n * n),
        lighting=read_lighting(border, srgb_to_lab(colour.astype(np.float64)), scene) if scene is not None else None,
    )


def separation(image) -> float:
    """How far the main object stands out from its background: the CIE76 colour difference
    (Delta E in L*a*b*) between the median colour of the object (the analyser's mask, eroded)
    and of the border ring; 0 when no object is found. It reads the segmentation, which the
    heuristic critic and scorer do not use, so it can judge their pairs independently."""
    from scipy import ndimage

    img = _to_float(image)
    main, _, ring = _segment(img)
    if main is None:
        return 0.0
    core = ndimage.binary_erosion(main, iterations=2)
    pixels = img[core] if core.sum() >= 4 else img[main]
    a, b = srgb_to_lab(np.median(pixels, axis=0)), srgb_to_lab(np.median(ring, axis=0))
    return float(np.sqrt(((a - b) ** 2).sum()))


def expected(scene: scenes.Scene) -> dict[str, str]:
    """What the analyser should read from a scene: its main object, background and lighting."""
    return {"colour": scene.main.colour, "shape": scene.main.shape, "position": scene.main.position,
            "background": scene.background, "lighting": scene.lighting}


def matches(analysis: Analysis, scene: scenes.Scene) -> dict[str, bool]:
    """Which attributes read as the scene says (lighting: only if read with `analyse(image, scene)`)."""
    want = expected(scene)
    got = analysis.to_dict()
    return {k: got[k] == want[k] for k in ATTRIBUTES}


def chance_rates() -> dict[str, float]:
    """Match rate of a uniform guess per attribute (background: the colour differs from the object's)."""
    return {"colour": 1 / len(scenes.COLOURS), "shape": 1 / len(scenes.SHAPES),
            "position": 1 / len(scenes.POSITIONS), "background": 1 / len(scenes.COLOURS),
            "lighting": 1 / len(scenes.LIGHTINGS)}


def accuracy(images, scene_list) -> dict[str, float]:
    """Per-attribute match rate of the analyser on images of the given scenes."""
    hits = {k: 0 for k in ATTRIBUTES}
    for image, scene in zip(images, scene_list, strict=True):
        for k, ok in matches(analyse(image, scene), scene).items():
            hits[k] += ok
    return {k: v / len(scene_list) for k, v in hits.items()}
