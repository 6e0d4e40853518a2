"""FLUX.1's DiT layer by layer: the parameter shapes a memory plan counts (floor 1, no torch).

The table is DiffSynth's `FluxDiT` (its module names and shapes), written out per block and
parameterised by widths and depths, so that FLUX.1-dev (`FluxShapes()`) and a stand-in with
FLUX's widths and fewer blocks are counted by the same table. tests/test_memory_plan.py
checks it against DiffSynth's `FluxDiT` built on the meta device. The text encoders and the
VAE, which no LoRA touches, are counted as totals (DiffSynth's classes, counted the same way).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FluxShapes:
    dim: int = 3072  # hidden width: 24 heads of 128
    heads: int = 24
    mlp: int = 12288  # MLP width (4 x dim)
    joint_blocks: int = 19  # double-stream blocks (`blocks`)
    single_blocks: int = 38
    text_dim: int = 4096  # T5-XXL width (context_embedder's input)
    pooled_dim: int = 768  # CLIP-L pooled width
    in_channels: int = 64  # 16 latent channels x 2x2 patches
    guidance_embedder: bool = True  # FLUX.1-dev's embedded guidance
    # Parameters of the components that are not the DiT (DiffSynth's FluxTextEncoderClip,
    # FluxTextEncoderT5 and FluxVAEEncoder + FluxVAEDecoder).
    clip_params: int = 123_060_480
    t5_params: int = 4_762_310_656
    vae_params: int = 34_274_208 + 49_545_475
    # The text encoders' token embeddings (not linear layers: a quantisation leaves them as they are).
    clip_embedding_params: int = 49_408 * 768 + 77 * 768
    t5_embedding_params: int = 32_128 * 4096
    latent_channels: int = 16  # VAE latents, 8x down
    vae_width: int = 128  # channels of the VAE decoder's full-resolution blocks

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def dit(self) -> dict[str, tuple[int, ...]]:
        """Every DiT parameter, DiffSynth's name -> shape."""
        d, m, h = self.dim, self.mlp, self.head_dim
        out: dict[str, tuple[int, ...]] = {}

        def linear(name: str, n_out: int, n_in: int) -> None:
            out[f"{name}.weight"] = (n_out, n_in)
            out[f"{name}.bias"] = (n_out,)

        linear("time_embedder.timestep_embedder.0", d, 256)
        linear("time_embedder.timestep_embedder.2", d, d)
        if self.guidance_embedder:
            linear("guidance_embedder.timestep_embedder.0", d, 256)
            linear("guidance_embedder.timestep_embedder.2", d, d)
        linear("pooled_text_embedder.0", d, self.pooled_dim)
        linear("pooled_text_embedder.2", d, d)
        linear("context_embedder", d, self.text_dim)
        linear("x_embedder", d, self.in_channels)
        for i in range(self.joint_blocks):
            b = f"blocks.{i}"
            for s in ("a", "b"):  # image stream, text stream
                linear(f"{b}.norm1_{s}.linear", 6 * d, d)
                linear(f"{b}.attn.{s}_to_qkv", 3 * d, d)
                out[f"{b}.attn.norm_q_{s}.weight"] = (h,)
                out[f"{b}.attn.norm_k_{s}.weight"] = (h,)
                linear(f"{b}.attn.{s}_to_out", d, d)
                linear(f"{b}.ff_{s}.0", m, d)
                linear(f"{b}.ff_{s}.2", d, m)
        for i in range(self.single_blocks):
            b = f"single_blocks.{i}"
            linear(f"{b}.norm.linear", 3 * d, d)
            linear(f"{b}.to_qkv_mlp", 3 * d + m, d)
            out[f"{b}.norm_q_a.weight"] = (h,)
            out[f"{b}.norm_k_a.weight"] = (h,)
            linear(f"{b}.proj_out", d, d + m)
        linear("final_norm_out.linear", 2 * d, d)
        linear("final_proj_out", self.in_channels, d)
        return out

    def dit_params(self) -> int:
        return sum(_numel(s) for s in self.dit().values())

    def all_params(self) -> int:
        """DiT, both text encoders and the VAE: what a loaded pipeline holds."""
        return self.dit_params() + self.clip_params + self.t5_params + self.vae_params

    def all_linear_weights(self) -> dict[str, tuple[int, int]]:
        """Every 2-D weight of the DiT (what a quantisation of its linears stores), by module name."""
        return {name[:-len(".weight")]: shape for name, shape in self.dit().items()
                if len(shape) == 2 and name.endswith(".weight")}

    def linear_weights(self, targets) -> dict[str, tuple[int, int]]:
        """The 2-D weights of the linears a LoRA on `targets` (module-name suffixes, as in
        train/settings.py's target_modules) adapts, by module name: what a merge touches."""
        suffixes = tuple(targets)
        return {name: shape for name, shape in self.all_linear_weights().items()
                if any(name == s or name.endswith("." + s) for s in suffixes)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


FLUX_DEV = FluxShapes()
