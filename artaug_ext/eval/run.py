"""`artaug eval`: every prompt x seed through each arm (the base model, with a LoRA, ...), on the
same seeds, scored, and compared like the ArtAug paper's table.

An eval folder:

    eval.json            what was evaluated: settings, and the sha256 of the model's and every
                         arm's LoRA files, not their paths (a second eval into the same folder
                         must have the same settings; an arm whose files changed is made again)
    images/{arm}/{prompt:05d}-s{k:02d}.png
    scores.jsonl         the score cache (image sha256, prompt, scorer identity -> scores)
    results.json         the table: per candidate arm and metric, means, paired differences,
                         win rates and 95% bootstrap intervals, by category too
    report.html          the same for a person (artaug_ext.eval.report)

Images are written atomically and an existing image is never generated again, so an eval
killed at any point resumes where it stopped; under torchrun / accelerate launch each rank
generates the prompts p with p % world == rank, and the main process scores.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..dist import Collective, lock_folder, process_info
from ..errors import ArtaugError, FileFormatError, UsageError
from ..files import atomic_write_bytes, atomic_write_json, first_difference, read_json, without_defaults
from ..quant import UNQUANTIZED
from .layout import image_path
from .prompts import PromptItem
from .scoring import (
    SELECTION_LABEL,
    ScoreCache,
    image_sha256,
    lower_is_better,
    metric_kinds,
    selection_metrics,
)
from .stats import pair_wins, summarize_metric

logger = logging.getLogger(__name__)

EVAL_LOCK = ".artaug-eval-lock"  # held by the main process of the eval writing the folder (its pid inside)

EVAL_FORMAT = 2  # 2: arms and the model by content (sha256), not by path
# The ArtAug paper's table also has MPS, which diffsynth.metrics does not provide.
UNAVAILABLE = {"mps": "not available: MPS is not in diffsynth.metrics (the paper's 52.48% vs 47.52% cannot be "
                      "reproduced here)"}


@dataclass
class Arm:
    """One way of generating: the base model with these LoRAs merged (none: the base)."""

    name: str
    loras: list[tuple[str, float]] = field(default_factory=list)  # (path or hub LoRA name, alpha)

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise UsageError(f"arm name {self.name!r}: use a plain name (it becomes a folder)")


@dataclass
class EvalConfig:
    model: str
    arms: list[Arm]  # arms[0] is the baseline every other arm is compared with
    prompts: list[PromptItem]
    seeds: int = 2
    seed: int = 0
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float = 3.5
    scorer: str = "heuristic"
    batch_size: int = 4
    n_boot: int = 2000
    # The filter scorer of the run whose LoRAs are evaluated: the eval's rows of that scorer are
    # marked "selection score: not independent" and the verdict is drawn without them.
    selection_scorer: str | None = None
    quantize: str | None = None  # a DiffSynth quantisation method for the DiT (load_pipeline's quantize)
    text_encoders: str = "resident"

    def identity(self) -> dict:
        """What the images and scores depend on besides the files (batch size, bootstrap count
        and labels do not); the arms by name (their files: `folder_record`)."""
        d = asdict(self)
        d["prompts"] = [[p.prompt, p.category] for p in self.prompts]
        d["arms"] = [a.name for a in self.arms]
        for key in ("batch_size", "n_boot", "selection_scorer"):
            d.pop(key)
        return without_defaults(d, UNQUANTIZED)  # as recorded before these settings existed, when unset

    def validate(self) -> None:
        if self.seeds <= 0:
            raise UsageError(f"--seeds {self.seeds}: give at least 1 seed a prompt")
        if not self.prompts:
            raise UsageError("no prompts to evaluate")
        if len(self.arms) < 2:
            raise UsageError("an eval compares at least two arms (the base and a LoRA, or two LoRAs)")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise UsageError(f"arm names must differ: {names}")
        for a in self.arms:
            a.validate()


def item_seed(cfg: EvalConfig, p: int, k: int) -> int:
    """The same seed for prompt p, seed k in every arm: the comparison is paired."""
    return cfg.seed + p * cfg.seeds + k


EVAL_JSON = "eval.json"


def _sha256(path: str, cache: str):
    """A file's or folder's sha256 (a list of them for a sharded model file); a LoRA given by
    hub name, not a path, is its name."""
    from ..files import sha256_path

    if isinstance(path, (list, tuple)):
        return [_sha256(p, cache) for p in path]
    return sha256_path(path, cache) if os.path.exists(path) else {"name": path}


def folder_record(cfg: EvalConfig, model_paths: dict, model_dir: str | None = None) -> dict:
    """eval.json: the settings, the model files' and every arm's LoRA files' sha256 (the cached
    hashes `artaug interact` records), never their paths: an eval folder moved with its LoRAs, or
    LoRAs copied elsewhere, resume; a LoRA re-trained into the same path does not pass for the old."""
    from ..hub import hash_cache_file

    cache = hash_cache_file(model_dir)
    return {"format": EVAL_FORMAT, **cfg.identity(),
            "model_sha256": {role: _sha256(p, cache) for role, p in sorted(model_paths.items())},
            "arm_files": {a.name: [{"sha256": _sha256(path, cache), "alpha": alpha} for path, alpha in a.loras]
                          for a in cfg.arms}}


def folder_difference(out_dir: str, record: dict) -> str | None:
    """Why `out_dir` holds another eval than `record` (None: it is empty, or the same eval up to
    arms whose files changed, which `check_folder` makes again): other settings, an older format,
    or an eval.json that does not parse."""
    path = os.path.join(out_dir, EVAL_JSON)
    if not os.path.exists(path):
        return None
    try:
        old = read_json(path, "eval record", "")
    except FileFormatError as e:
        return f"its {EVAL_JSON} is damaged: {e.problem}"
    if old.get("format") != EVAL_FORMAT:
        return f"an eval of format {old.get('format')}, this version writes format {EVAL_FORMAT}"
    files = ("model_sha256", "arm_files")
    return first_difference({k: v for k, v in old.items() if k not in files},
                            {k: v for k, v in record.items() if k not in files})


def check_folder(out_dir: str, record: dict) -> None:
    """Refuse an eval folder of another eval (naming the first difference); an arm whose LoRA
    files (or the model's files, for every arm) are not those its images were made with gets its
    images made again, with a warning: re-training a LoRA into the same path and evaluating it
    into the same --out is asking for the new LoRA's images."""
    import shutil

    path = os.path.join(out_dir, EVAL_JSON)
    diff = folder_difference(out_dir, record)
    if diff:
        raise UsageError(f"--out {out_dir} belongs to another eval ({diff}); use a new --out, or delete the folder "
                         "to evaluate into it again (nothing in it was changed)")
    if os.path.exists(path):
        old = read_json(path, "eval record", "")
        stale = [a for a in record["arms"] if old["model_sha256"] != record["model_sha256"]
                 or old["arm_files"].get(a) != record["arm_files"][a]]
        if not stale:
            return
        for arm in stale:
            why = (first_difference(old["model_sha256"], record["model_sha256"], "model_sha256")
                   or first_difference(old["arm_files"].get(arm), record["arm_files"][arm], f"{arm}.loras"))
            logger.warning("eval arm %s: its files are not those its images were made with (%s): making its images "
                           "again", arm, why)
            shutil.rmtree(os.path.join(out_dir, "images", arm), ignore_errors=True)
    atomic_write_json(path, record, shared=True)


def generate_arm(pipe, cfg: EvalConfig, arm: Arm, out_dir: str, progress: bool = True) -> int:
    """This rank's missing images of one arm, in batches; returns how many were generated."""
    from tqdm import tqdm

    from ..interact.images import png_bytes
    from ..lora import load_lora, unload_lora
    from ..pipeline import generate_batch

    info = process_info()
    rank, world = info.rank, info.world
    todo = [(p, k) for p in range(len(cfg.prompts)) if p % world == rank for k in range(cfg.seeds)
            if not os.path.isfile(image_path(out_dir, arm.name, p, k))]
    if not todo:
        return 0
    handles = [load_lora(pipe, path, alpha) for path, alpha in arm.loras]
    try:
        bar = tqdm(total=len(todo), desc=f"eval {arm.name}", unit="image", disable=not progress)
        for start in range(0, len(todo), cfg.batch_size):
            part = todo[start:start + cfg.batch_size]
            images = generate_batch(pipe, [cfg.prompts[p].prompt for p, _ in part],
                                    [item_seed(cfg, p, k) for p, k in part], steps=cfg.steps, height=cfg.height,
                                    width=cfg.width, embedded_guidance=cfg.guidance)
            for (p, k), image in zip(part, images, strict=True):
                atomic_write_bytes(image_path(out_dir, arm.name, p, k), png_bytes(image))
            bar.update(len(part))
        bar.close()
    finally:
        for report in reversed(handles):
            unload_lora(pipe, report.handle)
    return len(todo)


def check_loras_fit(pipe, arms: list[Arm]) -> None:
    """Merge and unmerge every arm's LoRAs once before any image is made: a LoRA of another
    model is a one-line error now, not after the first arms' images."""
    from ..lora import load_lora, unload_lora

    for arm in arms:
        for path, alpha in arm.loras:
            try:
                report = load_lora(pipe, path, alpha)
            except ArtaugError as e:
                raise UsageError(f"arm {arm.name}: {e}") from None
            unload_lora(pipe, report.handle)


def score_all(cfg: EvalConfig, out_dir: str, scorer, progress: bool = True) -> tuple[dict, ScoreCache]:
    """{arm: {metric: array [prompts * seeds]}} from the cache, scoring only what is new."""
    from tqdm import tqdm

    from ..interact.images import load_image

    cache = ScoreCache(os.path.join(out_dir, "scores.jsonl"))
    scores: dict[str, dict[str, list[float]]] = {a.name: {} for a in cfg.arms}
    bar = tqdm(total=len(cfg.prompts) * len(cfg.arms), desc="scoring", unit="prompt", disable=not progress)
    for p, item in enumerate(cfg.prompts):
        for arm in cfg.arms:
            paths = [image_path(out_dir, arm.name, p, k) for k in range(cfg.seeds)]
            shas = [image_sha256(path) for path in paths]
            for row in cache.score(scorer, paths, shas, item.prompt, load=load_image):
                for key, value in row.items():
                    scores[arm.name].setdefault(key, []).append(value)
            bar.update(1)
    bar.close()
    return {a: {k: np.asarray(v, dtype=np.float64) for k, v in m.items()} for a, m in scores.items()}, cache


def compare(cfg: EvalConfig, scores: dict, kinds: dict[str, str], lower: frozenset[str] = frozenset(),
            selection: frozenset[str] = frozenset()) -> dict:
    """Per candidate arm and metric: the paired summary against arms[0], overall and by category.
    The metrics in `lower` win a pair by the lower value; those in `selection` (the run's filter
    scored them) are marked "selection": True. A pair with a NaN score (a prompt the scorer cannot
    read, such as one outside the scene grammar) is left out and counted as not measurable."""
    base = cfg.arms[0].name
    groups = np.repeat(np.arange(len(cfg.prompts)), cfg.seeds)
    categories = np.repeat(np.array([p.category or "" for p in cfg.prompts]), cfg.seeds)
    out = {}
    for arm in cfg.arms[1:]:
        rows = {}
        for metric, kind in kinds.items():
            a, b = scores[arm.name].get(metric), scores[base].get(metric)
            if a is None or b is None:
                continue
            ok = np.isfinite(a) & np.isfinite(b)  # NaN: a prompt outside the analyser's or the judge's grammar
            unmeasured = int((~ok).sum())
            if not ok.any():
                rows[metric] = {"kind": kind, "skipped": f"not measurable: none of the {ok.size} pairs has a score "
                                                        "(prompts the scorer cannot read)", "not_measurable": unmeasured}
                continue
            if ok.sum() < 2 or len(set(groups[ok])) < 2:
                rows[metric] = {"kind": kind, "skipped": f"{int(ok.sum())} scored pairs: too few for an interval",
                                "not_measurable": unmeasured}
                continue
            row = summarize_metric(a[ok], b[ok], groups=groups[ok],
                                   kind="preference" if kind == "preference" else "score", n_boot=cfg.n_boot,
                                   seed=cfg.seed, lower_is_better=metric in lower)
            row = {**_plain(row), "kind": kind, "not_measurable": unmeasured}
            by_cat = {}
            for cat in sorted(set(categories[ok])):
                sel = ok & (categories == cat)
                # stats.pair_wins, not stats.win_rate: that wants 2 pairs, and a category may hold one
                by_cat[cat] = {"n": int(sel.sum()), "mean_a": float(a[sel].mean()), "mean_b": float(b[sel].mean()),
                               "mean_diff": float((a[sel] - b[sel]).mean()),
                               "win_rate": float(pair_wins(a[sel], b[sel], metric in lower).mean())}
            row["by_category"] = by_cat
            if metric in selection:
                row["selection"] = True
            rows[metric] = row
        for metric, why in UNAVAILABLE.items():
            rows[metric] = {"kind": "unavailable", "skipped": why}
        out[arm.name] = rows
    return out


def _plain(d: dict) -> dict:
    """numpy values to JSON-able Python values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (tuple, list, np.ndarray)):
            out[k] = [float(x) for x in v]
        elif isinstance(v, (np.floating, np.integer)):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def run_eval(cfg: EvalConfig, out_dir: str, *, pipe=None, scorer=None, model_dir: str | None = None,
             device: str | None = None, progress: bool = True, report: bool = True,
             collective: Collective | None = None) -> dict:
    """Generate what is missing, score what is new, compare, write results.json (and report.html)."""
    cfg.validate()
    out_dir = os.path.abspath(out_dir)
    collective = collective or Collective()
    rank, world = collective.info.rank, collective.info.world
    os.makedirs(out_dir, exist_ok=True)
    lock = lock_folder(out_dir, collective, EVAL_LOCK, what="eval folder")
    try:
        collective.check_shared_folder(out_dir)  # the main process scores every rank's images
        if pipe is not None and getattr(pipe, "artaug_model_paths", None):
            paths = pipe.artaug_model_paths
        else:
            from ..pipeline import model_paths

            paths = model_paths(cfg.model, model_dir)
        record = folder_record(cfg, paths, model_dir)
        collective.on_main(lambda: check_folder(out_dir, record))  # it may remove a stale arm's images
        if scorer is None:
            from .scoring import make_scorer

            scorer = make_scorer(cfg.scorer, model_dir=model_dir, device=device)
        t0 = time.perf_counter()
        generated = 0
        missing = any(not os.path.isfile(image_path(out_dir, a.name, p, k)) for a in cfg.arms
                      for p in range(len(cfg.prompts)) for k in range(cfg.seeds))
        if missing:
            if pipe is None:
                from ..pipeline import load_pipeline

                pipe = load_pipeline(cfg.model, model_dir=model_dir, device=device, quantize=cfg.quantize,
                                     text_encoders=cfg.text_encoders)
            check_loras_fit(pipe, cfg.arms)
            for arm in cfg.arms:
                generated += generate_arm(pipe, cfg, arm, out_dir, progress)
        gen_s = time.perf_counter() - t0
        if world > 1:
            _wait_for_images(cfg, out_dir)
        if rank != 0:
            return {"generated": generated}
        t1 = time.perf_counter()
        scores, cache = score_all(cfg, out_dir, scorer, progress)
        score_s = time.perf_counter() - t1
        kinds = metric_kinds(scorer)
        arms = [{"name": a.name, "loras": [{"file": os.path.basename(p) if os.path.exists(p) else p, **f}
                                           for (p, _), f in zip(a.loras, record["arm_files"][a.name], strict=True)]}
                for a in cfg.arms]  # by content and file name: no path, so the folder can move
        selection = selection_metrics(scorer, cfg.selection_scorer)
        comparisons = compare(cfg, scores, kinds, lower_is_better(scorer), selection)
        result = {"model": cfg.model, "arms": arms, "prompts": len(cfg.prompts),
                  "seeds": cfg.seeds, "scorer": scorer.identity(), "comparisons": comparisons,
                  "selection_scorer": cfg.selection_scorer, "selection_metrics": sorted(selection),
                  "means": {a: {k: float(np.nanmean(v)) for k, v in m.items() if np.isfinite(v).any()}
                            for a, m in scores.items()},
                  "timing": {"generated_images": generated, "generation_seconds": round(gen_s, 2),
                             "scoring_seconds": round(score_s, 3), "scorer_forward_passes": cache.forward_passes,
                             "score_cache_hits": cache.hits}}
        atomic_write_json(os.path.join(out_dir, "results.json"), result)
        if report:
            from .report import write_eval_report

            result["report"] = write_eval_report(out_dir, cfg, result, scores)
        logger.info("eval: %d images generated in %.1fs; %d scorer forward passes (%d cached) in %.2fs", generated,
                    gen_s, cache.forward_passes, cache.hits, score_s)
        return result
    finally:
        if lock is not None:
            lock.release()


def _wait_for_images(cfg: EvalConfig, out_dir: str, timeout: float = 24 * 3600) -> None:
    """Every rank's images exist (ranks generate in parallel; the main process scores them all)."""
    deadline = time.time() + timeout
    while True:
        missing = [(a.name, p, k) for a in cfg.arms for p in range(len(cfg.prompts)) for k in range(cfg.seeds)
                   if not os.path.isfile(image_path(out_dir, a.name, p, k))]
        if not missing or time.time() > deadline:
            break
        time.sleep(2)
    if missing:
        raise UsageError(f"{len(missing)} images never appeared in {out_dir} (did a rank fail?)")


def format_table(result: dict) -> str:
    """The comparison as text, laid out like the ArtAug paper's table."""
    lines = []
    base = result["arms"][0]["name"]
    for arm, rows in result["comparisons"].items():
        lines.append(f"{arm} vs {base}: {result['prompts']} prompts x {result['seeds']} seeds")
        lines.append(f"  {'metric':<18}{base:>11}{arm:>11}   {'difference [95% CI]':<28}{'win rate [95% CI]'}")
        for metric, r in rows.items():
            if "skipped" in r:
                lines.append(f"  {metric:<18}{r['skipped']}")
                continue
            win = f"{r['win_rate']:.1%} [{r['win_ci'][0]:.1%}, {r['win_ci'][1]:.1%}]"
            label = f"  ({SELECTION_LABEL})" if r.get("selection") else ""
            if r["kind"] == "preference":
                pa, (lo, hi) = r["preference"], r["preference_ci"]
                pref = f"P({arm} preferred) [{lo:.2%}, {hi:.2%}]"
                lines.append(f"  {metric + ' pref.':<18}{1 - pa:>10.2%} {pa:>10.2%}   {pref:<28}{win}{label}")
                continue
            lo, hi = r["diff_ci"]
            diff = f"{r['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            lines.append(f"  {metric:<18}{r['mean_b']:>11.4f}{r['mean_a']:>11.4f}   {diff:<28}{win}{label}")
        if any(r.get("selection") for r in rows.values()):
            lines.append(f"  {SELECTION_LABEL}: the run's filter scorer ({result.get('selection_scorer')}) chose "
                         "the pairs trained on by this score; the verdict leaves it out")
        lower = [m for m, r in rows.items() if r.get("better") == "lower"]
        if lower:
            lines.append(f"  lower is better for {', '.join(lower)}: their win rate counts the lower value")
        unread = {m: r["not_measurable"] for m, r in rows.items() if r.get("not_measurable") and "skipped" not in r}
        if unread:
            lines.append("  not measurable, left out: " + ", ".join(f"{m} {n} pairs" for m, n in unread.items())
                         + " (prompts the scorer cannot read)")
    return "\n".join(lines)
