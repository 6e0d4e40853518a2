"""File key names of the FLUX.1-dev repository, for writing tiny models in its formats.

The tiny model is stored exactly as FLUX.1-dev is (BFL keys in `flux1-dev.safetensors`
and `ae.safetensors`, Hugging Face CLIP/T5 keys in `text_encoder*/`), so DiffSynth loads
it through its own state-dict converters. The inverse of each converter (DiffSynth
module name -> file key) is derived here by running DiffSynth's converter over the
candidate file keys, so it cannot drift from DiffSynth's mapping.
"""

from __future__ import annotations

import torch
from diffsynth.utils.state_dict_converters.flux_dit import FluxDiTStateDictConverter
from diffsynth.utils.state_dict_converters.flux_text_encoder_clip import FluxTextEncoderClipStateDictConverter
from diffsynth.utils.state_dict_converters.flux_vae import (
    FluxVAEDecoderStateDictConverter,
    FluxVAEEncoderStateDictConverter,
)

_WB = ("weight", "bias")


def bfl_dit_keys(num_double: int, num_single: int) -> list[str]:
    """Every parameter key of a BFL-format FLUX.1 DiT file (`flux1-dev.safetensors`)."""
    keys = []
    for layer in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                  "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
                  "final_layer.adaLN_modulation.1"):
        keys += [f"{layer}.{p}" for p in _WB]
    for i in range(num_double):
        for stream in ("img", "txt"):
            keys += [f"double_blocks.{i}.{stream}_attn.norm.{n}_norm.scale" for n in ("query", "key")]
            for layer in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "mod.lin"):
                keys += [f"double_blocks.{i}.{stream}_{layer}.{p}" for p in _WB]
    for i in range(num_single):
        keys += [f"single_blocks.{i}.norm.{n}_norm.scale" for n in ("query", "key")]
        for layer in ("linear1", "linear2", "modulation.lin"):
            keys += [f"single_blocks.{i}.{layer}.{p}" for p in _WB]
    return keys


def _resnet(prefix: str, shortcut: bool) -> list[str]:
    layers = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
    return [f"{prefix}.{layer}.{p}" for layer in layers for p in _WB]


def _mid(prefix: str) -> list[str]:
    keys = _resnet(f"{prefix}.mid.block_1", False) + _resnet(f"{prefix}.mid.block_2", False)
    keys += [f"{prefix}.mid.attn_1.{layer}.{p}" for layer in ("norm", "q", "k", "v", "proj_out") for p in _WB]
    return keys


def bfl_vae_keys() -> list[str]:
    """Every parameter key of FLUX's `ae.safetensors` (4 levels, 2 encoder / 3 decoder resnets a level)."""
    keys = [f"{side}.{layer}.{p}" for side in ("encoder", "decoder") for layer in ("conv_in", "norm_out", "conv_out") for p in _WB]
    for i in range(4):
        for j in range(2):
            keys += _resnet(f"encoder.down.{i}.block.{j}", shortcut=True)
        if i < 3:
            keys += [f"encoder.down.{i}.downsample.conv.{p}" for p in _WB]
        for j in range(3):
            keys += _resnet(f"decoder.up.{i}.block.{j}", shortcut=True)
        if i > 0:
            keys += [f"decoder.up.{i}.upsample.conv.{p}" for p in _WB]
    return keys + _mid("encoder") + _mid("decoder")


def hf_clip_keys(num_layers: int) -> list[str]:
    keys = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    keys += [f"text_model.final_layer_norm.{p}" for p in _WB]
    for i in range(num_layers):
        for layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"text_model.encoder.layers.{i}.{layer}.{p}" for p in _WB]
    return keys


def inverse_map(converter, candidate_keys: list[str]) -> dict[str, str]:
    """{DiffSynth name: file key}, by running `converter` on one-key state dicts."""
    inverse = {}
    for key in candidate_keys:
        out = converter({key: torch.empty(1, 1)})
        for name in out:
            inverse[name] = key
    return inverse


def to_file_state_dict(module_state: dict[str, torch.Tensor], inverse: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    missing = [k for k in module_state if k not in inverse]
    if missing:
        raise KeyError(f"{what}: no file key for {missing[:5]} ({len(missing)} in all)")
    return {inverse[k]: v for k, v in module_state.items()}


def dit_file_state_dict(dit) -> dict[str, torch.Tensor]:
    inverse = inverse_map(FluxDiTStateDictConverter, bfl_dit_keys(len(dit.blocks), len(dit.single_blocks)))
    return to_file_state_dict(dit.state_dict(), inverse, "DiT")


def vae_file_state_dict(encoder, decoder) -> dict[str, torch.Tensor]:
    keys = bfl_vae_keys()
    enc = to_file_state_dict(encoder.state_dict(), inverse_map(FluxVAEEncoderStateDictConverter, keys), "VAE encoder")
    dec = to_file_state_dict(decoder.state_dict(), inverse_map(FluxVAEDecoderStateDictConverter, keys), "VAE decoder")
    return {**enc, **dec}


def clip_file_state_dict(clip) -> dict[str, torch.Tensor]:
    inverse = inverse_map(FluxTextEncoderClipStateDictConverter, hf_clip_keys(len(clip.encoders)))
    state = to_file_state_dict(clip.state_dict(), inverse, "CLIP text encoder")
    pos = "text_model.embeddings.position_embedding.weight"
    state[pos] = state[pos].reshape(state[pos].shape[-2:])  # DiffSynth stores [1, 77, D]; CLIP files [77, D]
    return state


def t5_file_state_dict(t5) -> dict[str, torch.Tensor]:
    # `encoder.embed_tokens` is the same tensor as `shared`; T5 files store `shared.weight` only.
    return {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
