"""Scoring images: original and enhanced ones in the loop, every arm's in an eval.

A scorer maps (images, prompt) to one dict of named scores per image. Each scorer says which
of its scores measure quality (higher is better; the pair must win on them by a margin) and
which measure text alignment (must not drop). Backends:

- `heuristic`: offline, no weights; see `HeuristicScorer` for what it does and does not measure.
- `aesthetic`, `pickscore`, `clip`, `hpsv2`, `imagereward`: DiffSynth's `diffsynth.metrics`
  with weights from ModelScope `DiffSynth-Studio/ImageMetrics` through our hub layer (one
  subfolder each; `artaug download image-metrics --files Aesthetic/` to prefetch).
- several at once: "aesthetic+pickscore+clip" (the paper's filter).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from ..colours import COLOURS, rgb255
from ..errors import UsageError
from .critics import (
    MIN_CONTRAST,
    MIN_SATURATION,
    SHARPNESS_BAND,
    UNIFORM_CONTRAST,
    exposure_error,
    region_stats,
)

logger = logging.getLogger(__name__)

SCORERS = ("heuristic", "analyser", "separation", "aesthetic", "pickscore", "clip", "hpsv2", "imagereward")
# The names of the eval's judges (built by `artaug_ext.eval.scoring.make_scorer`, never here): they
# know the exact scene, so no critic or filter may use one; this layer only refuses them by name.
JUDGES = ("fidelity",)


class Scorer:
    """Interface: `score(images, prompt) -> [{name: value}]`, plus which names mean what.

    `identity()` names what the scores depend on besides the image and the prompt (name,
    version of our code, hash of the weights), so a cache keyed by it is never stale."""

    name = "scorer"
    version = "1"
    quality_keys: tuple[str, ...] = ()
    alignment_keys: tuple[str, ...] = ()

    def score(self, images: list[Image.Image], prompt: str) -> list[dict[str, float]]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"scorer": self.name, "quality": list(self.quality_keys), "alignment": list(self.alignment_keys)}

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "weights": None}

    def components(self) -> list[Scorer]:
        """The single scorers this one is made of (itself, unless combined)."""
        return [self]


class HeuristicScorer(Scorer):
    """Offline stand-in for aesthetic and CLIP scores, from pixel statistics only.

    A prompt of the tiny scene grammar (`scenes.parse_caption` reads it) is judged against what it
    asks for, with what the words look like (`word_looks`, measured on training scenes; never the
    renderer, the palette or the lighting formulas):

    - `quality` (0..1): each 3x3 cell is scored on how far its exposure, contrast, saturation and
      sharpness lie outside the range training images under the prompt's lighting word show
      (`word_looks` `lightings`; plain cells on exposure only), in units of that range, and the
      cells are averaged. A faithful "dim light" image is not pulled toward mid-grey.
    - `colour_match` (0..1): the share of the main object's colour and the background colour
      that the caption analyser reads as named.
    - `prompt_match` (0..1): the share of the analyser's attributes (main object's colour, shape
      and position, background colour, lighting) that read as the prompt says. The filter's
      alignment guard rejects a pair whose enhancement changes any of them.

    Any other prompt keeps the scorer's behaviour from before it read prompts: `quality` rewards
    each cell for being inside the heuristic critic's fixed targets (exposure band, contrast,
    saturation, sharpness band; plain cells on exposure only), `colour_match` is the share of
    colour words of the prompt whose colour covers at least 2% of the pixels, and `prompt_match`
    is NaN (not measurable: the pair is not judged on it). Either way it agrees with the heuristic
    critic by construction: use it to test the loop, not to judge art.
    """

    name = "heuristic"
    version = "2"
    quality_keys = ("quality",)
    alignment_keys = ("colour_match", "prompt_match")

    @staticmethod
    def _band(v: float, lo: float, hi: float, width: float) -> float:
        d = lo - v if v < lo else (v - hi if v > hi else 0.0)
        return max(0.0, 1.0 - d / width)

    @classmethod
    def _cell_quality(cls, st: dict) -> float:
        exposure = max(0.0, 1.0 - abs(exposure_error(st)) / 0.3)
        if st["contrast"] < UNIFORM_CONTRAST:
            return exposure  # a plain area: judged on exposure only, as the critic does
        terms = [exposure, cls._band(st["contrast"], MIN_CONTRAST, 1.0, MIN_CONTRAST),
                 cls._band(st["saturation"], MIN_SATURATION, 1.0, MIN_SATURATION),
                 cls._band(st["sharpness"], *SHARPNESS_BAND, 0.3)]
        return float(np.mean(terms))

    @classmethod
    def _lit_cell_quality(cls, st: dict, bands: dict) -> float:
        """A cell against the ranges training cells show under the prompt's lighting word."""
        def term(key):
            lo, hi = bands[key]
            return cls._band(st[key], lo, hi, max(hi - lo, 1e-3))

        if st["contrast"] < UNIFORM_CONTRAST:
            return term("exposure")
        return float(np.mean([term(k) for k in ("exposure", "contrast", "saturation", "sharpness")]))

    def quality(self, image: Image.Image, prompt: str = "") -> float:
        from .. import scenes, word_looks

        scene = scenes.parse_caption(prompt) if prompt else None
        if scene is not None:
            bands = word_looks.table()["lightings"][scene.lighting]
            cells = word_looks.grid_cells(word_looks.read_pixels(image))
            return float(np.mean([self._lit_cell_quality(region_stats(c), bands) for c in cells]))
        px = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        h, w = px.shape[:2]
        cells = [px[h * r // 3:h * (r + 1) // 3, w * c // 3:w * (c + 1) // 3] for r in range(3) for c in range(3)]
        return float(np.mean([self._cell_quality(region_stats(c)) for c in cells if c.size]))

    @staticmethod
    def colour_match(image: Image.Image, prompt: str) -> float:
        """The share of the prompt's colour words found in the image (for prompts outside the grammar)."""
        words = [w.strip(".,;:!?").lower() for w in prompt.split()]
        wanted = [w for w in dict.fromkeys(words) if w in COLOURS]
        if not wanted:
            return 1.0
        px = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float64).reshape(-1, 1, 3)
        names = list(COLOURS)
        palette = np.array([rgb255(n) for n in names], dtype=np.float64).reshape(1, -1, 3)
        nearest = ((px - palette) ** 2).sum(-1).argmin(1)
        share = {n: float((nearest == i).mean()) for i, n in enumerate(names)}
        return float(np.mean([share[w] >= 0.02 for w in wanted]))

    def alignment(self, image: Image.Image, prompt: str) -> dict[str, float]:
        """colour_match and prompt_match (see the class docstring)."""
        from .. import analyse, scenes

        scene = scenes.parse_caption(prompt) if prompt else None
        if scene is None:
            return {"colour_match": self.colour_match(image, prompt), "prompt_match": float("nan")}
        hits = analyse.matches(analyse.analyse(image, scene), scene)
        return {"colour_match": (hits["colour"] + hits["background"]) / 2,
                "prompt_match": sum(hits.values()) / len(hits)}

    def score(self, images, prompt):
        out = []
        for im in images:
            row = {"quality": round(self.quality(im, prompt), 6)}
            row.update({k: round(v, 6) for k, v in self.alignment(im, prompt).items()})
            out.append(row)
        return out


def _metric_folder(subfolder: str, model_dir: str | None) -> str:
    from ..cards import card
    from ..hub import resolve

    model_id = card("image-metrics").modelscope_id
    found = resolve(model_id, [subfolder + "/"], model_dir=model_dir)
    return found[subfolder + "/"][0]


class DiffSynthMetricScorer(Scorer):
    """One of DiffSynth's metrics (Aesthetic, PickScore, CLIP, HPSv2, ImageReward) on weights from our hub layer.

    Each metric's weights subfolder of `DiffSynth-Studio/ImageMetrics` is taken from
    `artaug_ext.tiny.metrics.METRIC_FOLDERS`, imported here on first use because that module
    needs DiffSynth and this one must import without it.
    """

    _SPECS = {  # name: (metric class, its from_pretrained argument for the processor folder, takes a prompt, role)
        "aesthetic": ("AestheticMetric", "processor_config", False, "quality"),
        "pickscore": ("PickScoreMetric", "processor_config", True, "quality"),
        "clip": ("CLIPMetric", "processor_config", True, "alignment"),
        "hpsv2": ("HPSv2Metric", "processor_config", True, "quality"),
        "imagereward": ("ImageRewardMetric", "tokenizer_config", True, "quality"),
    }

    def __init__(self, name: str, *, model_dir: str | None = None, device: str | None = None, torch_dtype=None):
        if name not in self._SPECS:
            raise UsageError(f"unknown metric {name!r}; choose one of {', '.join(self._SPECS)}")
        import torch
        from diffsynth import metrics
        from diffsynth.core import ModelConfig

        from ..tiny.metrics import METRIC_FOLDERS

        cls_name, processor_arg, self.takes_prompt, role = self._SPECS[name]
        folder = _metric_folder(METRIC_FOLDERS[name], model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.name = name
        self.quality_keys = (name,) if role == "quality" else ()
        self.alignment_keys = (name,) if role == "alignment" else ()
        weights = os.path.join(folder, "model.safetensors")
        self.metric = getattr(metrics, cls_name).from_pretrained(
            model_config=ModelConfig(path=weights),
            **{processor_arg: ModelConfig(path=folder)}, device=device, torch_dtype=torch_dtype or torch.float32)
        from ..files import cached_sha256_file
        from ..hub import hash_cache_file

        self.weights_sha256 = cached_sha256_file(weights, hash_cache_file())

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "weights": self.weights_sha256}

    def score(self, images, prompt):
        values = self.metric.score(prompt, images) if self.takes_prompt else self.metric.score(images)
        return [{self.name: float(v)} for v in values]


class CombinedScorer(Scorer):
    """Several scorers side by side ("aesthetic+pickscore+clip")."""

    def __init__(self, scorers: list[Scorer]):
        self.scorers = scorers
        self.name = "+".join(s.name for s in scorers)
        self.quality_keys = tuple(k for s in scorers for k in s.quality_keys)
        self.alignment_keys = tuple(k for s in scorers for k in s.alignment_keys)

    def score(self, images, prompt):
        out = [{} for _ in images]
        for s in self.scorers:
            for d, part in zip(out, s.score(images, prompt), strict=True):
                d.update(part)
        return out

    def identity(self) -> dict:
        return {"name": self.name, "parts": [s.identity() for s in self.scorers]}

    def components(self) -> list[Scorer]:
        return list(self.scorers)


class AnalyserScorer(Scorer):
    """Text alignment of the tiny model's images: the caption analyser (`artaug_ext.analyse`)
    reads the main object's colour, shape and position and the background colour, and each
    is compared with what the prompt says, and so is the lighting, read against the prompt's
    words (prompts of the scene grammar; others score NaN and are left out of the statistics).
    `match` is the share of the five that agree."""

    name = "analyser"
    version = "2"
    alignment_keys = ("match",)
    KEYS = ("match", "colour", "shape", "position", "background", "lighting")

    def score(self, images, prompt):
        from .. import analyse, scenes

        scene = scenes.parse_caption(prompt)
        out = []
        for image in images:
            if scene is None:
                out.append({k: float("nan") for k in self.KEYS})
                continue
            hits = analyse.matches(analyse.analyse(image, scene), scene)
            row = {k: float(v) for k, v in hits.items()}
            row["match"] = sum(hits.values()) / len(hits)
            out.append(row)
        return out


class SeparationScorer(Scorer):
    """How far the tiny model's main object stands out from its background (`analyse.separation`:
    Delta E between object and border colours). A quality score the heuristic critic and scorer
    know nothing of (they judge 3x3 cells, not the segmented object): a check on their pairs."""

    name = "separation"
    quality_keys = ("separation",)

    def score(self, images, prompt):
        from .. import analyse

        return [{"separation": round(analyse.separation(im), 6)} for im in images]


def make_scorer(spec: str, *, model_dir: str | None = None, device: str | None = None) -> Scorer:
    """A filter scorer by name; "a+b" combines several. Every name is checked before any
    weights load. The eval's judges are refused here: the eval builds them
    (`artaug_ext.eval.scoring.make_scorer`)."""
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts:
        raise UsageError("--scorer is empty")
    for p in parts:
        if p in JUDGES:
            raise UsageError(f"scorer {p!r} judges `artaug eval` only (--scorer heuristic+{p}); no filter may use it")
        if p not in SCORERS:
            raise UsageError(f"unknown scorer {p!r}; choose from {', '.join(SCORERS)} (join several with +)")
    scorers = []
    for p in parts:
        if p == "heuristic":
            scorers.append(HeuristicScorer())
        elif p == "analyser":
            scorers.append(AnalyserScorer())
        elif p == "separation":
            scorers.append(SeparationScorer())
        else:
            scorers.append(DiffSynthMetricScorer(p, model_dir=model_dir, device=device))
    return scorers[0] if len(scorers) == 1 else CombinedScorer(scorers)
