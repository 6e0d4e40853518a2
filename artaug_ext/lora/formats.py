"""Read FLUX LoRA files and map their keys onto DiffSynth's FLUX module names.

Formats: kohya / "universal FLUX" (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
`.alpha`), CLIP text-encoder keys (`lora_te1_...`), T5 text-encoder keys (`lora_te3_...` from
kohya, `lora_te2_...` from OneTrainer, `text_encoder_2.encoder.block.0...` from diffusers),
diffusers / PEFT (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`; split q/k/v land
on row ranges of the fused qkv weight, so a LoRA with only q and v is exact), DiffSynth's training output
(`blocks.0.attn.a_to_qkv.lora_A.default.weight`), `diffusion_model.` prefixes, BFL dotted
names and XLabs (`double_blocks.0.processor.qkv_lora1.down.weight`,
`single_blocks.0.processor.qkv_lora.down.weight`).

The key tables were written against diffsynth 2.1.12's module tree (FluxDiT, the CLIP
encoder, the transformers T5EncoderModel behind FluxTextEncoderT5) and its state-dict
converters; DiffSynth's own LoRA converter is not used (it rescales the caller's tensors in
place and fails on q/v-only LoRAs).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import ArtaugError, FileFormatError
from ..files import LORA_FILE_FIX, TORCH_PICKLE_SUFFIXES, check_safetensors

logger = logging.getLogger(__name__)


class LoRAFormatError(ArtaugError, ValueError):
    """A LoRA whose keys or shapes do not fit the target."""


class UnsupportedLoRAError(LoRAFormatError):
    """A LyCORIS / DoRA / full-diff file: recognised, but not a plain LoRA."""


@dataclass
class LoRAPiece:
    """One low-rank update: rows `rows` (in units of the module's in_features, None = all)
    of `component`'s module `module` get `scale * B @ A`."""

    component: str  # "dit", "te1" (CLIP) or "te2" (T5)
    module: str  # DiffSynth module name
    rows: tuple[int, int] | None
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [rows, r]
    scale: float  # layer_alpha / rank (the user's alpha is applied on top)
    source: str  # the key prefix in the file, for messages

    def row_range(self, out_features: int) -> tuple[int, int]:
        """The module rows this piece writes (`rows` counts in units of in_features)."""
        if self.rows is None:
            return 0, out_features
        in_f = self.A.shape[1]
        return self.rows[0] * in_f, self.rows[1] * in_f


def stack_pieces(pieces: list[LoRAPiece], out_features: int, alpha: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Several pieces on one module as one exact (A, B): the A's stacked along rank, each
    piece's B on its own rows and zero elsewhere, every scale (times `alpha`) folded into B,
    so that B @ A is the sum of the pieces' updates."""
    A = torch.cat([p.A.to(dtype) for p in pieces], dim=0)
    B = torch.zeros(out_features, A.shape[0], dtype=dtype)
    col = 0
    for p in pieces:
        lo, hi = p.row_range(out_features)
        B[lo:hi, col:col + p.A.shape[0]] = p.B.to(dtype) * (p.scale * alpha)
        col += p.A.shape[0]
    return A, B


# out_features / in_features of the fused DiffSynth modules that row pieces land in.
FUSED_RATIO = {"attn.a_to_qkv": 3, "attn.b_to_qkv": 3, "to_qkv_mlp": 7, "final_norm_out.linear": 2}


def module_out_features(module: str, pieces: list[LoRAPiece]) -> int:
    """out_features of a DiffSynth module, as far as its pieces tell: a whole-module piece
    gives it directly, row pieces on a fused module give it through the fusion ratio."""
    whole = [p for p in pieces if p.rows is None]
    if whole:
        return whole[0].B.shape[0]
    suffix = next((s for s in FUSED_RATIO if module.endswith(s)), None)
    if suffix is None:
        raise LoRAFormatError(f"{module}: row pieces on a module that is not a fused projection")
    return FUSED_RATIO[suffix] * pieces[0].A.shape[1]


@dataclass
class ParsedLoRA:
    pieces: list[LoRAPiece]
    unmapped: list[str] = field(default_factory=list)  # keys that map to nothing
    formats: set[str] = field(default_factory=set)
    metadata: dict = field(default_factory=dict)


# --- key tables ------------------------------------------------------------------------

# BFL / kohya names (dots of the BFL form become underscores) -> DiffSynth names.
_KOHYA_DOUBLE = {
    "img_attn_qkv": "attn.a_to_qkv", "txt_attn_qkv": "attn.b_to_qkv",
    "img_attn_proj": "attn.a_to_out", "txt_attn_proj": "attn.b_to_out",
    "img_mlp_0": "ff_a.0", "img_mlp_2": "ff_a.2", "txt_mlp_0": "ff_b.0", "txt_mlp_2": "ff_b.2",
    "img_mod_lin": "norm1_a.linear", "txt_mod_lin": "norm1_b.linear",
}
_KOHYA_SINGLE = {"linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation_lin": "norm.linear"}
_KOHYA_GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_embedder.timestep_embedder.0",
    "time_in_out_layer": "time_embedder.timestep_embedder.2",
    "vector_in_in_layer": "pooled_text_embedder.0", "vector_in_out_layer": "pooled_text_embedder.2",
    "guidance_in_in_layer": "guidance_embedder.timestep_embedder.0",
    "guidance_in_out_layer": "guidance_embedder.timestep_embedder.2",
    "final_layer_linear": "final_proj_out",
    # BFL's final modulation is (shift, scale), the same order as DiffSynth's.
    "final_layer_adaLN_modulation_1": "final_norm_out.linear",
}
# XLabs attention processors (x-flux DoubleStreamBlockLoraProcessor): lora1 = image stream,
# lora2 = text stream; each LoRA reads the same input as the BFL linear it sits beside.
_XLABS_DOUBLE = {"qkv_lora1": "attn.a_to_qkv", "qkv_lora2": "attn.b_to_qkv",
                 "proj_lora1": "attn.a_to_out", "proj_lora2": "attn.b_to_out"}
# x-flux SingleStreamBlockLoraProcessor: qkv_lora (dim -> 3 dim) is added to the q/k/v part of
# linear1's output (rows 0:3 dim of the fused to_qkv_mlp), proj_lora (15360 -> dim) reads
# linear2's input. (module, rows in units of in_features or None)
_XLABS_SINGLE = {"qkv_lora": ("to_qkv_mlp", (0, 3)), "proj_lora": ("proj_out", None)}
# diffusers names -> (DiffSynth module, rows in units of in_features or None)
_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("attn.a_to_qkv", (0, 1)), "attn.to_k": ("attn.a_to_qkv", (1, 2)),
    "attn.to_v": ("attn.a_to_qkv", (2, 3)),
    "attn.add_q_proj": ("attn.b_to_qkv", (0, 1)), "attn.add_k_proj": ("attn.b_to_qkv", (1, 2)),
    "attn.add_v_proj": ("attn.b_to_qkv", (2, 3)),
    "attn.to_out.0": ("attn.a_to_out", None), "attn.to_add_out": ("attn.b_to_out", None),
    "ff.net.0.proj": ("ff_a.0", None), "ff.net.2": ("ff_a.2", None),
    "ff_context.net.0.proj": ("ff_b.0", None), "ff_context.net.2": ("ff_b.2", None),
    "norm1.linear": ("norm1_a.linear", None), "norm1_context.linear": ("norm1_b.linear", None),
}
_DIFFUSERS_SINGLE = {
    "attn.to_q": ("to_qkv_mlp", (0, 1)), "attn.to_k": ("to_qkv_mlp", (1, 2)),
    "attn.to_v": ("to_qkv_mlp", (2, 3)), "proj_mlp": ("to_qkv_mlp", (3, 7)),
    "proj_out": ("proj_out", None), "norm.linear": ("norm.linear", None),
}
_DIFFUSERS_GLOBAL = {
    "x_embedder": "x_embedder", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "time_embedder.timestep_embedder.0",
    "time_text_embed.timestep_embedder.linear_2": "time_embedder.timestep_embedder.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_embedder.timestep_embedder.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_embedder.timestep_embedder.2",
    "time_text_embed.text_embedder.linear_1": "pooled_text_embedder.0",
    "time_text_embed.text_embedder.linear_2": "pooled_text_embedder.2",
    "proj_out": "final_proj_out",
    # diffusers' final modulation is (scale, shift): its halves are swapped (see _pieces_for).
    "norm_out.linear": "final_norm_out.linear",
}
_DIFFSYNTH_GLOBAL = set(_KOHYA_GLOBAL.values())
_DIFFSYNTH_DOUBLE = set(_KOHYA_DOUBLE.values())
_DIFFSYNTH_SINGLE = set(_KOHYA_SINGLE.values())
_CLIP = {"self_attn_q_proj": "attn.to_q", "self_attn_k_proj": "attn.to_k", "self_attn_v_proj": "attn.to_v",
         "self_attn_out_proj": "attn.to_out", "mlp_fc1": "fc1", "mlp_fc2": "fc2"}
