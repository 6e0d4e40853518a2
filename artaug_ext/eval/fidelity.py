"""The fidelity judge: how faithfully an image renders the scene its prompt describes.

For the tiny model only: a prompt of the scene grammar (`artaug_ext.scenes`) names one exact
picture, `scenes.render` of its scene, so an image can be compared with it pixel by pixel.
It is a judge of `artaug eval` (`--scorer heuristic+fidelity`), built by the eval's
`artaug_ext.eval.scoring.make_scorer`; no critic or filter may use it (the interact layer's
`make_scorer` refuses the name, and nothing below the eval imports this module): a judge must
stay apart from what picked the training pairs, or it would only measure what the loop optimised.

Rows, per image, against the render of the prompt's scene at the image's size:

- `fidelity_delta_e`: the mean per pixel of CIE76 Delta E*ab (sRGB, D65, to L*a*b*), lower is better;
- `fidelity_rgb`: the mean absolute RGB error over pixels and channels, in 8-bit levels, lower is better;
- `fidelity_lighting`: 1 when the nearest (mean Delta E) of the scene's five lighting renders
  is the prompt's lighting, else 0 (its mean is the lighting accuracy). Its own reading, not
  the caption analyser's, which the filter's `analyser` scorer uses;
- `fidelity_iou`: the IoU of the image's object mask with the render's (see `object_mask`), both
  under the lighting the image shows (its nearest render): a wrong lighting costs the first three
  rows, not this one, which measures the objects' shapes and places.

A prompt outside the grammar is not measurable: every row is NaN (the eval marks the rows "not
measurable" and leaves those pairs out), and a warning names the prompt. Never a 0.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import numpy as np
from PIL import Image

from .. import scenes
from ..interact.scorers import Scorer

logger = logging.getLogger(__name__)

KEYS = ("fidelity_delta_e", "fidelity_rgb", "fidelity_lighting", "fidelity_iou")
LOWER_IS_BETTER = ("fidelity_delta_e", "fidelity_rgb")

# sRGB (IEC 61966-2-1) linear RGB to CIE XYZ, and the D65 white point: full precision, not the
# 4-digit matrix of the caption analyser, so the judge shares no arithmetic with it.
SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB in [0, 1] (any shape [..., 3]) to CIE L*a*b* under D65, in float64."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ SRGB_TO_XYZ.T / D65_WHITE
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e(lab_a, lab_b) -> np.ndarray:
    """CIE76 Delta E*ab: the Euclidean distance in L*a*b*, per colour."""
    return np.sqrt(((np.asarray(lab_a, dtype=np.float64) - np.asarray(lab_b, dtype=np.float64)) ** 2).sum(-1))


def _fit(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """A square [n, n, c] float array at width x height (bilinear), unchanged when it already is."""
    if array.shape[:2] == (height, width):
        return array
    channels = [np.asarray(Image.fromarray(array[..., c].astype(np.float32)).resize((width, height), Image.BILINEAR))
                for c in range(array.shape[-1])]
    return np.stack(channels, axis=-1)


def object_mask(lab: np.ndarray, background_lab: np.ndarray, object_labs: np.ndarray) -> np.ndarray:
    """Pixels nearer (Delta E) to one of the objects' lit colours than to the lit background there.

    The reference mask is this rule applied to the exact render, not the renderer's coverage, so
    antialiased edge pixels are judged by one rule in both masks and the exact render scores an
    IoU of exactly 1; away from the edges it is the coverage mask (coverage 1 in, 0 out)."""
    to_objects = np.min([delta_e(lab, c) for c in object_labs], axis=0)
    return to_objects < delta_e(lab, background_lab)


@dataclasses.dataclass
class Reference:
    """What a faithful image of one scene at one size is: under every lighting, the render (L*a*b*),
    the colours that segment an image into objects and background, and the render's object mask;
    and the render of the prompt's lighting in 8-bit RGB."""

    scene: scenes.Scene
    labs: dict[str, np.ndarray]
    layers: dict[str, tuple[np.ndarray, np.ndarray]]  # lighting: (background L*a*b* per pixel, object L*a*b*)
    masks: dict[str, np.ndarray]
    rgb: np.ndarray


@functools.lru_cache(maxsize=2)  # the eval scores one prompt in every arm, then the next
def reference(prompt: str, width: int, height: int) -> Reference | None:
    """The reference of a prompt's scene at width x height, None outside the grammar.

    `scenes.render` draws squares: a non-square image is compared with the square render at its
    larger side, resized to its shape (the positions are fractions of the sides)."""
    scene = scenes.parse_caption(prompt)
    if scene is None:
        return None
    side = max(width, height)
    renders = {light: _fit(scenes.render(dataclasses.replace(scene, lighting=light), side).astype(np.float64),
                           width, height) for light in scenes.LIGHTINGS}  # 8-bit levels
    labs = {light: srgb_to_lab(img / 255) for light, img in renders.items()}
    layers = {}
    for light in scenes.LIGHTINGS:
        background, colours = scenes.lit_layers(dataclasses.replace(scene, lighting=light), side)
        layers[light] = (srgb_to_lab(_fit(background.astype(np.float64), width, height)),
                         srgb_to_lab(colours.astype(np.float64)))
    masks = {light: object_mask(labs[light], *layers[light]) for light in scenes.LIGHTINGS}
    return Reference(scene, labs, layers, masks, renders[scene.lighting])


def read_lighting(lab: np.ndarray, ref: Reference) -> tuple[str, dict[str, float]]:
    """The lighting an image (L*a*b*) shows: the nearest of the scene's five lighting renders by
    mean Delta E, a tie going to the prompt's; and each render's mean Delta E."""
    distance = {light: float(delta_e(lab, ref_lab).mean()) for light, ref_lab in ref.labs.items()}
    stated = ref.scene.lighting
    return min(scenes.LIGHTINGS, key=lambda light: (distance[light], light != stated)), distance


def judge(image: Image.Image, ref: Reference) -> dict[str, float]:
    """The four rows of one image against its reference."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    lab = srgb_to_lab(rgb / 255)
    nearest, distance = read_lighting(lab, ref)
    stated = ref.scene.lighting
    mask, wanted = object_mask(lab, *ref.layers[nearest]), ref.masks[nearest]
    union = int((mask | wanted).sum())
    return {"fidelity_delta_e": distance[stated],
            "fidelity_rgb": float(np.abs(rgb - ref.rgb).mean()),
            "fidelity_lighting": float(nearest == stated),
            "fidelity_iou": int((mask & wanted).sum()) / union if union else math.nan}


class FidelityScorer(Scorer):
    """The fidelity judge as a scorer of the eval (see the module docstring). Its rows are neither
    quality nor alignment keys, so `keep_pair` never reads them."""

    name = "fidelity"
    version = "1"
    judge_keys = KEYS
    lower_keys = LOWER_IS_BETTER

    def score(self, images, prompt):
        if scenes.parse_caption(prompt) is None:
            logger.warning("fidelity: prompt %r is outside the tiny scene grammar: not measurable", prompt)
            return [dict.fromkeys(KEYS, math.nan) for _ in images]
        return [judge(image, reference(prompt, *image.size)) for image in images]
