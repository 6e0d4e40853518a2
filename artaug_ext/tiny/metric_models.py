"""Small stand-ins for DiffSynth's image-metric models, and their checkpoint file layouts.

DiffSynth's metric models hard-code their real sizes (CLIP ViT-H/14, a ViT-L/14 vision
tower for the aesthetic predictor, BLIP ViT-L + BERT-base for ImageReward), so a CPU-sized
checkpoint needs classes that take sizes. Each class here subclasses DiffSynth's and builds
the same module tree from the same transformers classes, with DiffSynth's configuration
values except the sizes, so the metric wrappers, processors and DiffSynth's own state-dict
converters see what they would see on the real model, only smaller.

The `*_file_state_dict` functions go the other way from DiffSynth's converters: module state
to the key layout of the real checkpoint in `DiffSynth-Studio/ImageMetrics` (applied to
DiffSynth's full-size models on `meta` they give the real files' MD5 header hashes, which
the tests check), so the tiny files load through DiffSynth's converters unchanged.
"""

from __future__ import annotations

import copy

import torch
from diffsynth.models.aesthetic import AestheticMLP, AestheticModel
from diffsynth.models.clip import ImageMetricsCLIPModel
from diffsynth.models.image_reward import ImageRewardModel
from transformers import BlipConfig, BlipForImageTextRetrieval, CLIPModel, CLIPVisionConfig, CLIPVisionModel


def _resized(config, **sizes):
    """A copy of a transformers config with only the named (existing) attributes changed."""
    config = copy.deepcopy(config)
    for key, value in sizes.items():
        if not hasattr(config, key):
            raise AttributeError(f"{type(config).__name__} has no attribute {key!r}; fix the tiny metric spec")
        setattr(config, key, value)
    return config


class TinyImageMetricsCLIPModel(ImageMetricsCLIPModel):
    """DiffSynth's CLIP for PickScore, CLIP score and HPSv2 at any size.

    `ImageMetricsCLIPModel` only builds ViT-H/14; this one takes DiffSynth's ViT-H/14
    configuration and changes the widths, depths, image size and vocabulary only.
    """

    def __init__(self, projection_dim: int = 16, text: dict | None = None, vision: dict | None = None):
        base = ImageMetricsCLIPModel.config("h14")
        config = _resized(base, projection_dim=projection_dim)
        config.text_config = _resized(base.text_config, projection_dim=projection_dim, **(text or {}))
        config.vision_config = _resized(base.vision_config, projection_dim=projection_dim, **(vision or {}))
        CLIPModel.__init__(self, config)


class TinyAestheticModel(AestheticModel):
    """DiffSynth's aesthetic predictor (CLIP vision tower + projection + MLP head) at any size.

    `AestheticModel.default_vision_model` hard-codes ViT-L/14 with a 768-wide projection;
    the MLP head is DiffSynth's `AestheticMLP` on the tiny projection width.
    """

    def __init__(self, hidden_size: int = 32, intermediate_size: int = 64, num_attention_heads: int = 2,
                 num_hidden_layers: int = 2, image_size: int = 32, patch_size: int = 8, projection_dim: int = 16):
        # DiffSynth's default_vision_model values, with the sizes given here.
        config = CLIPVisionConfig(
            hidden_size=hidden_size, intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
            num_hidden_layers=num_hidden_layers, image_size=image_size, patch_size=patch_size,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=projection_dim,
        )
        super().__init__(
            mlp=AestheticMLP(projection_dim),
            vision_model=CLIPVisionModel(config),
            visual_projection=torch.nn.Linear(hidden_size, projection_dim, bias=False),
        )


class TinyImageRewardModel(ImageRewardModel):
    """DiffSynth's ImageReward (BLIP image-text encoder + MLP head) at any size.

    `ImageRewardModel.default_blip_model` hard-codes BLIP ViT-L/16 and BERT-base; this one
    keeps DiffSynth's BLIP configuration (its text config comes from DiffSynth's
    `_load_text_config`) and changes the sizes (and the text special-token ids, which follow
    the tiny vocabulary), and preprocesses images at `image_size`.
    """

    def __init__(self, image_size: int = 32, projection_dim: int = 16, vision: dict | None = None,
                 text: dict | None = None):
        vision = dict(vision or {})
        # BlipVisionConfig initialises weights with std 1e-10 (real BLIP is always loaded pretrained), which
        # makes a random vision tower output ~0 for every image; the tiny one is built with CLIP's 0.02.
        # The value only affects building: loading skips initialisation.
        vision_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "patch_size": 8, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "initializer_range": 0.02,
                         **vision, "image_size": image_size}
        text_config = {**ImageRewardModel._load_text_config(None), **(text or {}),
                       "encoder_hidden_size": vision_config["hidden_size"], "add_cross_attention": True,
                       "is_decoder": True}
        config = BlipConfig(vision_config=vision_config, text_config=text_config, projection_dim=projection_dim,
                            image_text_hidden_size=projection_dim)
        super().__init__(blip=BlipForImageTextRetrieval(config), image_size=image_size)