_CLIP_NATIVE = set(_CLIP.values())
# T5 v1.1 (gated FFN, no biases), as in FLUX's text_encoder_2: kohya names (dots of the
# transformers module names become underscores) -> module names under encoder.block.N.
_T5 = {"layer_0_SelfAttention_q": "layer.0.SelfAttention.q", "layer_0_SelfAttention_k": "layer.0.SelfAttention.k",
       "layer_0_SelfAttention_v": "layer.0.SelfAttention.v", "layer_0_SelfAttention_o": "layer.0.SelfAttention.o",
       "layer_1_DenseReluDense_wi_0": "layer.1.DenseReluDense.wi_0",
       "layer_1_DenseReluDense_wi_1": "layer.1.DenseReluDense.wi_1",
       "layer_1_DenseReluDense_wo": "layer.1.DenseReluDense.wo"}
_T5_NATIVE = set(_T5.values())

_SUFFIXES = [
    (re.compile(r"\.lora_down\.weight$"), "A"), (re.compile(r"\.lora_up\.weight$"), "B"),
    (re.compile(r"\.lora_A(\.[^.]+)?\.weight$"), "A"), (re.compile(r"\.lora_B(\.[^.]+)?\.weight$"), "B"),
    (re.compile(r"\.down\.weight$"), "A"), (re.compile(r"\.up\.weight$"), "B"),
    (re.compile(r"\.alpha$"), "alpha"),
]
# Substrings of a key, except the full-weight diffs, whose marker is the key's last part
# (a plain ".diff" substring would also match the "model.diffusion_model." prefix).
_LYCORIS = [
    (re.compile(r"lokr_"), "a LyCORIS LoKr file"), (re.compile(r"hada_"), "a LyCORIS LoHa file"),
    (re.compile(r"dora_scale"), "a DoRA file"), (re.compile(r"lora_magnitude_vector"), "a DoRA file"),
    (re.compile(r"lora_mid"), "a LyCORIS LoCon (Tucker) file"),
    (re.compile(r"\.diff(_b)?$"), "a full-weight diff file"),
    (re.compile(r"oft_"), "an OFT file"), (re.compile(r"ia3_"), "an IA3 file"),
]


