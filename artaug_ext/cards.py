"""Model cards: the one table of every model we know by a short name (floor 1, no torch).

A card says where a model comes from (ModelScope and Hugging Face ids, the file of each
role), how to run it (the generation defaults of its authors) and what goes with it (the
ArtAug LoRA of a base model, the tiny architecture spec of an embedded model). The hub,
the pipeline builder, the LoRA loader and the CLI all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError
from .flux_shapes import FLUX_DEV, FluxShapes


@dataclass(frozen=True)
class Defaults:
    """Generation settings of a base model (what its authors used)."""

    steps: int
    size: int
    t5_sequence_length: int
    guidance: float = 3.5
    # The embedded guidance its authors train LoRAs at (None: no known setting). A recipe's
    # [train] guidance defaults to it, and the model card says whether a run kept it.
    train_guidance: float | None = None
    train_guidance_source: str = ""


@dataclass(frozen=True)
class Timing:
    """Per-unit costs the --dry-run estimate multiplies, with where each figure comes from."""

    device: str
    image_seconds: float  # one image at the default size and steps
    train_step_seconds: float  # one LoRA training step, batch 1, at the default size (tokens scale with area)
    source: str


@dataclass(frozen=True)
class ModelCard:
    name: str
    kind: str  # "base" (loads as a FluxImagePipeline), "lora" or "weights" (other files)
    description: str
    modelscope_id: str | None = None
    huggingface_id: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # role -> file pattern ("dir/" = a folder)
    defaults: Defaults | None = None
    companion_lora: str | None = None  # card of the LoRA `--artaug` merges into this base
    tiny_spec: str | None = None  # embedded model: name in artaug_ext.tiny.spec.SPECS
    lora_for: str | None = None  # a LoRA card: the variant name `load_artaug` knows it by
    timing: Timing | None = None
    shapes: FluxShapes | None = None  # per-layer shapes the --dry-run memory plan counts

    @property
    def is_tiny(self) -> bool:
        return self.tiny_spec is not None


_TINY_DEFAULTS = Defaults(steps=8, size=256, t5_sequence_length=32)
_TINY_TIMING = Timing(device="2 CPU cores", image_seconds=0.7, train_step_seconds=0.19,
                      source="measured on the project's 2-core machine: 48 images of 256x256 in 8 steps, batched by 4, "
                             "in 32 s (the demo's held-out check); 0.19 s a rank-8 LoRA step of the tiny DiT at 256 px "
                             "(benchmarks/bench_train.py: 0.19 s at batch 4 and 128 px, the same token count)")


CARDS: dict[str, ModelCard] = {c.name: c for c in [
    ModelCard(
        name="tiny-v2", kind="base", tiny_spec="tiny-v2", defaults=_TINY_DEFAULTS, timing=_TINY_TIMING,
        description="embedded FLUX.1-architecture model trained on procedural scenes (CPU size)"),
    ModelCard(
        name="tiny-random", kind="base", tiny_spec="tiny-random", defaults=_TINY_DEFAULTS, timing=_TINY_TIMING,
        description="embedded FLUX.1-architecture model with random weights (its images are noise)"),
    ModelCard(
        name="flux-dev", kind="base", modelscope_id="black-forest-labs/FLUX.1-dev",
        huggingface_id="black-forest-labs/FLUX.1-dev",
        files={
            "dit": "flux1-dev.safetensors",
            "vae": "ae.safetensors",
            "text_encoder": "text_encoder/model.safetensors",
            "text_encoder_2": "text_encoder_2/*.safetensors",
            "tokenizer": "tokenizer/",
            "tokenizer_2": "tokenizer_2/",
        },
        # The ArtAug authors' settings: 30 steps, embedded guidance 3.5, 1024x1024, T5 length 512;
        # LoRAs trained at embedded guidance 1 (they train with DiffSynth's FLUX trainer).
        defaults=Defaults(steps=30, size=1024, t5_sequence_length=512, train_guidance=1.0,
                          train_guidance_source="DiffSynth's FLUX trainer (examples/flux/model_training/train.py), "
                                                "which the ArtAug authors train with, fixes embedded_guidance = 1 "
                                                "and says not to change it"),
        companion_lora="artaug",
        shapes=FLUX_DEV,
        timing=Timing(
            device="one H100 SXM (bf16)", image_seconds=7.0, train_step_seconds=0.8,
            source="image: 6.4-6.7 s for 28 steps at 1024x1024 (eager DiffSynth/diffusers on an H100 SXM, public "
                   "benchmarks), scaled to 30 steps; training step: an estimate, not a measurement: forward + "
                   "backward with gradient checkpointing is about 4 forward passes of about 74 TFLOP each at 1 MP, "
                   "at about 400 TFLOP/s sustained; measure yours with benchmarks/bench_train.py"),
        description="FLUX.1-dev base model (DiT, VAE, CLIP and T5 encoders, tokenizers)"),
    ModelCard(
        name="artaug", kind="lora", modelscope_id="DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1",
        huggingface_id="ECNU-CILab/ArtAug-lora-FLUX.1dev-v1", files={"lora": "merged_lora.safetensors"},
        lora_for="flux-dev",
        description="the released ArtAug LoRA for FLUX.1-dev (universal FLUX LoRA keys, alpha 1.0)"),
    ModelCard(
        name="artaug-kontext", kind="lora", modelscope_id="DiffSynth-Studio/FLUX.1-Kontext-dev-lora-ArtAug",
        huggingface_id="DiffSynth-Studio/FLUX.1-Kontext-dev-lora-ArtAug", files={"lora": "*.safetensors"},
        lora_for="kontext",
        description="ArtAug LoRA for FLUX.1-Kontext-dev"),
    ModelCard(
        name="image-metrics", kind="weights", modelscope_id="DiffSynth-Studio/ImageMetrics",
        huggingface_id="DiffSynth-Studio/ImageMetrics",
        description="DiffSynth's image-quality metric weights (aesthetic, PickScore, CLIP, HPS, ImageReward)"),
]}

# Short names that stand for another card.
ALIASES: dict[str, str] = {"tiny": "tiny-v2"}


def card(name: str) -> ModelCard:
    """The card of a short name or alias; a one-line error listing the known names otherwise."""
    name = ALIASES.get(name, name)
    if name not in CARDS:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(known_names())}")
    return CARDS[name]


def known_names(kind: str | None = None) -> list[str]:
    """Short names (aliases included) of every card, or of one kind."""
    names = [n for n, c in CARDS.items() if kind is None or c.kind == kind]
    names += [a for a, target in ALIASES.items() if kind is None or CARDS[target].kind == kind]
    return sorted(names)


def base_models() -> list[str]:
    """Names `load_pipeline` and `--model` accept."""
    return known_names("base")


def hub_lookup(name_or_id: str) -> ModelCard | None:
    """The card of a short name or of either hub's model id; None for an id we have no card for."""
    name = ALIASES.get(name_or_id, name_or_id)
    if name in CARDS:
        return CARDS[name]
    for c in CARDS.values():
        if name_or_id in (c.modelscope_id, c.huggingface_id):
            return c
    return None


def artaug_lora(variant: str = "flux-dev") -> ModelCard:
    """The ArtAug LoRA card for a variant ("flux-dev", "kontext")."""
    found = [c for c in CARDS.values() if c.kind == "lora" and c.lora_for == variant]
    if not found:
        known = sorted(c.lora_for for c in CARDS.values() if c.lora_for)
        raise UsageError(f"no ArtAug LoRA for variant {variant!r}; known variants: {', '.join(known)}")
    return found[0]
