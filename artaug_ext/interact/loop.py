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
A torn last manifest line (killed mid-append) is cut off on restart, and a finished item whose
image is missing or does not decode is made again (same seed, same bytes). Byte-identity assumes
the same device and torch thread count on every start (they change float rounding).

Multi-GPU: under `accelerate launch` or `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK), prompts are
sharded by `prompt_index % world_size`; each rank writes its own shard and the last rank to
finish merges them. `merge_manifests` and `export_pairs` also run on their own.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time

from PIL import Image

from ..buckets import bucket_size
from ..dist import Collective, lock_folder
from ..errors import FileFormatError, UsageError
from ..files import append_line, atomic_write_bytes, json_line, sha256_path
from ..hub import hash_cache_file
from .config import INTERACT_LOCK, InteractConfig, check_run_json, item_id, run_settings
from .enhance import enhance
from .images import load_image, png_bytes
from .keep import keep_pair
from .manifest import (
    all_ranks_done,
    done_path,
    finished_ids,
    merge_manifests,
    read_manifest,
    shard_path,
    summarize,
)
from .parse import ParseResult, split_identities
from .pictures import pair_picture

logger = logging.getLogger(__name__)


class InteractRun:
    """One rank's share of a run; `run()` processes its unfinished items in order."""

    def __init__(self, cfg: InteractConfig, run_dir: str, *, pipe=None, critic=None, scorer=None,
                 model_dir: str | None = None, device: str | None = None, progress: bool = True,
                 collective: Collective | None = None):
        self.cfg, self.run_dir, self.progress = cfg, os.path.abspath(run_dir), progress
        collective = collective or Collective()
        info = collective.info
        self.rank, self.world, local = info.rank, info.world, info.local_rank
        if device in (None, "cuda") and self.world > 1:
            import torch

            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"  # one GPU per rank
        from ..pipeline import default_size, default_steps, t5_sequence_length

        self.steps = cfg.steps or default_steps(cfg.model)
        self.height = cfg.height or default_size(cfg.model)
        self.width = cfg.width or default_size(cfg.model)
        self.t5_len = t5_sequence_length(cfg.model)
        if cfg.sizes is not None and len(cfg.sizes) != len(cfg.prompts):
            raise UsageError(f"InteractConfig.sizes holds {len(cfg.sizes)} sizes for {len(cfg.prompts)} prompts; "
                             "give one per prompt (None: the run's size), or sizes=None")
        # One lock on the folder for the whole launch, before anything expensive: a second run
        # of any world size is refused on every rank, naming the process that holds it.
        self.lock = lock_folder(self.run_dir, collective, INTERACT_LOCK)
        try:
            collective.check_shared_folder(self.run_dir)  # ranks merge each other's shards
            self._setup(pipe, critic, scorer, model_dir, device)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

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

            pipe = load_pipeline(cfg.model, model_dir=model_dir, device=device, quantize=cfg.quantize,
                                 text_encoders=cfg.text_encoders)
            for path, alpha in cfg.loras:
                # Ours, not `pipe.load_lora`: DiffSynth's merges 0 tensors of a LoRA in its own
                # training format (the previous round's) without an error, and merges in bf16.
                load_lora(pipe, path, alpha=alpha)
        self.pipe = pipe
        paths = getattr(pipe, "artaug_model_paths", {}) or {}
        cache = hash_cache_file()
        self.model_sha = {role: sha256_path(p, cache) for role, p in sorted(paths.items()) if isinstance(p, str)}
        self.lora_sha = [{"path": os.path.basename(p), "alpha": a, "sha256": sha256_path(p, cache)} for p, a in cfg.loras]

    def items(self) -> list[tuple[int, int]]:
        n = self.cfg.images_per_prompt
        return [(p, i) for p in range(len(self.cfg.prompts)) if p % self.world == self.rank for i in range(n)]

    def _cleanup_tmp(self, ids: list[str]) -> None:
        for i in ids:
            for p in glob.glob(os.path.join(self.run_dir, "*", f"{i}*.tmp")):
                os.remove(p)

    def _redo_damaged(self, shard: str) -> None:
        """This rank's finished items whose images are missing or do not decode are no longer
        finished: their manifest lines are taken out (with a warning naming the file), so they are
        made again from their seeds, the same bytes as the originals."""
        records = read_manifest(shard)
        kept, redo = [], 0
        for r in records:
            broken = [rel for rel in (r.get("original"), r.get("enhanced"), r.get("picture"))
                      if rel and not _readable(os.path.join(self.run_dir, rel))]
            for rel in broken:
                logger.warning("%s: missing or not a readable image: item %s is made again (same seed)",
                               os.path.join(self.run_dir, rel), r["id"])
            if broken:
                redo += 1
            else:
                kept.append(r)
        if redo:
            atomic_write_bytes(shard, b"".join(json_line(r) for r in kept))
            marker = done_path(self.run_dir, self.rank, self.world)
            if os.path.exists(marker):
                os.remove(marker)

    def size_of(self, prompt_index: int) -> tuple[int, int]:
        """(width, height) of a prompt's images: the bucket of the size it asks for under the
        run's pixel budget (`buckets.bucket_size`), or the run's size."""
        sizes = self.cfg.sizes
        if sizes and sizes[prompt_index]:
            return bucket_size(*sizes[prompt_index], self.width * self.height)
        return self.width, self.height

    def _common(self, prompt_index: int, image_index: int) -> dict:
        seed = self.cfg.seed + prompt_index * self.cfg.images_per_prompt + image_index
        width, height = self.size_of(prompt_index)
        return dict(seed=seed, steps=self.steps, height=height, width=width, t5_sequence_length=self.t5_len,
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
        usable, identities = split_identities(critique.suggestions, prompt)
        critique = ParseResult(usable, critique.reason)
        record = {
            "id": iid, "prompt_index": prompt_index, "image_index": image_index, "prompt": prompt, "seed": common["seed"],
            "model": cfg.model, "model_sha256": self.model_sha, "loras": self.lora_sha, "steps": self.steps,
            "height": common["height"], "width": common["width"], "critic": cfg.critic,
            "suggestions": [s.to_dict() for s in critique.suggestions], "critic_reason": critique.reason,
            "identity_suggestions": identities,
            "original": f"images/{iid}.original.png", "enhanced": None, "picture": None, "scores": {}, "gain": None,
            "kept": False,
        }
        if not critique.suggestions:
            record["why"] = (f"no usable suggestions: the {identities} made had the global prompt as their local prompt "
                             "(an identity blend)" if identities else f"no suggestions: {critique.reason}")
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
            self._release()

    def _run(self) -> dict:
        from tqdm import tqdm

        os.makedirs(os.path.join(self.run_dir, "shards"), exist_ok=True)
        check_run_json(self.run_dir, run_settings(self.cfg, self.model_sha, self.lora_sha, self.critic, self.scorer))
        shard = shard_path(self.run_dir, self.rank, self.world)
        read_manifest(shard, repair=True)
        self._redo_damaged(shard)
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
        atomic_write_bytes(done_path(self.run_dir, self.rank, self.world), b"done\n")
        merged = merge_manifests(self.run_dir) if all_ranks_done(self.run_dir, self.world) else None
        stats = summarize(self.run_dir, self.scorer.quality_keys if self.scorer else ())
        stats.update(processed=len(todo), seconds=round(seconds, 3), merged=merged)
        return stats


def _readable(path: str) -> bool:
    """The image file exists and decodes whole."""
    try:
        load_image(path)
    except (FileFormatError, FileNotFoundError):
        return False
    return True


def run_interact(cfg: InteractConfig, run_dir: str, **kwargs) -> dict:
    """Run (or resume) this rank's share of a pair dataset; returns counts and seconds."""
    return InteractRun(cfg, run_dir, **kwargs).run()