def _split_key(key: str) -> tuple[str, str | None]:
    for pattern, kind in _SUFFIXES:
        m = pattern.search(key)
        if m:
            return key[:m.start()], kind
    return key, None


def _strip_prefix(base: str) -> tuple[str, str]:
    """-> (family, rest): family in kohya_unet, te1, t5, plain.

    T5 on FLUX: kohya's lora_flux writes `lora_te3_` (SD3 numbering, kept "for ComfyUI"),
    OneTrainer / Forge write `lora_te2_`; ComfyUI reads both as FLUX's T5. In SD3/SDXL files
    `lora_te2_` is CLIP-G: those keys have CLIP-shaped names and stay unmapped (see map_key)."""
    for prefix, family in (("lora_unet_", "kohya_unet"), ("lora_te1_", "te1"), ("lora_te_", "te1"),
                           ("lora_te2_", "t5"), ("lora_te3_", "t5")):
        if base.startswith(prefix):
            return family, base[len(prefix):]
    for prefix in ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet."):
        if base.startswith(prefix):
            base = base[len(prefix):]
    if base.startswith("text_encoder."):
        return "te1", base[len("text_encoder."):].replace(".", "_")
    if base.startswith("text_encoder_2."):
        return "t5", base[len("text_encoder_2."):]
    if base.startswith("text_model."):
        return "te1", base.replace(".", "_")
    return "plain", base


