"""Small FLUX.1-architecture models built from DiffSynth's own blocks.

`FluxDiT`, `FluxTextEncoderT5` and the FLUX VAE hard-code FLUX.1-dev's sizes, so a
CPU-sized model needs classes that take sizes. Each class here builds the same module
tree as its DiffSynth counterpart (same attribute names, same block classes), so
DiffSynth's `model_fn_flux_image`, state-dict converters, LoRA loader and our kernels
all see what they would see on the real model, only smaller.
"""

from __future__ import annotations

import torch
from diffsynth.models.flux_dit import (
    AdaLayerNormContinuous,
    FluxDiT,
    FluxJointTransformerBlock,
    FluxSingleTransformerBlock,
    RoPEEmbedding,
)
from diffsynth.models.flux_text_encoder_clip import FluxTextEncoderClip
from diffsynth.models.flux_vae import (
    DownSampler,
    FluxVAEDecoder,
    FluxVAEEncoder,
    ResnetBlock,
    UpSampler,
    VAEAttentionBlock,
)
from diffsynth.models.general_modules import TimestepEmbeddings
from transformers import T5Config, T5EncoderModel


class TinyFluxDiT(FluxDiT):
    """A FLUX.1 DiT with configurable widths and depths.

    Subclasses `FluxDiT` so `isinstance` checks, `patchify`, `prepare_image_ids` and
    `process_entity_masks` are DiffSynth's; only `__init__` differs (FluxDiT's hard-codes
    3072 wide, 24 heads, 38 single blocks).
    """

    def __init__(
        self,
        dim: int = 128,
        num_heads: int = 2,
        num_joint_blocks: int = 2,
        num_single_blocks: int = 4,
        axes_dim: tuple[int, int, int] = (8, 28, 28),
        input_dim: int = 64,
        text_dim: int = 64,
        pooled_dim: int = 32,
        disable_guidance_embedder: bool = False,
    ):
        torch.nn.Module.__init__(self)
        head_dim = dim // num_heads
        if dim % num_heads or sum(axes_dim) != head_dim:
            raise ValueError(f"TinyFluxDiT: dim {dim} / {num_heads} heads must equal sum(axes_dim)={sum(axes_dim)}")
        self.pos_embedder = RoPEEmbedding(dim, 10000, list(axes_dim))
        self.time_embedder = TimestepEmbeddings(256, dim)
        self.guidance_embedder = None if disable_guidance_embedder else TimestepEmbeddings(256, dim)
        self.pooled_text_embedder = torch.nn.Sequential(
            torch.nn.Linear(pooled_dim, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim)
        )
        self.context_embedder = torch.nn.Linear(text_dim, dim)
        self.x_embedder = torch.nn.Linear(input_dim, dim)
        self.blocks = torch.nn.ModuleList([FluxJointTransformerBlock(dim, num_heads) for _ in range(num_joint_blocks)])
        self.single_blocks = torch.nn.ModuleList(
            [FluxSingleTransformerBlock(dim, num_heads) for _ in range(num_single_blocks)]
        )
        self.final_norm_out = AdaLayerNormContinuous(dim)
        self.final_proj_out = torch.nn.Linear(dim, 64)
        self.input_dim = input_dim


