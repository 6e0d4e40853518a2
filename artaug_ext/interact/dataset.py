"""Resumable pair datasets: generate -> critique -> enhance -> score -> keep, one item at a time.

A run folder holds

    run.json                      the settings and the model/LoRA sha256 (a resume must match)
    images/{id}.original.png      the original image of each item
    images/{id}.enhanced.png      the enhanced image (when the critic had suggestions)
    pictures/{id}.png             side-by-side picture of each kept pair
    shards/manifest-rank{r}-of-{w}.jsonl   one JSON line per finished item, per rank
    manifest.jsonl                all shards merged, ordered by item

Every file is written atomically (temporary file, fsync, rename) and an item's manifest line is
appended last, so a run killed at any point and started again skips finished items, redoes the
one in flight and ends byte-identical to an uninterrupted run (no timestamps in any file).
A torn last manifest line (killed mid-append) is cut off on restart. Byte-identity assumes
the same device and torch thread count on every start (they change float rounding).

Multi-GPU: under `accelerate launch` or `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK), prompts are
sharded by `prompt_index % world_size`; each rank writes its own shard and the last rank to
finish merges them. `merge_manifests` and `export_pairs` also run on their own.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

from PIL import Image

from ..errors import FileFormatError, UsageError
from ..files import (
    FolderLock,
    append_line,
    atomic_write_bytes,
    atomic_write_json,
    json_line,
    read_jsonl,
    read_text_lines,
    recorded_difference,
    sha256_file,
)
from .constants import DEFAULT_REGION_SCALE
from .enhance import enhance
from .parse import ParseResult
from .pictures import pair_picture
from .scorers import FilterConfig, keep_pair

logger = logging.getLogger(__name__)

RUN_FORMAT = 1


# ---------------------------------------------------------------------------- files

def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_manifest(path: str, repair: bool = False) -> list[dict]:
    """Records of a JSONL manifest; a torn last line (no newline) is ignored, or cut off if `repair`;
    a corrupt line elsewhere raises naming the file and line."""
    return read_jsonl(path, repair=repair, what="manifest")


def _hash_cache_path() -> str:
    from ..hub import model_root

    return os.path.join(model_root(), ".artaug-sha256-cache.json")


def cached_sha256_file(path: str) -> str:
    """sha256 of a file, remembered by (real path, size, mtime) in the model root: FLUX.1-dev's
    files are 30+ GB, and every start and every rank would otherwise hash them again."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _hash_cache_path()
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_file(real)
    if st.st_size >= 64 << 20:  # only big files are worth remembering
        cache[key] = digest
        try:
            atomic_write_bytes(cache_file, json.dumps(cache, indent=0).encode(), shared=True)
        except OSError:
            pass
    return digest


