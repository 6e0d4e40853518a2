"""Run in a fresh process by tests/test_memory_plan.py: a FLUX-width stand-in DiT (FLUX.1-dev's
widths, one joint and one single block, bf16) merged and trained the way the runner does, on
the CPU; prints its shapes and the peak RSS growth beyond its own weights as JSON."""

import json
import os
import sys
import tempfile

import peft  # noqa: F401
import torch

import artaug_ext.train.differential as differential  # noqa: F401  (every import before the baseline)
from artaug_ext.lora import load_lora
from artaug_ext.tiny.models import TinyFluxDiT
from artaug_ext.train.cache import LatentCache
from artaug_ext.train.settings import LoRATrainSettings


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main(out_dir: str, rank: int, px: int, text_tokens: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    with torch.device("meta"):
        dit = TinyFluxDiT(dim=3072, num_heads=24, num_joint_blocks=1, num_single_blocks=1, axes_dim=(16, 56, 56),
                          input_dim=64, text_dim=4096, pooled_dim=768)
    dit = dit.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.02)
    dit.requires_grad_(False)
    shapes = {n: list(p.shape) for n, p in dit.named_parameters()}
    side = px // 8
    cache = LatentCache(["p0"], torch.randn(1, 16, side, side), torch.randn(1, 16, side, side),
                        torch.randn(1, text_tokens, 4096), torch.randn(1, 768))
    running_base = {}  # a round LoRA merged into the running base, as round 2 of a run has
    for name, m in dit.named_modules():
        if isinstance(m, torch.nn.Linear) and (name.startswith("blocks.") or name.startswith("single_blocks.")):
            running_base[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features) * 0.01
            running_base[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank) * 0.01
    settings = LoRATrainSettings(rank=rank, lr=1e-4, steps_stage1=2, steps_stage2=2, batch_size=1)
    import gc

    gc.collect()
    baseline = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
        f.write("5")
    load_lora(dit, running_base, undo=False)
    differential.train_round_lora(dit, cache, settings, out_dir, progress=False)
    peak = rss("VmHWM")
    json.dump({"baseline": baseline, "peak": peak, "growth": peak - baseline, "shapes": shapes}, sys.stdout)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(os.path.join(tmp, "round"), int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
