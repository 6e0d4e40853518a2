"""Regional enhancement: regenerate from the same seed with the critic's local prompts blended in.

Per denoising step, with eps the model output (a flow velocity for FLUX; the formula is the
ArtAug paper's, arXiv 2412.12888):

    eps = (eps(P) + sum_i s_i * blur(M_i) * eps(P_i)) / (1 + sum_i s_i * blur(M_i))

`FluxImagePipeline.__call__` has a fixed argument list, so the regions cannot reach it through
a pipeline unit; instead `regional_prompts(pipe, ...)` swaps `pipe.model_fn` for the duration
of a call. The global prompt and all region prompts go through the DiT as ONE batch per step
(batch 1 + number of regions), which costs far less than one call per prompt.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from .constants import DEFAULT_REGION_SCALE
from .parse import Suggestion

logger = logging.getLogger(__name__)


# The authors' blur: kernel 33, sigma 10, at a latent short side of 128 (a 1024px image).
BLUR_KERNEL, BLUR_SIGMA, BLUR_REFERENCE_SIDE = 33, 10.0, 128

# model_fn inputs that change the batch layout in ways the blend does not handle.
_UNSUPPORTED = ("controlnet_conditionings", "entity_prompt_emb", "kontext_latents", "step1x_llm_embedding",
                "step1x_reference_latents", "flex_condition", "fill_condition", "id_emb")


def blur_params(latent_height: int, latent_width: int) -> tuple[int, float]:
    """(kernel, sigma) of the mask blur: 33 / 10 at short side >= 128, both scaled by side/128
    below; the kernel stays odd, >= 3 and no larger than the latent (reflect padding needs it).
    At 1024px FLUX latents are 128 wide, so full-size images get exactly the authors' blur."""
    side = min(latent_height, latent_width)
    factor = min(1.0, side / BLUR_REFERENCE_SIDE)
    sigma = BLUR_SIGMA * factor
    kernel = int(round(BLUR_KERNEL * factor))
    if kernel % 2 == 0:
        kernel += 1
    largest = side if side % 2 else side - 1
    if largest < 3:
        return 1, sigma  # a latent this small cannot hold a blur kernel: masks stay sharp
    kernel = max(3, min(kernel, largest))
    return kernel, sigma


