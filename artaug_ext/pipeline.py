"""Build DiffSynth `FluxImagePipeline`s for the models we know by name.

Every model goes through DiffSynth's own `FluxImagePipeline.from_pretrained` with
`ModelConfig(path=...)` entries (tokenizers included), so the tiny models load through
the same hashing loader and converters as FLUX.1-dev.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os

import torch

from .cards import base_models, card
from .errors import NonFiniteError, UsageError
from .hub import model_root, resolve_model_files
from .quant import check_quantize, check_text_encoders, quantize_config, quantized_method
from .registry import register
from .tiny.build import ensure_tiny_model, model_file_paths
from .tiny.spec import get_spec

logger = logging.getLogger(__name__)

# The tokenizers are used once per prompt; their thread pool only warns after a fork (DataLoader, accelerate).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 matmuls are slow on most CPUs; FLUX runs in bf16 on GPUs.
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


@contextlib.contextmanager
def _diffsynth_prints_to_log():
    """DiffSynth reports loading with print(); route it to our debug log instead of stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    for line in buf.getvalue().splitlines():
        if line.strip():
            logger.debug("diffsynth: %s", line)


def model_paths(model: str, model_dir: str | None = None) -> dict[str, str | list[str]]:
    """{role: path(s)} of a known model: dit, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2."""
    c = card(model)
    if c.kind != "base":
        raise UsageError(f"{model!r} is a {c.kind}, not a base model; base models: {', '.join(base_models())}")
    if c.is_tiny:
        folder = ensure_tiny_model(get_spec(model), model_root(model_dir))
        return model_file_paths(folder)
    files = resolve_model_files(c, model_dir)
    out: dict[str, str | list[str]] = {}
    for role, paths in files.items():
        out[role] = paths if role == "text_encoder_2" and len(paths) > 1 else paths[0]
    return out


def load_pipeline(model: str = "tiny", *, model_dir: str | None = None, device: str | None = None,
                  torch_dtype: torch.dtype | None = None, quantize: str | None = None,
                  text_encoders: str = "resident"):
    """A ready DiffSynth `FluxImagePipeline` for a named model, loaded from the model root.

    The files are found (and, for the embedded tiny models, written once) in the model root, and
    loaded through DiffSynth's own loader: everything DiffSynth offers on the pipeline keeps
    working.

    Args:
        model: a named model: `tiny` (the embedded model trained on procedural scenes),
            `tiny-random` (untrained: its images are noise), `flux-dev` (FLUX.1-dev).
        model_dir: the model root, or a folder holding the files (default: `ARTAUG_HOME`, else
            `DIFFSYNTH_MODEL_BASE_PATH`, else `~/.cache/artaug`).
        device: `cuda`, `cuda:N`, `cpu` (default: `cuda` when available).
        torch_dtype: the weights' dtype (default: bf16 on CUDA, fp32 on CPU).
        quantize: a DiffSynth quantisation method for the DiT (`torchao_int8_w8a16`, ...;
            `pip install -e ".[quant]"`), applied by DiffSynth as the model loads. LoRAs are
            then hot-loaded (a quantised weight cannot take an exact merge).
        text_encoders: `resident` (in `torch_dtype` on the device), `quantized` (with
            `quantize`'s method) or `offloaded` (on the host, each layer moved to the device
            for its forward by DiffSynth's VRAM management).

    Returns:
        The `FluxImagePipeline`, with `artaug_model_name`, `artaug_model_paths` (role -> file)
            and `artaug_quantize` (the method, or None) set on it.

    Raises:
        UsageError: an unknown model name, or files DiffSynth recognises no model in.
        artaug_ext.hub.HubError: the model's files are missing and cannot be downloaded (offline:
            within seconds, naming the files and `artaug download`).
        FileFormatError: a model file is truncated or not safetensors.

    Example:
        >>> import artaug_ext
        >>> pipe = artaug_ext.load_pipeline("tiny", device="cpu")
        >>> type(pipe).__name__
        'FluxImagePipeline'
    """
    from diffsynth.core import ModelConfig
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    check_text_encoders(text_encoders, quantize)
    if quantize:
        check_quantize(quantize, training=False)
    register()
    device = device or default_device()
    torch_dtype = torch_dtype or default_dtype(device)
    paths = model_paths(model, model_dir)
    if text_encoders == "offloaded" and not str(device).startswith("cuda"):
        # the host is the device: nothing to offload to (and DiffSynth's offload calls CUDA's cache functions)
        logger.info("text_encoders 'offloaded' on %s: the encoders already live on the host; loaded resident", device)
        text_encoders = "resident"

    def config(role: str):
        if quantize and (role == "dit" or (role.startswith("text_encoder") and text_encoders == "quantized")):
            return ModelConfig(path=paths[role], quantize=quantize_config(quantize))
        if role.startswith("text_encoder") and text_encoders == "offloaded":
            return ModelConfig(path=paths[role], offload_device="cpu", offload_dtype=torch_dtype, onload_device="cpu",
                               onload_dtype=torch_dtype, preparing_device=device, preparing_dtype=torch_dtype,
                               computation_device=device, computation_dtype=torch_dtype)
        return ModelConfig(path=paths[role])

    configs = [config(role) for role in ("dit", "text_encoder", "text_encoder_2", "vae")]
    with _diffsynth_prints_to_log():
        pipe = FluxImagePipeline.from_pretrained(
            torch_dtype=torch_dtype,
            device=device,
            model_configs=configs,
            tokenizer_1_config=ModelConfig(path=paths["tokenizer"]),
            tokenizer_2_config=ModelConfig(path=paths["tokenizer_2"]),
        )
    missing = [n for n in ("dit", "text_encoder_1", "text_encoder_2", "vae_decoder") if getattr(pipe, n) is None]
    if missing:
        raise UsageError(
            f"{model}: DiffSynth recognised no model in the files for {missing} ({paths}); the files are "
            f"incomplete or of another model. Fix: delete them and run `artaug download {model}`, or point "
            "--model-dir at a complete copy."
        )
    if quantize:
        with _diffsynth_prints_to_log():
            for name in ("dit", "text_encoder_1", "text_encoder_2"):
                module = getattr(pipe, name)
                if quantized_method(module):  # a LoRA reaches a quantised layer through DiffSynth's hot-loading only
                    setattr(pipe, name, pipe.enable_lora_hot_loading(module))
        logger.info("%s: the DiT is quantised with %s (text encoders %s); LoRAs are hot-loaded, not merged",
                    model, quantize, text_encoders)
    pipe.artaug_model_name = model
    pipe.artaug_model_paths = paths
    pipe.artaug_quantize = quantize
    return pipe


