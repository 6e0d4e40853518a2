"""The latent cache of a round: every kept pair's prompt through the text encoders and both
images through the VAE, once, read by both stages of the differential LoRA.

One safetensors file per pair (`{cache}/{id}.safetensors`: original, enhanced, prompt_emb,
pooled_prompt_emb), written atomically, so a killed cache build resumes at the pair it was
on; with several processes, rank r encodes pairs r, r + world, ... `cache.json` records
what the latents depend on, and a cache built with other settings is refused.

Bucketed rounds (prompts that carry sizes, `artaug_ext.buckets`): pairs come in several sizes;
each pair is resized to its training bucket, its file records its size (metadata width and
height; its latents' shape), and the cache holds its pairs' latents as one tensor a pair where
the shapes differ, so that training draws batches of one bucket each.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass

import torch

from ..buckets import training_bucket
from ..errors import FileFormatError, UsageError
from ..files import check_safetensors, read_json, record_settings, save_safetensors

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
INFO_FILE = "cache.json"
FIELDS = ("original", "enhanced", "prompt_emb", "pooled_prompt_emb")


def training_size(width: int, height: int, resolution: int | None) -> tuple[int, int]:
    """The size images are resized to: the longer side `resolution` (None: as they are),
    aspect kept, both sides multiples of 16 (FLUX's 16-pixel patches)."""
    if resolution is None:
        return width, height
    scale = resolution / max(width, height)
    return max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)


def _rows(t: torch.Tensor | list[torch.Tensor], indices: list[int]) -> torch.Tensor:
    """Rows `indices` of a stacked tensor, or the stack of those per-pair tensors of a list."""
    if torch.is_tensor(t):
        return t[torch.tensor(indices, dtype=torch.long)]
    return torch.stack([t[i] for i in indices])