# ---------------------------------------------------------------------------- file layouts

def _with_buffers(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The model's state dict plus the named non-persistent buffers that the real files store."""
    state = dict(model.state_dict())
    for name in names:
        state[name] = model.get_buffer(name)
    return state


def aesthetic_file_state_dict(model: AestheticModel) -> dict[str, torch.Tensor]:
    """`Aesthetic/model.safetensors` keys: the module's own names plus the vision `position_ids`."""
    return _with_buffers(model, ("vision_model.embeddings.position_ids",))


def clip_hf_file_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """`PickScore/` and `CLIP-ViT-H-14-.../model.safetensors`: Hugging Face CLIP keys with both `position_ids`."""
    return _with_buffers(model, ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"))


_OPEN_CLIP_NAMES = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
}
_OPEN_CLIP_PREFIXES = {
    "text_model.final_layer_norm.": "ln_final.",
    "vision_model.pre_layrnorm.": "visual.ln_pre.",
    "vision_model.post_layernorm.": "visual.ln_post.",
}
_OPEN_CLIP_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_OPEN_CLIP_TOWERS = {"text_model.encoder.layers.": "transformer.resblocks.",
                     "vision_model.encoder.layers.": "visual.transformer.resblocks."}
_OPEN_CLIP_LAYER = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                    "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


def open_clip_file_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """`HPSv2/model.safetensors`: OpenCLIP keys, q/k/v fused into `in_proj_*`, projections transposed."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _OPEN_CLIP_NAMES:
            out[_OPEN_CLIP_NAMES[key]] = value
            continue
        if key in _OPEN_CLIP_TRANSPOSED:
            out[_OPEN_CLIP_TRANSPOSED[key]] = value.T.contiguous()
            continue
        prefix = next((p for p in _OPEN_CLIP_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            out[_OPEN_CLIP_PREFIXES[prefix] + key[len(prefix):]] = value
            continue
        tower = next((t for t in _OPEN_CLIP_TOWERS if key.startswith(t)), None)
        if tower is None:
            raise KeyError(f"open_clip_file_state_dict: no OpenCLIP key for {key!r}")
        layer, rest = key[len(tower):].split(".", 1)
        block = f"{_OPEN_CLIP_TOWERS[tower]}{layer}."
        if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            if rest.startswith("self_attn.q_proj."):
                param = rest.rsplit(".", 1)[1]
                attn = key[: -len(rest)] + "self_attn."
                out[f"{block}attn.in_proj_{param}"] = torch.cat(
                    [state[f"{attn}{p}_proj.{param}"] for p in ("q", "k", "v")], dim=0)
            continue
        source = next((s for s in _OPEN_CLIP_LAYER if rest.startswith(s)), None)
        if source is None:
            raise KeyError(f"open_clip_file_state_dict: no OpenCLIP key for {key!r}")
        out[block + _OPEN_CLIP_LAYER[source] + rest[len(source):]] = value
    return out


_BLIP_VISION_NAMES = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
_BLIP_VISION_LAYER = {"layer_norm1.": "norm1.", "self_attn.qkv.": "attn.qkv.", "self_attn.projection.": "attn.proj.",
                      "layer_norm2.": "norm2.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}


def image_reward_file_state_dict(model: ImageRewardModel) -> dict[str, torch.Tensor]:
    """`ImageReward/model.safetensors`: ImageReward's own BLIP keys (`blip.visual_encoder.*` timm-style,
    `blip.text_encoder.*` with its `position_ids`, projections, `mlp.*`) and no ITM head, which
    DiffSynth's converter adds as zeros."""
    vision, encoder = "blip.vision_model.", "blip.visual_encoder."
    out: dict[str, torch.Tensor] = {}
    for key, value in _with_buffers(model, ("blip.text_encoder.embeddings.position_ids",)).items():
        if key.startswith("blip.itm_head."):
            continue
        if not key.startswith(vision):
            out[key] = value
            continue
        rest = key[len(vision):]
        if rest in _BLIP_VISION_NAMES:
            out[encoder + _BLIP_VISION_NAMES[rest]] = value
            continue
        if not rest.startswith("encoder.layers."):
            raise KeyError(f"image_reward_file_state_dict: no ImageReward key for {key!r}")
        layer, sub = rest[len("encoder.layers."):].split(".", 1)
        source = next((s for s in _BLIP_VISION_LAYER if sub.startswith(s)), None)
        if source is None:
            raise KeyError(f"image_reward_file_state_dict: no ImageReward key for {key!r}")
        out[f"{encoder}blocks.{layer}.{_BLIP_VISION_LAYER[source]}{sub[len(source):]}"] = value
    return out