def t5_sequence_length(model: str) -> int:
    return card(model).defaults.t5_sequence_length


def default_steps(model: str) -> int:
    return card(model).defaults.steps


def default_size(model: str) -> int:
    return card(model).defaults.size


def _with_defaults(pipe, steps, height, width) -> tuple[str, int, int, int]:
    """(model name, steps, height, width) with the model card's defaults for what is None."""
    model = getattr(pipe, "artaug_model_name", "flux-dev")
    size = default_size(model)
    return (model, default_steps(model) if steps is None else steps, size if height is None else height,
            size if width is None else width)


def check_generation_args(prompt: str, *, steps: int, height: int, width: int, embedded_guidance: float) -> None:
    """Refuse what DiffSynth would silently turn into something else: sizes it rounds to a
    multiple of 16, no steps (an image of pure noise), non-finite guidance (an all-zero image)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt is empty: give the text to draw")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % 16:
            raise UsageError(f"{name}={value!r} is not a positive multiple of 16 (FLUX works on 16-pixel patches; "
                             f"DiffSynth would round it to {max(16, (int(value) // 16) * 16) if isinstance(value, int) else '?'})")
    if not isinstance(steps, int) or steps <= 0:
        raise UsageError(f"steps={steps!r} must be a positive integer")
    if not math.isfinite(float(embedded_guidance)):
        raise UsageError(f"embedded_guidance={embedded_guidance!r} is not a finite number")


def warn_if_truncated(pipe, prompt: str, t5_length: int) -> None:
    """FLUX's T5 reads at most `t5_length` tokens (CLIP 77); say so instead of cutting silently."""
    tokenizer = getattr(pipe, "tokenizer_2", None)
    if tokenizer is None:
        return
    n = len(tokenizer(prompt, truncation=False).input_ids)
    if n > t5_length:
        logger.warning("the prompt has %d T5 tokens; FLUX reads only the first %d (the rest is ignored; CLIP reads 77)",
                       n, t5_length)


