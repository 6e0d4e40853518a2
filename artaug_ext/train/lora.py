"""LoRA on FLUX DiT linears through PEFT, like DiffSynth's training module does."""

from __future__ import annotations

import torch

# DiffSynth's default FLUX LoRA targets (its FLUX training examples).
FLUX_LORA_TARGETS = ("a_to_qkv", "b_to_qkv", "ff_a.0", "ff_a.2", "ff_b.0", "ff_b.2", "a_to_out", "b_to_out",
                     "proj_out", "norm.linear", "norm1_a.linear", "norm1_b.linear", "to_qkv_mlp")


def inject_lora(model: torch.nn.Module, rank: int, alpha: float | None = None,
                target_modules=FLUX_LORA_TARGETS) -> torch.nn.Module:
    """Add LoRA adapters (PEFT `inject_adapter_in_model`) and freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(target_modules))
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, in DiffSynth's training-output key format."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