def gaussian_blur(mask: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, H, W] masks with reflect padding (like torchvision's)."""
    if kernel < 3 or mask.shape[-1] < 2 or mask.shape[-2] < 2:
        return mask
    half = kernel // 2
    x = torch.arange(kernel, dtype=torch.float64) - half
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(mask.dtype).to(mask.device)
    out = torch.nn.functional.pad(mask, (half, half, 0, 0), mode="reflect")
    out = torch.nn.functional.conv2d(out, k.view(1, 1, 1, kernel))
    out = torch.nn.functional.pad(out, (0, 0, half, half), mode="reflect")
    return torch.nn.functional.conv2d(out, k.view(1, 1, kernel, 1))


def _floor(v: float) -> int:
    """floor, but a product that is an integer up to float error (0.29 * 100 = 28.999...) is that integer."""
    return round(v) if abs(v - round(v)) < 1e-9 else math.floor(v)


def _ceil(v: float) -> int:
    """ceil, but 0.07 * 100 = 7.000000000000001 stays 7 (an edge on a latent cell boundary)."""
    return round(v) if abs(v - round(v)) < 1e-9 else math.ceil(v)


def box_masks(boxes, latent_height: int, latent_width: int, blur: bool = True) -> torch.Tensor:
    """[N, 1, H, W] float32 masks at latent resolution: x0/y0 rounded down, x1/y1 up, then blurred."""
    masks = torch.zeros(len(boxes), 1, latent_height, latent_width)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        c0, r0 = _floor(x0 * latent_width), _floor(y0 * latent_height)
        c1, r1 = _ceil(x1 * latent_width), _ceil(y1 * latent_height)
        masks[i, 0, max(r0, 0):min(r1, latent_height), max(c0, 0):min(c1, latent_width)] = 1.0
    if blur and len(boxes):
        masks = gaussian_blur(masks, *blur_params(latent_height, latent_width))
    return masks


def encode_prompts(pipe, prompts: list[str], t5_sequence_length: int) -> dict[str, torch.Tensor]:
    """Prompts encoded one by one with DiffSynth's own FLUX prompt embedder, stacked on the batch."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_PromptEmbedder

    unit = FluxImageUnit_PromptEmbedder()
    pipe.load_models_to_device(("text_encoder_1", "text_encoder_2"))
    embs, pooled, ids = [], [], []
    with torch.no_grad():
        for p in prompts:
            e, pe, ti = unit.encode_prompt(pipe.tokenizer_1, pipe.tokenizer_2, pipe.text_encoder_1, pipe.text_encoder_2,
                                           p, device=pipe.device, t5_sequence_length=t5_sequence_length)
            embs.append(e)
            pooled.append(pe)
            ids.append(ti)
    return {"prompt_emb": torch.cat(embs), "pooled_prompt_emb": torch.cat(pooled), "text_ids": torch.cat(ids)}


@dataclass
class Regions:
    """Region prompts ready for the DiT: embeddings, masks [N, 1, h, w] and scales [N]."""

    prompt_emb: torch.Tensor
    pooled_prompt_emb: torch.Tensor
    text_ids: torch.Tensor
    masks: torch.Tensor
    scales: torch.Tensor

    def weights(self, like: torch.Tensor) -> torch.Tensor:
        """s_i * blur(M_i) as [N, 1, h, w] in the dtype/device of `like`."""
        return (self.scales.view(-1, 1, 1, 1) * self.masks).to(device=like.device, dtype=like.dtype)


def blend(global_pred: torch.Tensor, region_preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(eps(P) + sum_i w_i eps(P_i)) / (1 + sum_i w_i), computed in fp32."""
    g, r, w = global_pred.float(), region_preds.float(), weights.float()
    out = (g + (w * r).sum(0, keepdim=True)) / (1.0 + w.sum(0, keepdim=True))
    return out.to(global_pred.dtype)


class RegionalModelFn:
    """`pipe.model_fn` replacement: one batched DiT call for the global + region prompts."""

    def __init__(self, model_fn, regions: Regions, global_prompt_emb: torch.Tensor, batched: bool = True):
        self.model_fn, self.regions, self.global_prompt_emb, self.batched = model_fn, regions, global_prompt_emb, batched
        self.calls = 0

    def _is_positive(self, prompt_emb) -> bool:
        g = self.global_prompt_emb
        return prompt_emb is not None and prompt_emb.shape == g.shape and torch.equal(prompt_emb, g.to(prompt_emb))

    def __call__(self, **kwargs):
        if not self._is_positive(kwargs.get("prompt_emb")):
            return self.model_fn(**kwargs)  # negative side of CFG: left alone
        for name in _UNSUPPORTED:
            if kwargs.get(name) is not None:
                raise ValueError(f"regional enhancement does not support {name} (ControlNet, EliGen, Kontext, ...)")
        if kwargs.get("tea_cache") is not None or kwargs.get("tiled"):
            raise ValueError("regional enhancement does not support TeaCache or tiled DiT inference")
        self.calls += 1
        r = self.regions
        if self.batched:
            out = self.model_fn(**batch_inputs(kwargs, r))
            global_pred, region_preds = out[:1], out[1:]
        else:
            global_pred = self.model_fn(**kwargs)
            region_preds = torch.cat([self.model_fn(**single_region_inputs(kwargs, r, i)) for i in range(len(r.scales))])
        return blend(global_pred, region_preds, r.weights(global_pred))


def batch_inputs(kwargs: dict, r: Regions) -> dict:
    """model_fn inputs for batch [global, region 1, ..., region N]."""
    n = 1 + r.prompt_emb.shape[0]
    latents = kwargs["latents"]
    kw = dict(kwargs)
    kw["latents"] = latents.expand(n, *latents.shape[1:])
    for key in ("prompt_emb", "pooled_prompt_emb", "text_ids"):
        kw[key] = torch.cat([kwargs[key], getattr(r, key).to(kwargs[key])])
    if kwargs.get("image_ids") is not None:
        kw["image_ids"] = kwargs["image_ids"].expand(n, *kwargs["image_ids"].shape[1:])
    for key in ("timestep", "guidance"):
        if kwargs.get(key) is not None and kwargs[key].ndim == 1 and kwargs[key].shape[0] == 1:
            kw[key] = kwargs[key].expand(n)
    return kw


def single_region_inputs(kwargs: dict, r: Regions, i: int) -> dict:
    kw = dict(kwargs)
    for key in ("prompt_emb", "pooled_prompt_emb", "text_ids"):
        kw[key] = getattr(r, key)[i:i + 1].to(kwargs[key])
    return kw


def prepare_regions(pipe, suggestions: list[Suggestion], height: int, width: int, t5_sequence_length: int,
                    scale: float | list[float] = DEFAULT_REGION_SCALE) -> Regions:
    scales = [scale] * len(suggestions) if isinstance(scale, (int, float)) else list(scale)
    if len(scales) != len(suggestions):
        raise ValueError(f"{len(scales)} region scales for {len(suggestions)} suggestions")
    enc = encode_prompts(pipe, [s.prompt for s in suggestions], t5_sequence_length)
    masks = box_masks([s.box for s in suggestions], height // 8, width // 8)
    return Regions(enc["prompt_emb"], enc["pooled_prompt_emb"], enc["text_ids"], masks,
                   torch.tensor(scales, dtype=torch.float32))


@contextlib.contextmanager
def regional_prompts(pipe, prompt: str, suggestions: list[Suggestion], *, height: int, width: int,
                     t5_sequence_length: int, scale: float | list[float] = DEFAULT_REGION_SCALE, batched: bool = True):
    """Within the block, `pipe(prompt=prompt, height=height, width=width, ...)` blends the regions.

    `prompt`, `height`, `width` and `t5_sequence_length` must be those of the call inside the block.
    Yields the `RegionalModelFn` (its `calls` counts blended steps).
    """
    if not suggestions:
        yield None
        return
    regions = prepare_regions(pipe, suggestions, height, width, t5_sequence_length, scale)
    global_emb = encode_prompts(pipe, [prompt], t5_sequence_length)["prompt_emb"]
    original = pipe.model_fn
    wrapper = RegionalModelFn(original, regions, global_emb, batched=batched)
    pipe.model_fn = wrapper
    try:
        yield wrapper
    finally:
        pipe.model_fn = original


def enhance(pipe, prompt: str, suggestions: list[Suggestion], *, seed: int, steps: int, height: int, width: int,
            t5_sequence_length: int, scale: float | list[float] = DEFAULT_REGION_SCALE, embedded_guidance: float = 3.5,
            progress: bool = False):
    """The enhanced image: same prompt, seed and settings as the original, regions blended in
    (no suggestions: the original). A non-finite result raises NonFiniteError."""
    from tqdm import tqdm

    from ..pipeline import check_generation_args, non_finite_guard

    check_generation_args(prompt, steps=steps, height=height, width=width, embedded_guidance=embedded_guidance)
    what = f"{'enhancing' if suggestions else 'generating'} {prompt[:60]!r} (seed {seed})"
    with regional_prompts(pipe, prompt, suggestions, height=height, width=width,
                          t5_sequence_length=t5_sequence_length, scale=scale) as wrapper, non_finite_guard(pipe, what):
        image = pipe(prompt=prompt, seed=seed, num_inference_steps=steps, height=height, width=width,
                     embedded_guidance=embedded_guidance, t5_sequence_length=t5_sequence_length,
                     progress_bar_cmd=tqdm if progress else (lambda x: x))
    if wrapper is not None and wrapper.calls != steps:
        logger.warning("regional blend ran on %d of %d steps", wrapper.calls, steps)
    return image