@contextlib.contextmanager
def non_finite_guard(pipe, what: str = "generation"):
    """Within the block, a pipeline call whose latents or decoded image become NaN/Inf raises
    NonFiniteError naming the step and the likely causes, instead of returning a black image.

    It shadows two of the pipeline's methods on the instance (`step`, called after every
    denoising step, and `vae_output_to_image`) and removes the shadows on exit."""
    steps_seen = [0]
    original_step, original_to_image = pipe.step, pipe.vae_output_to_image

    def loras() -> str:
        from .lora import loaded_loras

        names = [os.path.basename(h.name) for h in loaded_loras(pipe)]
        return f"LoRAs merged: {', '.join(names)}" if names else "no LoRA merged"

    def checked_step(*args, **kwargs):
        latents = original_step(*args, **kwargs)
        steps_seen[0] += 1
        if torch.is_tensor(latents) and not bool(torch.isfinite(latents).all()):
            raise NonFiniteError(
                f"{what}: the latents became NaN or Inf at denoising step {steps_seen[0]} ({loras()}, dtype "
                f"{pipe.torch_dtype}). Likely causes: a LoRA merged at too high a strength, a non-finite "
                "argument, or fp16 overflow (use bf16 or fp32). No image was written")
        return latents

    def checked_to_image(vae_output, *args, **kwargs):
        if torch.is_tensor(vae_output) and not bool(torch.isfinite(vae_output).all()):
            raise NonFiniteError(
                f"{what}: the VAE decoder returned NaN or Inf from finite latents ({loras()}, dtype "
                f"{pipe.torch_dtype}). Likely cause: fp16 overflow in the VAE (use bf16 or fp32). No image was written")
        return original_to_image(vae_output, *args, **kwargs)

    shadowed = {k: pipe.__dict__[k] for k in ("step", "vae_output_to_image") if k in pipe.__dict__}
    pipe.step, pipe.vae_output_to_image = checked_step, checked_to_image
    try:
        yield
    finally:
        for k in ("step", "vae_output_to_image"):  # what was there before: the class's methods or an outer guard
            pipe.__dict__.pop(k, None)
            if k in shadowed:
                pipe.__dict__[k] = shadowed[k]


def generate(pipe, prompt: str, *, seed: int = 0, steps: int | None = None, height: int | None = None,
             width: int | None = None, embedded_guidance: float = 3.5, progress: bool = True):
    """One image from `pipe` with the model's defaults (what `artaug generate` runs).

    Args:
        pipe: a pipeline from `load_pipeline` (any `FluxImagePipeline` works; the model's
            defaults are then FLUX.1-dev's).
        prompt: the text to draw.
        seed: the noise seed: the same seed, prompt and settings give the same image.
        steps: denoising steps (default: the model's, 8 tiny, 30 flux-dev).
        height: a positive multiple of 16 (default: the model's, 256 tiny, 1024 flux-dev).
        width: a positive multiple of 16 (default: as `height`).
        embedded_guidance: FLUX's embedded guidance (3.5, the ArtAug authors' setting).
        progress: show a progress bar.

    Returns:
        The image, a `PIL.Image.Image`.

    Raises:
        UsageError: an empty prompt, a size that is not a positive multiple of 16, no steps or a
            non-finite guidance, before any work.
        NonFiniteError: NaN or Inf in the latents (naming the step) or in the VAE's output.

    Example:
        >>> import artaug_ext
        >>> pipe = artaug_ext.load_pipeline("tiny", device="cpu")
        >>> image = artaug_ext.generate(pipe, "a red circle on a blue background", steps=4, progress=False)
        >>> image.size
        (256, 256)
    """
    from tqdm import tqdm

    model, steps, height, width = _with_defaults(pipe, steps, height, width)
    check_generation_args(prompt, steps=steps, height=height, width=width, embedded_guidance=embedded_guidance)
    t5_length = t5_sequence_length(model)
    warn_if_truncated(pipe, prompt, t5_length)
    with _diffsynth_prints_to_log() if not progress else contextlib.nullcontext(), non_finite_guard(pipe):
        return pipe(
            prompt=prompt,
            seed=seed,
            num_inference_steps=steps,
            height=height,
            width=width,
            embedded_guidance=embedded_guidance,
            t5_sequence_length=t5_length,
            progress_bar_cmd=tqdm if progress else (lambda x: x),
        )


