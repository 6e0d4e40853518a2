"""Caption-fidelity analyser: what does an image of a procedural scene show?

Pixel statistics over the scene grammar (`artaug_ext.scenes`), no learned model, so it can
judge the tiny model's images without a download: the background colour (from the image
border), the main object (the largest connected region that differs from the background),
its colour (nearest palette colour as the scenes render it under every lighting), its
shape (solidity and bounding-box fill) and its position (bounding-box centre on the 3x3
grid of named positions).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from . import scenes
from .colours import srgb_to_lab  # noqa: F401  (public here too: the analyser's colour space)

logger = logging.getLogger(__name__)

ANALYSIS_SIZE = 128
ATTRIBUTES = ("colour", "shape", "position", "background")


@dataclass
class Analysis:
    colour: str | None
    shape: str | None
    position: str | None
    background: str
    brightness: float  # mean of the image in [0, 1]
    area: float = 0.0  # main object's area as a fraction of the image

    def to_dict(self) -> dict:
        return asdict(self)


def _prototypes() -> tuple[np.ndarray, list[str]]:
    """Every colour as the renderer can show it (shade x lighting), labelled by its name."""
    feats, names = [], []
    for name, rgb in scenes.PALETTE.items():
        base = np.array(rgb, dtype=np.float64)
        shades = [base, base * 0.55, base * 0.55 + 0.45, base * 1.15, base * 0.7]
        for c in shades:
            for lit in (c, c * 0.55, c * 1.12 + 0.12, c * 1.3 + 0.3, c * 0.5, c + (1 - c) * 0.15, c + (1 - c) * 0.3):
                feats.append(np.clip(lit, 0, 1))
                names.append(name)
    return np.stack(feats), names


_PROTOS, _PROTO_NAMES = _prototypes()


def _feature(rgb: np.ndarray) -> np.ndarray:
    """Colour features where chroma counts more than brightness (lighting scales brightness)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    mean = rgb.mean(-1, keepdims=True)
    return np.concatenate([rgb - mean, 0.5 * mean], axis=-1)


_PROTO_FEATS = _feature(_PROTOS)


def classify_colour(rgb) -> str:
    """Nearest rendered palette colour to an RGB triple in [0, 1]."""
    d = ((_PROTO_FEATS - _feature(rgb)[None]) ** 2).sum(-1)
    return _PROTO_NAMES[int(np.argmin(d))]


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


def _hull_area(mask: np.ndarray) -> float:
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(mask)
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        return float(ConvexHull(pts).volume)
    except (QhullError, ValueError):
        return float(mask.sum())


def classify_shape(mask: np.ndarray) -> str:
    """Square fills its box, a circle ~79%, a triangle ~50%; a star is far from convex."""
    ys, xs = np.nonzero(mask)
    area = float(mask.sum())
    extent = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    solidity = area / max(_hull_area(mask), 1.0)
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


def analyse(image) -> Analysis:
    """Read the main object and the background of a scene image (PIL image or array)."""
    from scipy import ndimage

    img = _to_float(image)
    n = img.shape[0]
    main, _, ring = _segment(img)
    background = classify_colour(np.median(ring, axis=0))
    brightness = float(img.mean())
    if main is None:
        return Analysis(None, None, None, background, brightness)
    ys, xs = np.nonzero(main)
    cx = (xs.min() + xs.max() + 1) / 2 / n
    cy = (ys.min() + ys.max() + 1) / 2 / n
    core = ndimage.binary_erosion(main, iterations=2)
    pixels = img[core] if core.sum() >= 4 else img[main]
    return Analysis(
        colour=classify_colour(np.median(pixels, axis=0)),
        shape=classify_shape(main),
        position=classify_position(cx, cy),
        background=background,
        brightness=brightness,
        area=float(main.sum()) / (n * n),
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
    """What the analyser should read from a scene: its main object and background."""
    return {"colour": scene.main.colour, "shape": scene.main.shape, "position": scene.main.position,
            "background": scene.background}


def matches(analysis: Analysis, scene: scenes.Scene) -> dict[str, bool]:
    want = expected(scene)
    got = analysis.to_dict()
    return {k: got[k] == want[k] for k in ATTRIBUTES}


def chance_rates() -> dict[str, float]:
    """Match rate of a uniform guess per attribute (background: the colour differs from the object's)."""
    return {"colour": 1 / len(scenes.COLOURS), "shape": 1 / len(scenes.SHAPES),
            "position": 1 / len(scenes.POSITIONS), "background": 1 / len(scenes.COLOURS)}


def accuracy(images, scene_list) -> dict[str, float]:
    """Per-attribute match rate of the analyser on images of the given scenes."""
    hits = {k: 0 for k in ATTRIBUTES}
    for image, scene in zip(images, scene_list, strict=True):
        for k, ok in matches(analyse(image), scene).items():
            hits[k] += ok
    return {k: v / len(scene_list) for k, v in hits.items()}
