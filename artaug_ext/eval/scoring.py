"""The eval's scorers, and their scores of images cached by image hash, prompt and scorer identity.

`make_scorer` assembles what `artaug eval --scorer ...` names: the eval's judges (`fidelity`,
built here and nowhere below this layer, so no critic or filter can use one) side by side with
the filter's scorers (`artaug_ext.interact.scorers.make_scorer`).

A second evaluation of the same images (another comparison, a report rebuilt, a resumed
run) runs no scorer forward pass: every (image sha256, prompt, scorer identity) is scored
once and appended to a JSONL file. The identity is the scorer's name, our code's version
of it and the sha256 of its weights, so new weights or a changed scorer never read stale
scores. `ScoreCache.forward_passes` counts the images actually scored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

from ..errors import UsageError
from ..files import append_line, read_jsonl, sha256_file

logger = logging.getLogger(__name__)

# The mark on a score the run's filter scorer also computed (`selection_metrics`).
SELECTION_LABEL = "selection score: not independent"


def _judge(name: str):
    """One of the eval's judges by its name in `interact.scorers.JUDGES`."""
    from .fidelity import FidelityScorer

    return {"fidelity": FidelityScorer}[name]()


def make_scorer(spec: str, *, model_dir: str | None = None, device: str | None = None):
    """The eval's scorer by name; "a+b" combines several, in that order: a judge is built here,
    every other name by the filter's `make_scorer`. Every name is checked before any weights load.
    (Imported on use: the score cache must stay cheap to import.)"""
    from ..interact import scorers as filter_scorers

    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts:
        raise UsageError("--scorer is empty")
    names = filter_scorers.SCORERS + filter_scorers.JUDGES
    for p in parts:
        if p not in names:
            raise UsageError(f"unknown scorer {p!r}; choose from {', '.join(names)} (join several with +)")
    built = [_judge(p) if p in filter_scorers.JUDGES else filter_scorers.make_scorer(p, model_dir=model_dir, device=device)
             for p in parts]
    return built[0] if len(built) == 1 else filter_scorers.CombinedScorer(built)


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def image_sha256(image) -> str:
    """sha256 of a PIL image's PNG bytes (what the eval writes), or of a file's bytes."""
    if isinstance(image, str):
        return sha256_file(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


class ScoreCache:
    """{(image sha256, prompt, scorer key): scores}, backed by a JSONL file."""

    def __init__(self, path: str):
        self.path = path
        self.entries: dict[tuple[str, str, str], dict] = {}
        for r in read_jsonl(path, repair=True, what="score cache"):
            self.entries[(r["image"], r["prompt"], r["scorer"])] = r["scores"]
        self.forward_passes = 0
        self.hits = 0

    def score(self, scorer, images: list, shas: list[str], prompt: str, load=None) -> list[dict]:
        """Scores of `images` (with their sha256s) for one prompt, every component scorer of
        `scorer` looked up in the cache first; only misses are scored, in one call a component.
        With `load`, `images` are paths and only the images a scorer must see are decoded."""
        out = [{} for _ in images]
        decoded: dict[int, object] = {}

        def image(i):
            if load is None:
                return images[i]
            if i not in decoded:
                decoded[i] = load(images[i])
            return decoded[i]

        for part in scorer.components():
            key = identity_key(part.identity())
            missing = [i for i, sha in enumerate(shas) if (sha, prompt, key) not in self.entries]
            self.hits += len(images) - len(missing)
            if missing:
                scores = part.score([image(i) for i in missing], prompt)
                self.forward_passes += len(missing)
                for i, s in zip(missing, scores, strict=True):
                    s = {k: float(v) for k, v in s.items()}
                    self.entries[(shas[i], prompt, key)] = s
                    append_line(self.path, {"image": shas[i], "prompt": prompt, "scorer": key,
                                            "identity": part.identity(), "scores": s})
            for i, sha in enumerate(shas):
                out[i].update(self.entries[(sha, prompt, key)])
        return out


def metric_kinds(scorer) -> dict[str, str]:
    """{score name: "quality" | "alignment" | "preference" | "judge"}: PickScore is read as a pairwise
    preference (the ArtAug table's column sums to 100%), the others as scores."""
    kinds = {}
    for part in scorer.components():
        for k in getattr(part, "quality_keys", ()):
            kinds[k] = "preference" if k == "pickscore" else "quality"
        for k in getattr(part, "alignment_keys", ()):
            kinds[k] = "alignment"
        for k in getattr(part, "KEYS", ()):  # the analyser's per-attribute matches
            kinds.setdefault(k, "alignment")
        for k in getattr(part, "judge_keys", ()):  # the eval's judges (fidelity), which no filter reads
            kinds[k] = "judge"
    return kinds


def selection_metrics(scorer, filter_scorer: str | None) -> frozenset[str]:
    """The score names of `scorer` that the run's filter scorer (`filter_scorer`, a spec such as
    "heuristic" or "heuristic+clip") also computed to select the pairs trained on: those rows are
    not independent evidence, a LoRA trained on what a score preferred is expected to raise it."""
    if not filter_scorer:
        return frozenset()
    names = {p.strip() for p in filter_scorer.split("+") if p.strip()}
    return frozenset(k for part in scorer.components() if part.name in names
                     for k in (*part.quality_keys, *part.alignment_keys, *getattr(part, "KEYS", ())))


def lower_is_better(scorer) -> frozenset[str]:
    """The score names where the lower value wins a pair (an error, a Delta E): those a scorer
    lists in `lower_keys`. Every other score wins by being higher."""
    return frozenset(k for part in scorer.components() for k in getattr(part, "lower_keys", ()))
