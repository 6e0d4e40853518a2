"""Combine LoRAs exactly, truncate them to a target rank, export them in kohya format.

The exact sum of LoRAs is their concatenation along rank (`sum_i w_i B_i A_i = [w_1 B_1 ...]
[A_1; ...]`). Truncation to rank k: QR of each factor (`B = Qb Rb`, `A^T = Qa Ra`), an SVD
of the small core `Rb Ra^T`, keep the top k singular triplets. This is the best rank-k
approximation of `B A` (no centring, unlike `torch.pca_lowrank`), and costs
O((out + in) r^2) instead of an SVD of the full matrix.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .formats import kohya_name, module_out_features, parse_lora, read_lora, stack_pieces

logger = logging.getLogger(__name__)


@dataclass
class LoRALayer:
    """`delta W = B @ A` for one whole module, in fp32, every scale folded into B."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def lora_layers(lora, alpha: float = 1.0) -> dict[str, LoRALayer]:
    """A LoRA (path, PEFT folder, state dict) as whole-module layers keyed "component:module";
    split q/k/v pieces become one layer on the fused module (B zero outside their rows)."""
    if isinstance(lora, dict) and lora and all(isinstance(v, LoRALayer) for v in lora.values()):
        return {k: LoRALayer(v.A, v.B * alpha) for k, v in lora.items()}
    sd, meta = read_lora(lora)
    parsed = parse_lora(sd, meta)
    if parsed.unmapped:
        logger.warning("%d keys map to no FLUX module and are dropped: %s", len(parsed.unmapped), parsed.unmapped[:5])
    grouped: dict[str, list] = {}
    for p in parsed.pieces:
        grouped.setdefault(f"{p.component}:{p.module}", []).append(p)
    out = {}
    for key, pieces in grouped.items():
        out_f = module_out_features(key.split(":", 1)[1], pieces)
        A, B = stack_pieces(pieces, out_f, alpha, dtype=torch.float64)
        out[key] = LoRALayer(A.float(), B.float())
    return out


def truncate_layer(layer: LoRALayer, rank: int) -> tuple[LoRALayer, float]:
    """Best rank-`rank` approximation of B @ A; returns it and the retained energy
    (sum of kept squared singular values / total)."""
    if not isinstance(rank, int) or rank <= 0:
        raise UsageError(f"truncation rank {rank!r} must be a positive integer")
    A, B = layer.A.double(), layer.B.double()
    qb, rb = torch.linalg.qr(B)  # B = qb rb
    qa, ra = torch.linalg.qr(A.T)  # A^T = qa ra
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, int(s.numel()))
    total = float((s ** 2).sum())
    energy = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:k].sqrt()
    new_B = (qb @ u[:, :k]) * root
    new_A = root[:, None] * (vh[:k] @ qa.T)
    return LoRALayer(new_A.float(), new_B.float()), energy