def save_image(image, path: str) -> None:
    """Write an image atomically (a temporary file in the same folder, then a rename); the
    extension picks the format, PNG when there is none."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext or '.png'}"
    try:
        image.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _call_inputs(pipe, **values) -> tuple[dict, dict, dict]:
    """(shared, positive, negative) inputs as `FluxImagePipeline.__call__` builds them: every
    parameter of its signature at its default, `values` on top."""
    import inspect

    params = {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items() if k != "self"}
    unknown = set(values) - set(params)
    if unknown:
        raise TypeError(f"FluxImagePipeline.__call__ has no parameter {sorted(unknown)}")
    params.update(values)
    posi = {"prompt": params.pop("prompt")}
    nega = {"negative_prompt": params.pop("negative_prompt")}
    return params, posi, nega


def _stack(dicts: list[dict], what: str) -> dict:
    """One input dict for a batch: tensors of batch 1 concatenated, other values shared (they must agree)."""
    out = {}
    for key in dicts[0]:
        values = [d[key] for d in dicts]
        if all(torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 1 for v in values):
            if len({tuple(v.shape) for v in values}) != 1:
                raise UsageError(f"batched generation: {what} input {key!r} differs in shape within the batch")
            out[key] = torch.cat(values)
        elif all(v is values[0] for v in values) or all(not torch.is_tensor(v) and v == values[0] for v in values):
            out[key] = values[0]
        else:
            raise UsageError(f"batched generation: {what} input {key!r} differs within the batch")
    return out


def generate_batch(pipe, prompts: list[str], seeds: list[int], *, steps: int | None = None, height: int | None = None,
                   width: int | None = None, embedded_guidance: float = 3.5) -> list:
    """Images for several (prompt, seed) pairs, denoised as ONE batch through the DiT.

    Each image's inputs are prepared by DiffSynth's own pipeline units (noise from its seed,
    prompt embeddings, image ids, guidance), exactly as `pipe(prompt=..., seed=...)` prepares
    them; the denoising loop then calls DiffSynth's `model_fn` and scheduler step once per step
    for the whole batch, and each latent is decoded on its own. On a GPU this runs the DiT at
    batch N instead of N times at batch 1. Text-to-image only (no ControlNet, IP-Adapter...)."""
    if len(prompts) != len(seeds) or not prompts:
        raise UsageError(f"generate_batch: {len(prompts)} prompts and {len(seeds)} seeds")
    model, steps, height, width = _with_defaults(pipe, steps, height, width)
    for p in prompts:
        check_generation_args(p, steps=steps, height=height, width=width, embedded_guidance=embedded_guidance)
    t5_length = t5_sequence_length(model)
    pipe.scheduler.set_timesteps(steps, denoising_strength=1.0, shift=None)
    shared_list, posi_list = [], []

    def no_bar(x):
        return x

    with torch.no_grad(), _diffsynth_prints_to_log():
        for prompt, seed in zip(prompts, seeds, strict=True):
            warn_if_truncated(pipe, prompt, t5_length)
            shared, posi, nega = _call_inputs(pipe, prompt=prompt, seed=seed, num_inference_steps=steps, height=height,
                                              width=width, embedded_guidance=embedded_guidance,
                                              t5_sequence_length=t5_length, progress_bar_cmd=no_bar)
            for unit in pipe.units:
                shared, posi, nega = pipe.unit_runner(unit, pipe, shared, posi, nega)
            shared_list.append(shared)
            posi_list.append({k: v for k, v in posi.items() if k != "prompt"})  # the text is in the embeddings
        shared = _stack([{k: v for k, v in s.items() if k != "seed"} for s in shared_list], "shared")
        posi = _stack(posi_list, "prompt")
        pipe.load_models_to_device(pipe.in_iteration_models)
        models = {name: getattr(pipe, name) for name in pipe.in_iteration_models}
        n = len(prompts)
        with non_finite_guard(pipe, f"batched generation of {n} images"):
            for progress_id, timestep in enumerate(pipe.scheduler.timesteps):
                t = timestep.unsqueeze(0).to(dtype=pipe.torch_dtype, device=pipe.device).expand(n)
                noise_pred = pipe.cfg_guided_model_fn(pipe.model_fn, 1.0, shared, posi, {}, **models, timestep=t,
                                                      progress_id=progress_id)
                shared["latents"] = pipe.step(pipe.scheduler, progress_id=progress_id, noise_pred=noise_pred, **shared)
            pipe.load_models_to_device(["vae_decoder"])
            images = []
            for i in range(n):
                decoded = pipe.vae_decoder(shared["latents"][i:i + 1], device=pipe.device, tiled=False)
                images.append(pipe.vae_output_to_image(decoded))
        pipe.load_models_to_device([])
    return images
