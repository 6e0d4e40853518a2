"""Sizes of the embedded tiny FLUX models, one `TinyFluxSpec` per model name."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cards import card, known_names
from ..errors import UsageError

# Text encoders' embedding tables are sized above both tokenizers' vocabularies
# (checked when the model is built), so the tokenizers can grow without changing shapes.
TEXT_VOCAB = 2048


@dataclass(frozen=True)
class TinyFluxSpec:
    """Everything that defines a tiny model's architecture (and so its files' shapes)."""

    name: str
    dit: dict = field(default_factory=dict)
    clip: dict = field(default_factory=dict)
    t5: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    seed: int = 0
    description: str = ""
    # Package asset folder (artaug_ext/assets/<weights_from>/) holding trained weights in the
    # FLUX.1-dev file layout; None: deterministic random weights from `seed`.
    weights_from: str | None = None

    @property
    def model_id(self) -> str:
        """Folder under the model root, laid out like a hub model id."""
        return f"artaug-ext/{self.name}"


TINY_RANDOM = TinyFluxSpec(
    name="tiny-random",
    dit=dict(dim=128, num_heads=2, num_joint_blocks=2, num_single_blocks=4, axes_dim=(8, 28, 28),
             input_dim=64, text_dim=64, pooled_dim=32),
    clip=dict(embed_dim=32, vocab_size=TEXT_VOCAB, max_position_embeddings=77, num_encoder_layers=2,
              encoder_intermediate_size=64),
    t5=dict(vocab_size=TEXT_VOCAB, d_model=64, num_layers=2, num_heads=2, d_kv=32, d_ff=128),
    vae=dict(channels=(32, 32, 64, 64)),
    seed=0,
    description="FLUX.1 architecture at CPU size with random weights: its images are noise.",
)

# Trained on procedural scenes (recipes/train_tiny.py). Text encoders: tiny-random's, frozen, with
# the T5's relative-position bias set to read neighbouring words (TinyFluxTextEncoderT5.attend_to_neighbours)
# so colour words bind to their shape or background; v1 (a bag-of-words T5) swapped them.
TINY_V2 = TinyFluxSpec(
    name="tiny-v2",
    dit=dict(dim=256, num_heads=4, num_joint_blocks=2, num_single_blocks=4, axes_dim=(16, 24, 24),
             input_dim=64, text_dim=64, pooled_dim=32),
    clip=dict(TINY_RANDOM.clip),
    t5=dict(TINY_RANDOM.t5),
    vae=dict(channels=(32, 64, 64, 64)),
    seed=0,
    description="FLUX.1 architecture at CPU size trained on procedural scenes: draws simple shapes from captions.",
    weights_from="tiny",
)

SPECS: dict[str, TinyFluxSpec] = {TINY_RANDOM.name: TINY_RANDOM, TINY_V2.name: TINY_V2}


def get_spec(name: str) -> TinyFluxSpec:
    """The spec of a tiny model by card name or alias (`tiny` is the trained model)."""
    c = card(name)
    if c.tiny_spec is None:
        raise UsageError(f"{name!r} is not an embedded tiny model; tiny models: "
                         f"{', '.join(n for n in known_names('base') if card(n).is_tiny)}")
    return SPECS[c.tiny_spec]
