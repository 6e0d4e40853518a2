"""Memory a run holds per process, counted from what the code allocates (no torch; the dry run's).

Counted from a model's per-layer shapes (artaug_ext/flux_shapes.py), not fitted to a
measurement; tests/test_memory_plan.py compares the host term with the peak RSS of a
FLUX-width stand-in trained on the CPU.

- Weights: every component in the pipeline's dtype (DiT, both text encoders, VAE).
- The exact merge of LoRA_1 (stage 1 -> stage 2) keeps a host copy of every weight it
  touches for the bit-exact unmerge: on a GPU a pinned copy, which torch's caching host
  allocator rounds up to a power of two per tensor (and keeps cached for the next round);
  on the CPU a plain copy. The round LoRAs merged into the running base keep none
  (`running_base_backups` counts them for code that did).
- While LoRA_2 trains: LoRA_1's factors on the host (fp32), the latent cache on the host
  (the pipeline's dtype), and on the training device the LoRA in fp32 with its gradient and
  AdamW's two moments (16 bytes a parameter; DDP adds a 4-byte gradient bucket).
- Activations (an estimate of what autograd saves, counted per token): with gradient
  checkpointing each block keeps its input and one block at a time is recomputed; without,
  every block keeps its own. Generation keeps one block's temporaries and, when the image is
  decoded, a few full-resolution VAE feature maps.
On the CPU the training device is the host, so every term but the weights is host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..flux_shapes import FluxShapes

GB = 1e9
FP32 = 4
GPU_DTYPE_BYTES = 2  # bf16: what load_pipeline loads in on CUDA (pipeline.default_dtype)
VAE_LIVE_MAPS = 4  # full-resolution feature maps alive at once in a VAE decoder block


def pinned_bytes(nbytes: int) -> int:
    """What torch's caching host allocator takes for a pinned tensor: the next power of two."""
    return 1 << max(0, (nbytes - 1).bit_length()) if nbytes > 0 else 0


@dataclass
class MemoryPlan:
    """Bytes per process beyond the runtime (Python, torch, CUDA context); `parts` names each term."""

    host_generation: int
    host_training: int
    gpu_generation: int
    gpu_training: int
    parts: dict[str, int] = field(default_factory=dict)


def lora_parameters(weights: dict[str, tuple[int, int]], rank: int) -> int:
    """A rank-r LoRA on each weight [out, in]: A [r, in] and B [out, r]."""
    return sum(rank * (n_out + n_in) for n_out, n_in in weights.values())


def _training_activations(s: FluxShapes, tokens: int, text_tokens: int, dtype_bytes: int,
                          checkpointing: bool) -> int:
    """Bytes autograd saves for one sample of `tokens` image and `text_tokens` text tokens."""
    d, m = s.dim, s.mlp
    n = tokens + text_tokens  # both streams of a joint block, the joined sequence of a single block
    # Per token: norm in/out, modulated input, q/k/v before and after norm + RoPE, attention
    # output, residual, second norm; the MLP's input, its pre- and post-GELU activations; and
    # PEFT's fp32 copy of each adapted linear's input (qkv, out, ff.0, ff.2).
    joint = n * ((16 * d + 3 * m) * dtype_bytes + (3 * d + m) * FP32)
    single = n * ((10 * d + 3 * m) * dtype_bytes + (2 * d + m) * FP32)
    if not checkpointing:
        return s.joint_blocks * joint + s.single_blocks * single
    kept_inputs = (s.joint_blocks + s.single_blocks) * n * d * dtype_bytes
    return kept_inputs + max(joint, single)


def _generation_activations(s: FluxShapes, tokens: int, text_tokens: int, side_px: int, dtype_bytes: int) -> int:
    """Bytes alive at once when generating one image: a single block's temporaries, or a VAE block's."""
    n = tokens + text_tokens
    dit = n * (2 * s.dim + 3 * s.dim + s.mlp + s.dim + s.mlp) * dtype_bytes  # hidden, qkv+mlp in, attention, mlp out
    vae = VAE_LIVE_MAPS * s.vae_width * side_px * side_px * dtype_bytes
    return max(dit, vae)


def memory_plan(shapes: FluxShapes, *, targets, rank: int, dtype_bytes: int, device: str, train_px: int,
                generate_px: int, text_tokens: int, batch_size: int, gradient_checkpointing: bool, pairs: int,
                world: int = 1, running_base_backups: int = 0) -> MemoryPlan:
    """The per-process memory of a round: generation (the interaction loop) and training
    (stage 2, where LoRA_1 is merged: the peak). `device` is "cuda" or "cpu"; `train_px` and
    `generate_px` are image sides (16 px a token side)."""
    weights = shapes.linear_weights(targets)
    touched = [n_out * n_in * dtype_bytes for n_out, n_in in weights.values()]
    on_gpu = device == "cuda"
    backup = sum(pinned_bytes(b) for b in touched) if on_gpu else sum(touched)
    n_lora = lora_parameters(weights, rank)
    all_weights = shapes.all_params() * dtype_bytes
    train_tokens = (train_px // 16) ** 2
    gen_tokens = (generate_px // 16) ** 2
    cache_pair = (2 * shapes.latent_channels * (train_px // 8) ** 2 + text_tokens * shapes.text_dim
                  + shapes.pooled_dim) * dtype_bytes
    parts = {
        "weights": all_weights,
        "touched weights": sum(touched),
        "LoRA_1 merge backup": backup,
        "running-base backups": running_base_backups * backup,
        "LoRA_1 factors (fp32, host)": n_lora * FP32,
        "latent cache (host)": pairs * cache_pair,
        "LoRA_2 training state": n_lora * (4 * FP32 + (FP32 if world > 1 else 0)),
        "training activations": batch_size * _training_activations(shapes, train_tokens, text_tokens, dtype_bytes,
                                                                   gradient_checkpointing),
        "generation activations": _generation_activations(shapes, gen_tokens, text_tokens, generate_px, dtype_bytes),
    }
    host_gen = parts["running-base backups"]
    host_train = (parts["running-base backups"] + backup + parts["LoRA_1 factors (fp32, host)"]
                  + parts["latent cache (host)"])
    dev_gen = parts["generation activations"]
    dev_train = parts["LoRA_2 training state"] + parts["training activations"]
    if on_gpu:
        return MemoryPlan(host_gen, host_train, all_weights + dev_gen, all_weights + dev_train, parts)
    return MemoryPlan(host_gen + dev_gen, host_train + dev_train, 0, 0, parts)
