"""Build DiffSynth `FluxImagePipeline`s for the models we know by name.

Every model goes through DiffSynth's own `FluxImagePipeline.from_pretrained` with
`ModelConfig(path=...)` entries (tokenizers included), so the tiny models load through
the same hashing loader and converters as FLUX.1-dev.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os

import torch

from .hub import model_root, resolve_model_files
from .registry import register
from .tiny.build import ensure_tiny_model, model_file_paths
from .tiny.spec import ALIASES, SPECS, get_spec

logger = logging.getLogger(__name__)

# The tokenizers are used once per prompt; their thread pool only warns after a fork (DataLoader, accelerate).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REAL_MODELS = {"flux-dev"}


def known_models() -> list[str]:
    return sorted(set(SPECS) | set(ALIASES) | REAL_MODELS)


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
    if _is_tiny(model):
        folder = ensure_tiny_model(get_spec(model), model_root(model_dir))
        return model_file_paths(folder)
    if model == "flux-dev":
        files = resolve_model_files("flux-dev", model_dir)
        out: dict[str, str | list[str]] = {}
        for role, paths in files.items():
            out[role] = paths if role == "text_encoder_2" and len(paths) > 1 else paths[0]
        return out
    raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(known_models())}")


def load_pipeline(model: str = "tiny", *, model_dir: str | None = None, device: str | None = None,
                  torch_dtype: torch.dtype | None = None):
    """A ready `FluxImagePipeline` for `model` (`tiny`, `tiny-random` or `flux-dev`)."""
    from diffsynth.core import ModelConfig
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    register()
    device = device or default_device()
    torch_dtype = torch_dtype or default_dtype(device)
    paths = model_paths(model, model_dir)
    configs = [ModelConfig(path=paths[role]) for role in ("dit", "text_encoder", "text_encoder_2", "vae")]
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
        raise ValueError(
            f"{model}: DiffSynth recognised no model in the files for {missing} ({paths}); the files are "
            f"incomplete or of another model. Fix: delete them and run `artaug download {model}`, or point "
            "--model-dir at a complete copy."
        )
    pipe.artaug_model_name = model
    pipe.artaug_model_paths = paths
    return pipe


# FLUX.1-dev defaults of the ArtAug authors; the tiny models carry theirs in their spec.
FLUX_DEFAULTS = {"t5_sequence_length": 512, "default_steps": 30, "default_size": 1024}


def _is_tiny(model: str) -> bool:
    return model in SPECS or model in ALIASES


def _model_default(model: str, name: str) -> int:
    return getattr(get_spec(model), name) if _is_tiny(model) else FLUX_DEFAULTS[name]


def t5_sequence_length(model: str) -> int:
    return _model_default(model, "t5_sequence_length")


def default_steps(model: str) -> int:
    return _model_default(model, "default_steps")


def default_size(model: str) -> int:
    return _model_default(model, "default_size")


def generate(pipe, prompt: str, *, seed: int = 0, steps: int | None = None, height: int | None = None,
             width: int | None = None, embedded_guidance: float = 3.5, progress: bool = True):
    """One image from `pipe` with the model's defaults (what `artaug generate` runs)."""
    from tqdm import tqdm

    model = getattr(pipe, "artaug_model_name", "flux-dev")
    size = default_size(model)
    with _diffsynth_prints_to_log() if not progress else contextlib.nullcontext():
        return pipe(
            prompt=prompt,
            seed=seed,
            num_inference_steps=steps or default_steps(model),
            height=height or size,
            width=width or size,
            embedded_guidance=embedded_guidance,
            t5_sequence_length=t5_sequence_length(model),
            progress_bar_cmd=tqdm if progress else (lambda x: x),
        )