def map_key(base: str) -> tuple[str, str, str, tuple[int, int] | None, bool] | None:
    """Map a LoRA key prefix to (format, component, module, rows, swap_halves), or None."""
    family, rest = _strip_prefix(base)
    if family == "te1":
        if rest.startswith("text_model_"):
            rest = rest[len("text_model_"):]
        m = re.fullmatch(r"encoder_layers_(\d+)_(\w+)", rest)
        if m and m.group(2) in _CLIP:
            return "kohya-te1", "te1", f"encoders.{m.group(1)}.{_CLIP[m.group(2)]}", None, False
        return None
    if family == "t5":
        # Only T5-shaped names: a CLIP-G key (SD3 / SDXL lora_te2_, text_encoder_2.text_model...)
        # matches neither pattern and stays unmapped.
        m = re.fullmatch(r"encoder_block_(\d+)_(\w+)", rest)
        if m and m.group(2) in _T5:
            return "kohya-te2", "te2", f"encoder.block.{m.group(1)}.{_T5[m.group(2)]}", None, False
        m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", rest)
        if m and m.group(2) in _T5_NATIVE:
            return "diffusers-te2", "te2", rest, None, False
        return None
    if family == "plain":
        # XLabs processors
        m = re.fullmatch(r"double_blocks\.(\d+)\.processor\.(\w+)", rest)
        if m:
            if m.group(2) in _XLABS_DOUBLE:
                return "xlabs", "dit", f"blocks.{m.group(1)}.{_XLABS_DOUBLE[m.group(2)]}", None, False
            return None
        m = re.fullmatch(r"single_blocks\.(\d+)\.processor\.(\w+)", rest)
        if m:
            hit = _XLABS_SINGLE.get(m.group(2))
            return ("xlabs", "dit", f"single_blocks.{m.group(1)}.{hit[0]}", hit[1], False) if hit else None
        # diffusers
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", rest)
        if m:
            hit = _DIFFUSERS_DOUBLE.get(m.group(2))
            return ("diffusers", "dit", f"blocks.{m.group(1)}.{hit[0]}", hit[1], False) if hit else None
        m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", rest)
        if m:
            hit = _DIFFUSERS_SINGLE.get(m.group(2))
            return ("diffusers", "dit", f"single_blocks.{m.group(1)}.{hit[0]}", hit[1], False) if hit else None
        if rest in _DIFFUSERS_GLOBAL:
            return "diffusers", "dit", _DIFFUSERS_GLOBAL[rest], None, rest == "norm_out.linear"
        # DiffSynth's own names (training output, PEFT on a DiffSynth model)
        m = re.fullmatch(r"(blocks|single_blocks)\.(\d+)\.(.+)", rest)
        if m:
            table = _DIFFSYNTH_DOUBLE if m.group(1) == "blocks" else _DIFFSYNTH_SINGLE
            if m.group(3) in table:
                return "diffsynth", "dit", rest, None, False
        if rest in _DIFFSYNTH_GLOBAL:
            return "diffsynth", "dit", rest, None, False
        m = re.fullmatch(r"encoders\.(\d+)\.(.+)", rest)
        if m and m.group(2) in _CLIP_NATIVE:
            return "diffsynth", "te1", rest, None, False
        # the T5's own (transformers) names, e.g. PEFT on text_encoder_2 alone
        m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", rest)
        if m and m.group(2) in _T5_NATIVE:
            return "diffsynth", "te2", rest, None, False
        # BFL dotted names: same table as kohya
        if re.match(r"(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)\b", rest):
            hit = _map_kohya_unet(rest.replace(".", "_"))
            return ("bfl",) + hit[1:] if hit else None
        return None
    return _map_kohya_unet(rest)


