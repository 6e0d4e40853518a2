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