@dataclass
class LatentCache:
    """The cache tensors of a list of pairs, in memory: [N, ...] each, or for the latents of
    pairs in several buckets (sizes), a list of N per-pair tensors (one shape a bucket)."""

    ids: list[str]
    original: torch.Tensor | list[torch.Tensor]
    enhanced: torch.Tensor | list[torch.Tensor]
    prompt_emb: torch.Tensor
    pooled_prompt_emb: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> LatentCache:
        ix = torch.tensor(indices, dtype=torch.long)

        def pick(t):
            return t[ix] if torch.is_tensor(t) else [t[i] for i in indices]

        return LatentCache([self.ids[i] for i in indices], pick(self.original), pick(self.enhanced),
                           self.prompt_emb[ix], self.pooled_prompt_emb[ix])

    def buckets(self) -> list[tuple[int, ...]]:
        """Each pair's bucket: the shape of its latents (channels, height / 8, width / 8)."""
        return [tuple(self.original[i].shape) for i in range(len(self.ids))]

    def pair_sha256s(self) -> dict[str, str]:
        """Per pair, the sha256 of its tensors (field, dtype, shape and bytes): what a stage
        trained on the pair depends on, so a cache rebuilt from other images is told apart from
        the one a stage folder was trained on (a read of the cache: seconds on FLUX.1-dev's)."""
        out = {}
        for i, pair_id in enumerate(self.ids):
            h = hashlib.sha256()
            for f in FIELDS:
                t = getattr(self, f)[i].detach().cpu().contiguous()
                h.update(f"{f}:{t.dtype}:{list(t.shape)}\0".encode())
                if t.numel():
                    h.update(t.reshape(-1).view(torch.uint8).numpy())
            out[pair_id] = h.hexdigest()
        return out

    def pairs_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A training batch of both images of each pair with their prompt (paired objectives);
        the pairs must share a bucket."""
        return {"original": _rows(self.original, indices), "enhanced": _rows(self.enhanced, indices),
                "prompt_emb": _rows(self.prompt_emb, indices), "pooled_prompt_emb": _rows(self.pooled_prompt_emb, indices)}

    def batch(self, image_side: str, indices: list[int]) -> dict[str, torch.Tensor]:
        """A training batch of the `image_side` images ("original" or "enhanced") with their
        prompts; the pairs must share a bucket."""
        return {"latents": _rows(getattr(self, image_side), indices), "prompt_emb": _rows(self.prompt_emb, indices),
                "pooled_prompt_emb": _rows(self.pooled_prompt_emb, indices)}


def _item_path(cache_dir: str, pair_id: str) -> str:
    return os.path.join(cache_dir, f"{pair_id}.safetensors")


def _check_info(cache_dir: str, info: dict) -> None:
    path = os.path.join(cache_dir, INFO_FILE)
    if os.path.exists(path):
        try:
            read_json(path, "latent cache record", "")
        except FileFormatError as e:  # the latents' settings are unknown: the cache is made again
            logger.warning("%s: %s: encoding the latent cache %s again", path, e.problem, cache_dir)
            shutil.rmtree(cache_dir)
            os.makedirs(cache_dir)
    record_settings(path, info,
                    f"{cache_dir} caches latents made with other settings ({{diff}}); delete the folder to build it again")


def build_cache(pipe, pairs, cache_dir: str, *, t5_sequence_length: int, resolution: int | None = None,
                bucketed: bool = False, rank: int = 0, world: int = 1, progress: bool = True) -> int:
    """Encode this rank's share of `pairs` (interact.pairs.Pair) into `cache_dir`; pairs
    already cached are skipped. Returns how many were encoded now. `bucketed` (the round's
    prompts carry sizes): pairs may differ in size, each is trained at its own bucket
    (`buckets.training_bucket`); otherwise every image has the first's size and `resolution`
    is the longer side (`training_size`)."""
    from PIL import Image
    from tqdm import tqdm

    from ..interact.enhance import encode_prompts
    from ..interact.images import load_image

    if not pairs:
        raise UsageError("the latent cache needs at least one kept pair")
    first = load_image(pairs[0].original)
    width, height = training_size(first.width, first.height, resolution)
    # What the latents depend on: the round's one training size, or with buckets the rule (a size a pair)
    sizes = {"buckets": True, "resolution": resolution} if bucketed else {"width": width, "height": height}
    info = {"format": CACHE_FORMAT, "model": getattr(pipe, "artaug_model_name", "?"), **sizes,
            "t5_sequence_length": t5_sequence_length, "dtype": str(pipe.torch_dtype)}
    os.makedirs(cache_dir, exist_ok=True)
    _check_info(cache_dir, info)
    mine = [p for i, p in enumerate(pairs) if i % world == rank]
    todo = [p for p in mine if not _complete(_item_path(cache_dir, p.id))]
    pipe.load_models_to_device(("vae_encoder",))
    with torch.no_grad():
        for p in tqdm(todo, desc=f"latent cache rank {rank}", unit="pair", disable=not progress):
            tensors = {}
            if bucketed:  # the pair's own size, trained at its bucket
                expected = load_image(p.original).size
                size = training_bucket(*expected, resolution)
            else:
                expected, size = (first.width, first.height), (width, height)
            for image_side in ("original", "enhanced"):
                image = load_image(getattr(p, image_side))
                if image.size != expected:
                    whose = "its original" if bucketed else "the round's images"
                    raise FileFormatError(getattr(p, image_side), f"size {image.width}x{image.height}, but {whose} "
                                          f"{'is' if bucketed else 'are'} {expected[0]}x{expected[1]}",
                                          "regenerate the pair")
                if image.size != size:
                    image = image.resize(size, Image.Resampling.LANCZOS)
                x = pipe.preprocess_image(image).to(device=pipe.device, dtype=pipe.torch_dtype)
                latents = pipe.vae_encoder(x)
                if not torch.isfinite(latents).all():
                    from ..errors import NonFiniteError

                    raise NonFiniteError(f"the VAE encoder gave NaN or Inf for {getattr(p, image_side)}")
                tensors[image_side] = latents[0].cpu()
            enc = encode_prompts(pipe, [p.prompt], t5_sequence_length)
            tensors["prompt_emb"] = enc["prompt_emb"][0].cpu()
            tensors["pooled_prompt_emb"] = enc["pooled_prompt_emb"][0].cpu()
            metadata = {"prompt": p.prompt, "id": p.id}
            if bucketed:
                metadata.update(width=str(size[0]), height=str(size[1]))
            save_safetensors(tensors, _item_path(cache_dir, p.id), metadata)
    return len(todo)


def _complete(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        check_safetensors(path)
    except FileFormatError:
        logger.warning("%s is incomplete: encoding it again", path)
        return False
    return True


def load_cache(cache_dir: str, ids: list[str]) -> LatentCache:
    """The cached tensors of `ids`, stacked (the latents of pairs in several buckets: one
    tensor a pair); a missing or corrupt file is named."""
    from safetensors.torch import load_file

    if not ids:
        raise UsageError("no pairs to load from the latent cache")
    stacks = {f: [] for f in FIELDS}
    for pair_id in ids:
        path = _item_path(cache_dir, pair_id)
        if not os.path.isfile(path):
            raise FileFormatError(path, "missing from the latent cache", "run the same command again to build it")
        check_safetensors(path, "delete it; the next run encodes the pair again")
        tensors = load_file(path)
        for f in FIELDS:
            if f not in tensors:
                raise FileFormatError(path, f"has no tensor {f!r}", "delete it; the next run encodes the pair again")
            stacks[f].append(tensors[f])
    return LatentCache(list(ids), *(_stacked(stacks[f]) for f in FIELDS))


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One [N, ...] tensor where every pair's has one shape, else the list (pairs in several buckets)."""
    if len({tuple(t.shape) for t in tensors}) == 1:
        return torch.stack(tensors)
    return tensors