class TinyFluxTextEncoderT5(T5EncoderModel):
    """A T5 encoder of any size, called like DiffSynth's `FluxTextEncoderT5`."""

    def __init__(self, vocab_size: int = 2048, d_model: int = 64, num_layers: int = 2, num_heads: int = 2,
                 d_kv: int = 32, d_ff: int = 128):
        config = T5Config(
            vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
            num_decoder_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, dropout_rate=0.0,
            relative_attention_num_buckets=32, relative_attention_max_distance=128,
            tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
        super().__init__(config)

    def forward(self, input_ids):
        return super().forward(input_ids=input_ids).last_hidden_state

    @torch.no_grad()
    def attend_to_neighbours(self, strength: float = 8.0) -> None:
        """Set the relative-position bias so head 0 reads the previous token and head 1 the next.

        FLUX gives text tokens no positions (its text ids are all zero), so the DiT can only
        tell "a red circle on a blue background" from "a blue circle on a red background"
        if the text encoder mixes each word with its neighbours. A trained T5 learns that
        bias; a randomly initialised one averages every token alike and returns a bag of
        words. With this bias the shape and background tokens carry the colour word before
        them (two layers: two words either side). Everything else keeps its weights.
        """
        if self.config.num_heads < 2:
            raise ValueError("attend_to_neighbours needs at least 2 attention heads")
        attention = self.encoder.block[0].layer[0].SelfAttention
        bias = attention.relative_attention_bias.weight  # [buckets, heads], shared by all layers
        bidirectional_half = self.config.relative_attention_num_buckets // 2
        bias.zero_()
        bias[1, 0] = strength  # key one position before the query
        bias[bidirectional_half + 1, 1] = strength  # key one position after


class TinyFluxTextEncoderClip(FluxTextEncoderClip):
    """DiffSynth's CLIP text encoder already takes sizes; named here so the registry
    entry points into our package and the defaults are the tiny ones."""

    def __init__(self, embed_dim: int = 32, vocab_size: int = 2048, max_position_embeddings: int = 77,
                 num_encoder_layers: int = 2, encoder_intermediate_size: int = 64):
        super().__init__(
            embed_dim=embed_dim, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
            num_encoder_layers=num_encoder_layers, encoder_intermediate_size=encoder_intermediate_size,
        )


def _vae_groups(channels: int) -> int:
    return 32 if channels % 32 == 0 else 8


class TinyFluxVAEEncoder(FluxVAEEncoder):
    """FLUX VAE encoder (8x down, 16 latent channels) with FLUX's block layout, so that
    `ae.safetensors` keys and DiffSynth's converter apply, at configurable widths."""

    def __init__(self, channels: tuple[int, int, int, int] = (32, 32, 64, 64), use_conv_attention: bool = True):
        torch.nn.Module.__init__(self)
        c0, c1, c2, c3 = channels
        g = _vae_groups
        self.scaling_factor = 0.3611
        self.shift_factor = 0.1159
        self.conv_in = torch.nn.Conv2d(3, c0, kernel_size=3, padding=1)
        self.blocks = torch.nn.ModuleList([
            ResnetBlock(c0, c0, groups=g(c0), eps=1e-6),
            ResnetBlock(c0, c0, groups=g(c0), eps=1e-6),
            DownSampler(c0, padding=0, extra_padding=True),
            ResnetBlock(c0, c1, groups=g(c0), eps=1e-6),
            ResnetBlock(c1, c1, groups=g(c1), eps=1e-6),
            DownSampler(c1, padding=0, extra_padding=True),
            ResnetBlock(c1, c2, groups=g(c1), eps=1e-6),
            ResnetBlock(c2, c2, groups=g(c2), eps=1e-6),
            DownSampler(c2, padding=0, extra_padding=True),
            ResnetBlock(c2, c3, groups=g(c2), eps=1e-6),
            ResnetBlock(c3, c3, groups=g(c3), eps=1e-6),
            ResnetBlock(c3, c3, groups=g(c3), eps=1e-6),
            VAEAttentionBlock(1, c3, c3, 1, norm_num_groups=g(c3), eps=1e-6, use_conv_attention=use_conv_attention),
            ResnetBlock(c3, c3, groups=g(c3), eps=1e-6),
        ])
        self.conv_norm_out = torch.nn.GroupNorm(num_channels=c3, num_groups=g(c3), eps=1e-6)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(c3, 32, kernel_size=3, padding=1)


class TinyFluxVAEDecoder(FluxVAEDecoder):
    """FLUX VAE decoder counterpart of `TinyFluxVAEEncoder` (channels listed encoder-side)."""

    def __init__(self, channels: tuple[int, int, int, int] = (32, 32, 64, 64), use_conv_attention: bool = True):
        torch.nn.Module.__init__(self)
        c0, c1, c2, c3 = channels
        g = _vae_groups
        self.scaling_factor = 0.3611
        self.shift_factor = 0.1159
        self.conv_in = torch.nn.Conv2d(16, c3, kernel_size=3, padding=1)
        self.blocks = torch.nn.ModuleList([
            ResnetBlock(c3, c3, groups=g(c3), eps=1e-6),
            VAEAttentionBlock(1, c3, c3, 1, norm_num_groups=g(c3), eps=1e-6, use_conv_attention=use_conv_attention),
            ResnetBlock(c3, c3, groups=g(c3), eps=1e-6),
            ResnetBlock(c3, c3, groups=g(c3), eps=1e-6),
            ResnetBlock(c3, c3, groups=g(c3), eps=1e-6),
            ResnetBlock(c3, c3, groups=g(c3), eps=1e-6),
            UpSampler(c3),
            ResnetBlock(c3, c2, groups=g(c3), eps=1e-6),
            ResnetBlock(c2, c2, groups=g(c2), eps=1e-6),
            ResnetBlock(c2, c2, groups=g(c2), eps=1e-6),
            UpSampler(c2),
            ResnetBlock(c2, c1, groups=g(c2), eps=1e-6),
            ResnetBlock(c1, c1, groups=g(c1), eps=1e-6),
            ResnetBlock(c1, c1, groups=g(c1), eps=1e-6),
            UpSampler(c1),
            ResnetBlock(c1, c0, groups=g(c1), eps=1e-6),
            ResnetBlock(c0, c0, groups=g(c0), eps=1e-6),
            ResnetBlock(c0, c0, groups=g(c0), eps=1e-6),
        ])
        self.conv_norm_out = torch.nn.GroupNorm(num_channels=c0, num_groups=g(c0), eps=1e-6)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(c0, 3, kernel_size=3, padding=1)
