"""LoRA adapters on FLUX DiT linears through PEFT (as DiffSynth's trainer injects them),
removable, in fp32, and exported so that `load_lora` merges exactly what was trained."""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..errors import UsageError
from .settings import FLUX_LORA_TARGETS

ADAPTER = "default"  # PEFT's adapter name: in-memory state keys carry it (".lora_A.default.weight")
# Metadata of our training-format files (DiffSynth's module names, alpha / rank folded into lora_B).
TRAINING_FORMAT = "artaug-diffsynth-lora-v1"


def unwrap_denoiser(model: torch.nn.Module) -> torch.nn.Module:
    """The DiT inside the wrappers training puts around it (DDP's `.module`, FluxDenoiser's `.dit`)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "dit") and isinstance(model.dit, torch.nn.Module):
            model = model.dit
        else:
            return model


def _targets(model: torch.nn.Module, target_modules) -> dict[str, torch.nn.Linear]:
    suffixes = tuple(target_modules)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == s or n.endswith("." + s) for s in suffixes)}


def lora_target_layers(model: torch.nn.Module, rank: int, target_modules=FLUX_LORA_TARGETS) -> dict[str, torch.nn.Linear]:
    """The layers a LoRA of `rank` would adapt; an error naming the layer and the fix if the rank
    is not positive, larger than a layer, or no layer matches the targets."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise UsageError(f"LoRA rank {rank!r} must be a positive integer")
    targets = _targets(model, target_modules)
    if not targets:
        raise UsageError(f"no linear layer of the model matches the LoRA targets {list(target_modules)}")
    for name, layer in targets.items():
        if rank > min(layer.in_features, layer.out_features):
            raise UsageError(f"LoRA rank {rank} exceeds layer {name} ({layer.in_features} in, {layer.out_features} "
                             f"out); use a rank <= {min(layer.in_features, layer.out_features)} or drop that target")
    return targets


def inject_lora(model: torch.nn.Module, rank: int, alpha: float | None = None,
                target_modules=FLUX_LORA_TARGETS, init_seed: int | None = None) -> list[str]:
    """Add LoRA adapters (PEFT `inject_adapter_in_model`), freeze everything else, keep the
    adapters in fp32 whatever the base's dtype (as diffusers' `cast_training_params` does:
    bf16 master weights lose small updates, fp16 ones cannot be unscaled). `init_seed` makes
    the random init of lora_A the same on every process and run. Returns the adapted layers."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_target_layers(model, rank, target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(target_modules))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # On a torchao-quantised base PEFT makes TorchaoLoraLinear layers and warns that they
        # cannot merge(); we never merge PEFT layers (the trained factors are exported).
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        if init_seed is not None:
            torch.manual_seed(init_seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora and p.dtype != torch.float32:
            p.data = p.data.float()
    return sorted(targets)


def lora_layers_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers of a model, by name relative to the DiT."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in unwrap_denoiser(model).named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The model without its LoRA adapters for the block (the base they train on top of: a
    DPO reference, a paired gap before training); on again after. PEFT's flag that its
    forward reads, set directly: `enable_adapters` would also flip the adapters'
    requires_grad, under DDP in the middle of a step whose gradients it synchronises."""
    layers = list(lora_layers_of(model).values())
    if any(not isinstance(getattr(layer, "_disable_adapters", None), bool) for layer in layers):
        raise UsageError("this PEFT version's LoRA layers have no _disable_adapters flag; install a peft of the "
                         "0.1x-0.2x series (tested: 0.22)")
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before, strict=True):
            layer._disable_adapters = state


def remove_lora(model: torch.nn.Module) -> int:
    """Take the adapters out again: every PEFT LoRA layer is replaced by the linear it wraps,
    so the module tree (and its state dict) is the base's again. Returns how many."""
    dit = unwrap_denoiser(model)
    layers = lora_layers_of(dit)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = dit.get_submodule(parent_name) if parent_name else dit
        setattr(parent, child, layer.get_base_layer())
    if "peft_config" in dit.__dict__:  # inject_adapter_in_model's record of the adapter
        del dit.peft_config
    return len(layers)


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters with PEFT's keys (`blocks.0.attn.a_to_qkv.lora_A.default.weight`), keys
    relative to the DiT (whatever wraps it), fp32, with each layer's alpha / rank folded into
    lora_B, so a loader that applies B @ A with scale 1 merges exactly the update that was
    trained. `save_lora` writes them without the adapter name."""
    out = {}
    for name, layer in lora_layers_of(model).items():
        if ADAPTER not in layer.lora_A:
            continue
        scale = float(layer.scaling[ADAPTER])
        out[f"{name}.lora_A.{ADAPTER}.weight"] = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
        out[f"{name}.lora_B.{ADAPTER}.weight"] = (layer.lora_B[ADAPTER].weight.detach().float().cpu() * scale).contiguous()
    if not out:
        raise UsageError("the model has no LoRA adapters to export")
    return out


def _without_adapter_name(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`...lora_A.default.weight` -> `...lora_A.weight`. DiffSynth's FLUX loader
    (FluxLoRALoader, diffsynth 2.1.12) fuses only keys ending in `.lora_A.weight` /
    `.lora_B.weight` and skips the others without an error ("0 tensors are fused")."""
    out = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.{ADAPTER}.weight", f".{part}.weight")
        out[key] = value
    return out


def save_lora(state: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> str:
    """Write a training-format LoRA atomically (safetensors with our format marker), keyed as
    DiffSynth's `pipe.load_lora` fuses them: no adapter name in the keys, and no alpha tensors,
    since that loader ignores alpha on DiffSynth-named keys (the scale belongs in lora_B)."""
    from ..files import save_safetensors

    alphas = [k for k in state if k.endswith(".alpha")]
    if alphas:
        raise UsageError(f"{len(alphas)} alpha tensors (e.g. {alphas[0]!r}): fold alpha / rank into lora_B first, "
                         "as lora_state_dict does")
    return save_safetensors(_without_adapter_name(state), path,
                            {"format": TRAINING_FORMAT, "alpha_folded": "true", **(metadata or {})})
