"""The colour words we know and the sRGB value of each (floor 1: imports nothing of ours).

One table for everything that names a colour: the procedural scenes draw the first eight
(`SCENE_COLOURS`, the colours the tiny model was trained on, far apart in hue so the model
and the analyser can tell them apart), and the heuristic critic and scorer name pixels by
the nearest entry of the whole table.
"""

from __future__ import annotations

# sRGB in [0, 1]. The first eight are the scene palette: changing one changes the tiny
# model's training data and the analyser's ground truth.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.12, 0.66, 0.18),
    "blue": (0.12, 0.28, 0.90),
    "yellow": (0.96, 0.86, 0.10),
    "white": (0.96, 0.96, 0.96),
    "black": (0.04, 0.04, 0.04),
    "orange": (0.98, 0.52, 0.06),
    "purple": (0.56, 0.14, 0.72),
    "pink": (0.94, 0.55, 0.71),
    "brown": (0.51, 0.31, 0.16),
    "gray": (0.50, 0.50, 0.50),
    "cyan": (0.16, 0.78, 0.82),
}
SCENE_COLOURS: list[str] = list(COLOURS)[:8]
# Words for colours that no palette entry draws (synonyms and metallics): the tokenizers know them.
OTHER_COLOUR_WORDS: list[str] = ["grey", "magenta", "teal", "gold", "silver"]


def rgb255(name: str) -> tuple[int, int, int]:
    """A colour of the table in 8-bit sRGB."""
    return tuple(int(round(255 * v)) for v in COLOURS[name])


def srgb_to_lab(rgb):
    """sRGB in [0, 1] (an array, last axis RGB) to CIE L*a*b* (D65). numpy is imported here: the
    colour table itself is read where numpy is not needed."""
    import numpy as np

    rgb = np.asarray(rgb, dtype=np.float64)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)