def _map_kohya_unet(rest: str):
    m = re.fullmatch(r"double_blocks_(\d+)_(\w+)", rest)
    if m:
        mod = _KOHYA_DOUBLE.get(m.group(2))
        return ("kohya", "dit", f"blocks.{m.group(1)}.{mod}", None, False) if mod else None
    m = re.fullmatch(r"single_blocks_(\d+)_(\w+)", rest)
    if m:
        mod = _KOHYA_SINGLE.get(m.group(2))
        return ("kohya", "dit", f"single_blocks.{m.group(1)}.{mod}", None, False) if mod else None
    if rest in _KOHYA_GLOBAL:
        return "kohya", "dit", _KOHYA_GLOBAL[rest], None, False
    return None


# --- reading ----------------------------------------------------------------------------

def read_lora(source) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) from a state dict, a .safetensors/.pt file or a PEFT folder.
    A state dict given by the caller is never modified. A file that is truncated, empty, not
    a LoRA file or a pickle with more than tensors raises FileFormatError naming it."""
    if isinstance(source, dict):
        return dict(source), {}
    path = os.fspath(source)
    meta: dict = {}
    if not os.path.exists(path):
        raise FileFormatError(path, "no such file or folder", "check the path")
    if os.path.isdir(path):
        cfg = os.path.join(path, "adapter_config.json")
        if os.path.exists(cfg):
            try:
                with open(cfg, encoding="utf-8") as f:
                    meta["peft_config"] = json.load(f)
            except UnicodeDecodeError:
                raise FileFormatError(cfg, "not UTF-8 text", "restore the PEFT adapter_config.json") from None
            except ValueError as e:
                raise FileFormatError(f"{cfg}:{getattr(e, 'lineno', '?')}", f"not valid JSON ({e})",
                                      "restore the PEFT adapter_config.json") from None
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(files) != 1:
                raise FileFormatError(path, f"a folder with {len(files)} .safetensors files and no adapter_model file",
                                      "give the LoRA file itself, or a PEFT folder")
            path = os.path.join(path, files[0])
    with open(path, "rb") as f:
        magic = f.read(8)
    if not magic:
        raise FileFormatError(path, "the file is empty", LORA_FILE_FIX)
    if not path.endswith(TORCH_PICKLE_SUFFIXES):
        check_safetensors(path, LORA_FILE_FIX)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta.update(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle and zip errors of many types; the file is what is wrong
            raise FileFormatError(path, f"not a tensor-only torch file ({type(e).__name__}); pickles are read with "
                                  "weights_only=True, so one holding other objects is refused",
                                  "convert it to .safetensors with a tool you trust") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise FileFormatError(path, "does not hold a dict of tensors", LORA_FILE_FIX)
    if not sd:
        raise FileFormatError(path, "holds no tensors", LORA_FILE_FIX)
    return sd, meta


def _refuse_lycoris(keys) -> None:
    for pattern, what in _LYCORIS:
        hits = [k for k in keys if pattern.search(k)]
        if hits:
            raise UnsupportedLoRAError(f"this is {what}, not supported yet ({len(hits)} such keys, e.g. {hits[0]!r})")


def _peft_alpha(cfg: dict, base: str) -> float | None:
    if not cfg:
        return None
    alpha = cfg.get("lora_alpha")
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if base.endswith(pattern) or re.search(pattern, base):
            alpha = value
    return None if alpha is None else float(alpha)


def parse_lora(state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> ParsedLoRA:
    """Map every LoRA key to pieces on DiffSynth modules; keys that map to nothing are
    listed in `unmapped` (the caller decides whether that is an error)."""
    metadata = metadata or {}
    _refuse_lycoris(state_dict.keys())
    peft_cfg = metadata.get("peft_config") or {}
    if peft_cfg.get("use_dora"):
        raise UnsupportedLoRAError("this is a DoRA file (adapter_config.json use_dora=true), not supported yet")
    rslora = bool(peft_cfg.get("use_rslora"))
    meta_alpha = metadata.get("ss_network_alpha")
    meta_alpha = float(meta_alpha) if meta_alpha not in (None, "", "None") else None

    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmapped = []
    for key, value in state_dict.items():
        base, kind = _split_key(key)
        if kind is None:
            unmapped.append(key)
            continue
        groups.setdefault(base, {})[kind] = (key, value)

    parsed = ParsedLoRA(pieces=[], metadata=metadata)
    for base, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            if set(parts) != {"alpha"}:
                unmapped.extend(k for k, _ in parts.values())
            continue
        hit = map_key(base)
        if hit is None:
            unmapped.extend(k for k, _ in parts.values())
            continue
        fmt, component, module, rows, swap = hit
        A, B = parts["A"][1], parts["B"][1]
        if A.dim() == 4 and A.shape[2:] == (1, 1):
            A, B = A.flatten(1), B.flatten(1)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LoRAFormatError(f"{base}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not a rank-r pair")
        rank = A.shape[0]
        if "alpha" in parts:
            layer_alpha = float(parts["alpha"][1].float().item())
        else:
            layer_alpha = _peft_alpha(peft_cfg, base)
            if layer_alpha is None:
                layer_alpha = meta_alpha
        if layer_alpha is None:
            scale = 1.0
        else:
            scale = layer_alpha / (math.sqrt(rank) if rslora else rank)
        parsed.formats.add(fmt)
        if swap:
            h = B.shape[0] // 2
            parsed.pieces.append(LoRAPiece(component, module, (0, 1), A, B[h:], scale, base))
            parsed.pieces.append(LoRAPiece(component, module, (1, 2), A, B[:h], scale, base))
        else:
            parsed.pieces.append(LoRAPiece(component, module, rows, A, B, scale, base))
    parsed.unmapped = sorted(unmapped)
    return parsed


# --- writing kohya names ----------------------------------------------------------------

_INV_DOUBLE = {v: k for k, v in _KOHYA_DOUBLE.items()}
_INV_SINGLE = {v: k for k, v in _KOHYA_SINGLE.items()}
_INV_GLOBAL = {v: k for k, v in _KOHYA_GLOBAL.items()}
_INV_CLIP = {v: k for k, v in _CLIP.items()}
_INV_T5 = {v: k for k, v in _T5.items()}


def kohya_name(key: str) -> str:
    """"dit:blocks.0.attn.a_to_qkv" -> "lora_unet_double_blocks_0_img_attn_qkv". T5 layers get
    kohya's FLUX prefix `lora_te3_` (what sd-scripts' lora_flux writes and ComfyUI reads)."""
    comp, module = key.split(":", 1)
    parts = module.split(".")
    if comp == "te1" and parts[0] == "encoders":
        return f"lora_te1_text_model_encoder_layers_{parts[1]}_{_INV_CLIP['.'.join(parts[2:])]}"
    if comp == "te2" and parts[:2] == ["encoder", "block"] and ".".join(parts[3:]) in _INV_T5:
        return f"lora_te3_encoder_block_{parts[2]}_{_INV_T5['.'.join(parts[3:])]}"
    if comp == "dit":
        if parts[0] == "blocks":
            return f"lora_unet_double_blocks_{parts[1]}_{_INV_DOUBLE['.'.join(parts[2:])]}"
        if parts[0] == "single_blocks":
            return f"lora_unet_single_blocks_{parts[1]}_{_INV_SINGLE['.'.join(parts[2:])]}"
        if module in _INV_GLOBAL:
            return f"lora_unet_{_INV_GLOBAL[module]}"
    raise KeyError(f"no kohya name for {key}")