def combine_loras(loras, weights=None, *, average: bool = False, rank: int | None = None):
    """Exact weighted sum (or weighted average) of LoRAs, optionally truncated to a rank.

    The sum is exact by rank concatenation (the ranks add up); a truncation keeps the best
    rank-`rank` approximation of each layer (QR of each factor and an SVD of the small core) and
    reports the share of energy it retains.

    Args:
        loras: LoRAs in any form `load_lora` reads (paths, PEFT folders, state dicts), or layer
            dicts from an earlier `combine_loras`.
        weights: one finite weight per LoRA (default: all 1.0).
        average: divide the weights by their sum (a weighted average).
        rank: truncate every layer to this rank; None keeps the exact sum.

    Returns:
        `(layers, info)`: layers keyed "component:module" (for `save_kohya`); `info["ranks_before"]`
            per layer and, when truncated, `info["energy"]` (retained energy per layer) and
            `info["min_energy"]`.

    Raises:
        UsageError: no LoRAs, a bad rank, non-finite weights, as many weights as LoRAs not given,
            weights that sum to zero with `average`, or LoRAs that disagree on a layer's shape.

    Example:
        >>> import artaug_ext
        >>> layers, info = artaug_ext.combine_loras(["a.safetensors", "b.safetensors"], rank=16)  # doctest: +SKIP
        >>> artaug_ext.save_kohya(layers, "ab.safetensors")  # doctest: +SKIP
        'ab.safetensors'
    """
    loras = list(loras)
    if not loras:
        raise UsageError("combine_loras: no LoRAs given")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise UsageError(f"combine_loras: rank={rank!r} must be a positive integer (None keeps the exact sum)")
    weights = [1.0] * len(loras) if weights is None else [float(w) for w in weights]
    if any(not math.isfinite(w) for w in weights):
        raise UsageError(f"combine_loras: weights {weights} must be finite")
    if len(weights) != len(loras):
        raise UsageError(f"{len(loras)} LoRAs but {len(weights)} weights")
    if average:
        total = sum(weights)
        if total == 0:
            raise UsageError("weights sum to zero; cannot average")
        weights = [w / total for w in weights]
    sets = [lora_layers(lora) for lora in loras]
    out: dict[str, LoRALayer] = {}
    for key in sorted(set().union(*sets)):
        parts = [(s[key], w) for s, w in zip(sets, weights, strict=True) if key in s]
        shapes = {(p.B.shape[0], p.A.shape[1]) for p, _ in parts}
        if len(shapes) > 1:
            raise UsageError(f"{key}: the LoRAs disagree on the layer shape: {sorted(shapes)}")
        out[key] = LoRALayer(torch.cat([p.A for p, _ in parts], dim=0),
                             torch.cat([p.B * w for p, w in parts], dim=1))
    info: dict = {"ranks_before": {k: v.rank for k, v in out.items()}}
    if rank is not None:
        energies = {}
        for key in out:
            if out[key].rank > rank:
                out[key], energies[key] = truncate_layer(out[key], rank)
            else:
                energies[key] = 1.0
        info["energy"] = energies
        info["min_energy"] = min(energies.values()) if energies else 1.0
        logger.info("truncated to rank %d: retained energy min %.6f", rank, info["min_energy"])
    return out, info


# --- export -------------------------------------------------------------------------------

def kohya_state_dict(layers: dict[str, LoRALayer], dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """kohya keys with `.alpha` = rank, so each layer's alpha / rank is 1 and every loader
    (DiffSynth's one-alpha-per-file guess included) reads the scale right. Where the rank
    is not exact in `dtype` (bf16: odd ranks above 256) the stored alpha is the rounded
    rank and B carries the factor rank / alpha, so alpha / rank * B is still exact."""
    sd = {}
    for key, layer in layers.items():
        name = kohya_name(key)
        alpha = torch.tensor(float(layer.rank), dtype=dtype)
        b = layer.B
        if layer.rank and float(alpha) != layer.rank:
            b = (b.double() * (layer.rank / float(alpha))).to(b.dtype)
        sd[f"{name}.lora_down.weight"] = layer.A.to(dtype).contiguous()
        sd[f"{name}.lora_up.weight"] = b.to(dtype).contiguous()
        sd[f"{name}.alpha"] = alpha
    return sd


def save_kohya(layers: dict[str, LoRALayer], path: str, metadata: dict | None = None, dtype=torch.bfloat16) -> str:
    """Write LoRA layers as a kohya / "universal FLUX" safetensors file, atomically and reproducibly.

    The format DiffSynth, ComfyUI and diffusers load (and `load_lora` reads back).

    Args:
        layers: layers keyed "component:module", as `combine_loras` returns them.
        path: the file to write (its folder must exist).
        metadata: extra string metadata for the file's header (other values are written as JSON).
        dtype: the tensors' dtype in the file.

    Returns:
        `path`.

    Raises:
        OutOfSpaceError: the disk is full (the file is not left half-written).

    Example:
        >>> import artaug_ext
        >>> layers, _ = artaug_ext.combine_loras(["a.safetensors"])  # doctest: +SKIP
        >>> artaug_ext.save_kohya(layers, "a_kohya.safetensors")  # doctest: +SKIP
        'a_kohya.safetensors'
    """
    from ..files import save_safetensors

    ranks = sorted({layer.rank for layer in layers.values()})
    meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(max(ranks) if ranks else 0),
            "ss_network_alpha": str(max(ranks) if ranks else 0), "artaug_ranks": json.dumps(ranks)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    return save_safetensors(kohya_state_dict(layers, dtype), path, meta)