def sha256_path(path: str) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted)."""
    if os.path.isfile(path):
        return cached_sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            h.update(os.path.relpath(p, path).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun / accelerate launch, else (0, 1, 0)."""
    rank = int(os.environ.get("RANK", os.environ.get("PMI_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("PMI_SIZE", 1)))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


# ---------------------------------------------------------------------------- run

@dataclass
class InteractConfig:
    """Everything that defines a run's output (device and progress excluded)."""

    prompts: list[str]
    model: str = "tiny"
    loras: list[tuple[str, float]] = field(default_factory=list)
    critic: str = "heuristic"
    critic_options: dict = field(default_factory=dict)
    scorer: str = "heuristic"
    images_per_prompt: int = 1
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    region_scale: float = DEFAULT_REGION_SCALE
    guidance: float = 3.5
    filter: FilterConfig = field(default_factory=FilterConfig)
    pictures: bool = True


def item_id(prompt_index: int, image_index: int) -> str:
    return f"{prompt_index:05d}-{image_index:02d}"


def _settings(cfg: InteractConfig, model_sha: dict, lora_sha: list[dict], critic, scorer) -> dict:
    """What run.json records: the config as the critic and scorer describe themselves (so equal
    settings spelled differently compare equal), model and LoRA hashes."""
    d = asdict(cfg)
    d["filter"] = cfg.filter.to_dict()
    d.pop("critic_options")
    d["critic"] = critic.describe() if hasattr(critic, "describe") else cfg.critic
    d["scorer"] = scorer.describe() if hasattr(scorer, "describe") else cfg.scorer
    d["loras"] = lora_sha
    d["model_sha256"] = model_sha
    d["format"] = RUN_FORMAT
    return d


def _check_run_json(run_dir: str, settings: dict) -> None:
    path = os.path.join(run_dir, "run.json")
    diff = recorded_difference(path, settings)
    if diff:
        raise UsageError(f"--out {run_dir} holds a run with other settings ({diff}); resume with the same settings "
                         "or use a new --out")
    if not os.path.exists(path):
        atomic_write_json(path, settings, shared=True)


def shard_path(run_dir: str, rank: int, world: int) -> str:
    return os.path.join(run_dir, "shards", f"manifest-rank{rank:05d}-of-{world:05d}.jsonl")


def finished_ids(run_dir: str) -> set[str]:
    done = set()
    for p in glob.glob(os.path.join(run_dir, "shards", "manifest-rank*.jsonl")):
        done.update(r["id"] for r in read_manifest(p))
    return done


def merge_manifests(run_dir: str) -> int:
    """Merge every shard into manifest.jsonl (ordered by item, one line per item); returns lines."""
    records = {}
    for p in sorted(glob.glob(os.path.join(run_dir, "shards", "manifest-rank*.jsonl"))):
        for r in read_manifest(p):
            records.setdefault(r["id"], r)
    ordered = [records[k] for k in sorted(records)]
    atomic_write_bytes(os.path.join(run_dir, "manifest.jsonl"), b"".join(json_line(r) for r in ordered), shared=True)
    return len(ordered)


def _all_ranks_done(run_dir: str, world: int) -> bool:
    return all(os.path.exists(os.path.join(run_dir, "shards", f"done-rank{r:05d}-of-{world:05d}")) for r in range(world))


class InteractRun:
    """One rank's share of a run; `run()` processes its unfinished items in order."""

    def __init__(self, cfg: InteractConfig, run_dir: str, *, pipe=None, critic=None, scorer=None,
                 model_dir: str | None = None, device: str | None = None, progress: bool = True):
        self.cfg, self.run_dir, self.progress = cfg, os.path.abspath(run_dir), progress
        self.rank, self.world, local = dist_info()
        if device in (None, "cuda") and self.world > 1:
            import torch

            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"  # one GPU per rank
        from ..pipeline import default_size, default_steps, t5_sequence_length

        self.steps = cfg.steps or default_steps(cfg.model)
        self.height = cfg.height or default_size(cfg.model)
        self.width = cfg.width or default_size(cfg.model)
        self.t5_len = t5_sequence_length(cfg.model)
        # This rank's lock on the folder, before anything expensive: a second run of the same
        # rank on the same folder is refused, naming the process that holds it.
        self.lock = FolderLock(self.run_dir, f".artaug-lock-rank{self.rank:05d}-of-{self.world:05d}").acquire()
        try:
            self._setup(pipe, critic, scorer, model_dir, device)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, pipe, critic, scorer, model_dir, device) -> None:
        """Critic and scorer first (their configuration errors cost nothing), then the pipeline."""
        from ..pipeline import load_pipeline

        cfg = self.cfg
        if critic is None:
            from .critics import make_critic

            options = dict(cfg.critic_options)
            if cfg.critic == "transformers" and self.world > 1:
                # One copy of the VLM on this rank's device: device_map="auto" on every rank
                # would spread every rank's copy over all GPUs.
                options.setdefault("device_map", device or "cpu")
            critic = make_critic(cfg.critic, **options)
        self.critic = critic
        if scorer is None:
            from .scorers import make_scorer

            scorer = make_scorer(cfg.scorer, model_dir=model_dir, device=device)
        self.scorer = scorer
        if pipe is None:
            from ..lora import load_lora

            pipe = load_pipeline(cfg.model, model_dir=model_dir, device=device)
            for path, alpha in cfg.loras:
                # Ours, not `pipe.load_lora`: DiffSynth's merges 0 tensors of a LoRA in its own
                # training format (the previous round's) without an error, and merges in bf16.
                load_lora(pipe, path, alpha=alpha)
        self.pipe = pipe
        paths = getattr(pipe, "artaug_model_paths", {}) or {}
        self.model_sha = {role: sha256_path(p) for role, p in sorted(paths.items()) if isinstance(p, str)}
        self.lora_sha = [{"path": os.path.basename(p), "alpha": a, "sha256": cached_sha256_file(p)} for p, a in cfg.loras]

    def items(self) -> list[tuple[int, int]]:
        n = self.cfg.images_per_prompt
        return [(p, i) for p in range(len(self.cfg.prompts)) if p % self.world == self.rank for i in range(n)]

    def _cleanup_tmp(self, ids: list[str]) -> None:
        for i in ids:
            for p in glob.glob(os.path.join(self.run_dir, "*", f"{i}*.tmp")):
                os.remove(p)

    def _common(self, prompt_index: int, image_index: int) -> dict:
        seed = self.cfg.seed + prompt_index * self.cfg.images_per_prompt + image_index
        return dict(seed=seed, steps=self.steps, height=self.height, width=self.width, t5_sequence_length=self.t5_len,
                    embedded_guidance=self.cfg.guidance)

    def generate_original(self, prompt_index: int, image_index: int) -> Image.Image:
        """Step 1: the original image, written as images/{id}.original.png."""
        original = enhance(self.pipe, self.cfg.prompts[prompt_index], [], **self._common(prompt_index, image_index))
        rel = f"images/{item_id(prompt_index, image_index)}.original.png"
        atomic_write_bytes(os.path.join(self.run_dir, rel), png_bytes(original))
        return original

    def critique_many(self, items: list[tuple[Image.Image, str]]) -> list[ParseResult]:
        """Step 2: critiques; concurrent for critics that can (a VLM server), in order."""
        if len(items) > 1 and hasattr(self.critic, "critique_many"):
            results = self.critic.critique_many(items)
        else:
            results = [self.critic.critique(image, prompt) for image, prompt in items]
        for r in results:
            if not isinstance(r, ParseResult):
                raise TypeError(f"critic {self.cfg.critic} returned {type(r).__name__}, not ParseResult")
        return results

    def finish(self, prompt_index: int, image_index: int, original: Image.Image, critique: ParseResult) -> dict:
        """Steps 3-5: enhance, score, keep or not, picture; returns the manifest record."""
        cfg, pipe = self.cfg, self.pipe
        prompt = cfg.prompts[prompt_index]
        iid = item_id(prompt_index, image_index)
        common = self._common(prompt_index, image_index)
        record = {
            "id": iid, "prompt_index": prompt_index, "image_index": image_index, "prompt": prompt, "seed": common["seed"],
            "model": cfg.model, "model_sha256": self.model_sha, "loras": self.lora_sha, "steps": self.steps,
            "height": self.height, "width": self.width, "critic": cfg.critic,
            "suggestions": [s.to_dict() for s in critique.suggestions], "critic_reason": critique.reason,
            "original": f"images/{iid}.original.png", "enhanced": None, "picture": None, "scores": {}, "gain": None,
            "kept": False,
        }
        if not critique.suggestions:
            record["why"] = f"no suggestions: {critique.reason}"
            return record
        enhanced = enhance(pipe, prompt, critique.suggestions, scale=cfg.region_scale, **common)
        rel_enh = f"images/{iid}.enhanced.png"
        atomic_write_bytes(os.path.join(self.run_dir, rel_enh), png_bytes(enhanced))
        s_orig, s_enh = self.scorer.score([original, enhanced], prompt)
        kept, why, gain = keep_pair(s_orig, s_enh, self.scorer, cfg.filter)
        record.update(enhanced=rel_enh, scores={"original": s_orig, "enhanced": s_enh},
                      gain=round(gain, 6) if math.isfinite(gain) else None, kept=kept, why=why)
        if kept and cfg.pictures:
            rel_pic = f"pictures/{iid}.png"
            pic = pair_picture(original, enhanced, critique.suggestions, prompt)
            atomic_write_bytes(os.path.join(self.run_dir, rel_pic), png_bytes(pic))
            record["picture"] = rel_pic
        return record

    def process(self, prompt_index: int, image_index: int) -> dict:
        """One item start to finish (the manifest line is the caller's to write)."""
        original = self.generate_original(prompt_index, image_index)
        (critique,) = self.critique_many([(original, self.cfg.prompts[prompt_index])])
        return self.finish(prompt_index, image_index, original, critique)

    def run(self) -> dict:
        """Process this rank's unfinished items, then release the folder lock."""
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict:
        from tqdm import tqdm

        os.makedirs(os.path.join(self.run_dir, "shards"), exist_ok=True)
        _check_run_json(self.run_dir, _settings(self.cfg, self.model_sha, self.lora_sha, self.critic, self.scorer))
        shard = shard_path(self.run_dir, self.rank, self.world)
        read_manifest(shard, repair=True)
        done = finished_ids(self.run_dir)
        mine = self.items()
        todo = [it for it in mine if item_id(*it) not in done]
        self._cleanup_tmp([item_id(*it) for it in todo])
        if done & {item_id(*it) for it in mine}:
            logger.info("resuming: %d of %d items already done", len(mine) - len(todo), len(mine))
        t0 = time.perf_counter()
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="item", desc=f"interact rank {self.rank}",
                   disable=not self.progress)
        # Items go in chunks as large as the critic's concurrency: originals first, then their
        # critiques in parallel (a VLM server is slow per request), then enhancement in order.
        chunk = max(1, int(getattr(self.critic, "max_concurrency", 1) or 1))
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            originals = []
            for p, i in part:
                originals.append(self.generate_original(p, i))
            critiques = self.critique_many([(im, self.cfg.prompts[p]) for im, (p, _) in zip(originals, part, strict=True)])
            for (p, i), original, critique in zip(part, originals, critiques, strict=True):
                append_line(shard, self.finish(p, i, original, critique))
                bar.update(1)
        bar.close()
        seconds = time.perf_counter() - t0
        atomic_write_bytes(os.path.join(self.run_dir, "shards", f"done-rank{self.rank:05d}-of-{self.world:05d}"), b"done\n")
        merged = merge_manifests(self.run_dir) if _all_ranks_done(self.run_dir, self.world) else None
        stats = summarize(self.run_dir, self.scorer.quality_keys if self.scorer else ())
        stats.update(processed=len(todo), seconds=round(seconds, 3), merged=merged)
        return stats


def summarize(run_dir: str, quality_keys=()) -> dict:
    """Counts over all shards: items, enhanced, kept, and how often the enhanced image scored higher."""
    records = []
    for p in sorted(glob.glob(os.path.join(run_dir, "shards", "manifest-rank*.jsonl"))):
        records += read_manifest(p)
    enhanced = [r for r in records if r.get("enhanced")]
    prefer = 0
    for r in enhanced:
        keys = list(quality_keys) or [k for k in r["scores"]["original"] if k in ("quality", "aesthetic", "pickscore")]
        if keys and all(r["scores"]["enhanced"][k] > r["scores"]["original"][k] for k in keys):
            prefer += 1
    return {"items": len(records), "enhanced": len(enhanced), "kept": sum(bool(r.get("kept")) for r in records),
            "enhanced_preferred": prefer,
            "preference_rate": round(prefer / len(enhanced), 4) if enhanced else None}


def run_interact(cfg: InteractConfig, run_dir: str, **kwargs) -> dict:
    """Run (or resume) this rank's share of a pair dataset; returns counts and seconds."""
    return InteractRun(cfg, run_dir, **kwargs).run()


# ---------------------------------------------------------------------------- export

def export_pairs(run_dir: str, out_dir: str, keep_fraction: float = 1.0, link: bool = True) -> int:
    """Kept pairs in the layout DiffSynth's trainer reads: `{out}/original/` and `{out}/enhanced/`,
    each with the images and `metadata.csv` / `metadata.jsonl` (columns `image`, `prompt`).

    `keep_fraction` < 1 keeps only the best share of kept pairs by quality gain. Returns the count.
    """
    if not 0 < keep_fraction <= 1:
        raise UsageError(f"--keep-fraction {keep_fraction} must be in (0, 1]")
    merge_manifests(run_dir)
    kept = [r for r in read_manifest(os.path.join(run_dir, "manifest.jsonl")) if r.get("kept") and r.get("enhanced")]
    kept.sort(key=lambda r: (-(r.get("gain") or 0.0), r["id"]))
    kept = sorted(kept[: math.ceil(len(kept) * keep_fraction)], key=lambda r: r["id"])
    for which in ("original", "enhanced"):
        folder = os.path.join(out_dir, which)
        os.makedirs(folder, exist_ok=True)
        rows = []
        for r in kept:
            name = os.path.basename(r[which])
            src, dst = os.path.join(run_dir, r[which]), os.path.join(folder, name)
            if not os.path.exists(dst):
                try:
                    if not link:
                        raise OSError
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            rows.append({"image": name, "prompt": r["prompt"]})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["image", "prompt"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(os.path.join(folder, "metadata.csv"), buf.getvalue().encode("utf-8"))
        atomic_write_bytes(os.path.join(folder, "metadata.jsonl"), b"".join(json_line(r) for r in rows))
    return len(kept)


# ---------------------------------------------------------------------------- reading pairs

@dataclass(frozen=True)
class Pair:
    """One kept pair: the prompt, the original and the enhanced image files."""

    id: str
    prompt: str
    original: str
    enhanced: str
    gain: float | None = None


def _csv_rows(path: str) -> list[dict]:
    rows = []
    lines = read_text_lines(path, "metadata file")
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not {"image", "prompt"} <= set(reader.fieldnames):
        raise FileFormatError(path, f"columns {reader.fieldnames} lack 'image' and 'prompt'",
                              "export the pairs again with `artaug interact-export`")
    for n, row in enumerate(reader, 2):
        if not row.get("image"):
            raise FileFormatError(f"{path}:{n}", "a row without an image", "fix or delete that row")
        rows.append(row)
    return rows


def read_pairs(path: str) -> list[Pair]:
    """The kept pairs of a pair dataset: a run folder of `artaug interact` (its manifest), or the
    output of `artaug interact-export` (original/ and enhanced/ with metadata.csv). Every image
    must exist; the error names the file that does not."""
    if os.path.isdir(os.path.join(path, "shards")) or os.path.isfile(os.path.join(path, "manifest.jsonl")):
        if os.path.isdir(os.path.join(path, "shards")):
            records = {}
            for p in sorted(glob.glob(os.path.join(path, "shards", "manifest-rank*.jsonl"))):
                for r in read_manifest(p):
                    records.setdefault(r["id"], r)
            records = [records[k] for k in sorted(records)]
        else:
            records = read_manifest(os.path.join(path, "manifest.jsonl"))
        pairs = [Pair(r["id"], r["prompt"], os.path.join(path, r["original"]), os.path.join(path, r["enhanced"]),
                      r.get("gain")) for r in records if r.get("kept") and r.get("enhanced")]
    elif os.path.isfile(os.path.join(path, "original", "metadata.csv")):
        originals = _csv_rows(os.path.join(path, "original", "metadata.csv"))
        enhanced = _csv_rows(os.path.join(path, "enhanced", "metadata.csv"))
        if len(originals) != len(enhanced):
            raise FileFormatError(path, f"{len(originals)} originals but {len(enhanced)} enhanced images in the "
                                  "metadata.csv files", "export the pairs again with `artaug interact-export`")
        pairs = []
        for o, e in zip(originals, enhanced, strict=True):
            if o["prompt"] != e["prompt"]:
                raise FileFormatError(path, f"the pair {o['image']} / {e['image']} has two prompts",
                                      "export the pairs again with `artaug interact-export`")
            pairs.append(Pair(o["image"].split(".")[0], o["prompt"], os.path.join(path, "original", o["image"]),
                              os.path.join(path, "enhanced", e["image"])))
    else:
        raise UsageError(f"{path}: not a pair dataset (neither a run folder of `artaug interact` nor an "
                         "`artaug interact-export` folder with original/metadata.csv)")
    for p in pairs:
        for image in (p.original, p.enhanced):
            if not os.path.isfile(image):
                raise FileFormatError(image, "missing image of a kept pair",
                                      "restore it, or run `artaug interact` again on the same folder")
    return pairs


def load_image(path: str) -> Image.Image:
    """An RGB image, fully decoded (a truncated or corrupt file raises naming it)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise FileFormatError(path, f"not a readable image ({type(e).__name__}: {e})",
                              "restore it, or delete it and run `artaug interact` again on the same folder") from None
