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

With a quantised base (`[run] quantize`): the DiT's linear weights in the method's storage
(`QUANT_STORAGE`), the rest of the DiT in the dtype; LoRA_1 and the running base's round LoRAs
are hot-loaded (their fp32 factors on the device, no merge backup); DiffSynth reads the DiT in
the dtype on the host and quantises it a layer at a time onto the device (`host_load`). Text
encoders resident, quantised (their linears; the token embeddings stay) or offloaded (on the
host). The optimiser's state: AdamW 8 bytes a LoRA parameter, 8-bit AdamW 2 (+ its block
scales); an EMA adds an fp32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..flux_shapes import FluxShapes

GB = 1e9
FP32 = 4
GPU_DTYPE_BYTES = 2  # bf16: what load_pipeline loads in on CUDA (pipeline.default_dtype)
VAE_LIVE_MAPS = 4  # full-resolution feature maps alive at once in a VAE decoder block


# How DiffSynth's quantisation methods store a linear's weight, as their backends do by default:
# method -> (bytes an element, elements a scale block or None for one block a row, bytes a block).
# Read off the tensors torchao 0.18 and bitsandbytes 0.50 make on the CPU (int8: int8 data, an
# fp32 scale and an int8 zero point a row; fp8: fp8 data, an fp32 scale a row; nf4/fp4: packed
# 4-bit data, a uint8 absmax a block of 64 (nested statistics)); the int4 and microscaling rows
# from torchao's formats (a group of 128 with a bf16 scale and zero; a block of 32 or 16 with an
# 8-bit scale). A method not listed (DiffSynth's entropack codecs) has no figure: the plan says so.
QUANT_STORAGE = {
    "torchao_int8_w8a16": (1.0, None, 5), "torchao_int8_w8a8": (1.0, None, 5),
    "torchao_fp8_w8a16": (1.0, None, 4), "torchao_fp8_w8a8": (1.0, None, 4),
    "comfy_kitchen_int8_w8a8": (1.0, None, 4), "comfy_kitchen_fp8_w8a8": (1.0, None, 4),
    "torchao_int4_w4a16": (0.5, 128, 4), "torchao_int4_w4a8": (0.5, 128, 4),
    "bitsandbytes_nf4": (0.5, 64, 1), "bitsandbytes_fp4": (0.5, 64, 1),
    "torchao_mxfp8_w8a8": (1.0, 32, 1), "torchao_mxfp4_w4a4": (0.5, 32, 1),
    "torchao_nvfp4_w4a4": (0.5, 16, 1), "torchao_nvfp4_w4a16": (0.5, 16, 1),
}
# Optimiser state bytes a trainable parameter (both moments): AdamW in fp32; bitsandbytes' 8-bit
# AdamW one byte a moment plus an fp32 absmax a block of 256 for each.
OPTIMIZER_STATE_BYTES = {"adamw": 2 * FP32, "adamw8bit": 2 * (1 + FP32 / 256)}
CARDS_GIB = (24, 48, 80)  # the card sizes the plan says a recipe fits
# Kept free on a card for the CUDA context and the caching allocator's fragmentation (our
# assumption, not a measurement: the context alone is about 0.5 GB on an H100).
CARD_RESERVE = 1.5 * GB


class UnknownStorage(ValueError):
    """A quantisation method without a storage figure in QUANT_STORAGE."""


def quantized_bytes(weights: dict[str, tuple[int, int]], method: str) -> int:
    """Bytes the linears `weights` take in a method's storage."""
    if method not in QUANT_STORAGE:
        raise UnknownStorage(method)
    element, block, per_block = QUANT_STORAGE[method]
    total = 0.0
    for n_out, n_in in weights.values():
        blocks = n_out if block is None else -(-n_out * n_in // block)
        total += n_out * n_in * element + blocks * per_block
    return int(total)


def fits(gpu_bytes: int) -> str:
    """Which card sizes a process of `gpu_bytes` fits, with CARD_RESERVE kept free."""
    ok = [f"{gib} GB" for gib in CARDS_GIB if gpu_bytes + CARD_RESERVE <= gib * 2**30]
    return (f"fits {', '.join(ok)} cards" if ok else f"fits none of the {'/'.join(map(str, CARDS_GIB))} GB cards") + \
        f" (with {CARD_RESERVE / GB:.1f} GB kept for the CUDA context)"


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
    host_load: int = 0  # while loading: a quantised DiT is read in the dtype on the host first


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


def _generation_activations(s: FluxShapes, tokens: int, text_tokens: int, pixels: int, dtype_bytes: int) -> int:
    """Bytes alive at once when generating one image of `pixels` pixels: a single block's
    temporaries, or a VAE block's."""
    n = tokens + text_tokens
    dit = n * (2 * s.dim + 3 * s.dim + s.mlp + s.dim + s.mlp) * dtype_bytes  # hidden, qkv+mlp in, attention, mlp out
    vae = VAE_LIVE_MAPS * s.vae_width * pixels * dtype_bytes
    return max(dit, vae)


def _text_encoder_bytes(shapes: FluxShapes, dtype_bytes: int, text_encoders: str, quantize: str | None) -> int:
    """Bytes the CLIP and T5 encoders take where they are held (on the device unless offloaded)."""
    params = shapes.clip_params + shapes.t5_params
    if text_encoders == "quantized":
        embeddings = shapes.clip_embedding_params + shapes.t5_embedding_params
        linear = params - embeddings  # their linears, counted as one block a row of a square-ish matrix
        element, block, per_block = QUANT_STORAGE[quantize]
        return int(linear * element + (linear / (block or shapes.text_dim)) * per_block + embeddings * dtype_bytes)
    return params * dtype_bytes


def memory_plan(shapes: FluxShapes, *, targets, rank: int, dtype_bytes: int, device: str, train_px: int,
                generate_px: int, text_tokens: int, batch_size: int, gradient_checkpointing: bool, pairs: int,
                world: int = 1, running_base_backups: int = 0, quantize: str | None = None,
                text_encoders: str = "resident", optimizer: str = "adamw", ema: bool = False,
                hot_loaded_round_loras: int = 0, train_pixels: int | None = None,
                generate_pixels: int | None = None) -> MemoryPlan:
    """The per-process memory of a round: generation (the interaction loop) and training
    (stage 2, where LoRA_1 is merged, or hot-loaded on a quantised base: the peak). `device` is
    "cuda" or "cpu"; `train_px` and `generate_px` are image sides (16 px a token side);
    `train_pixels` and `generate_pixels`, when given, the largest image's pixel count instead
    (W x H: aspect-ratio buckets, `artaug_ext.buckets`); `hot_loaded_round_loras`: the running
    base's round LoRAs (hot-loaded on a quantised base)."""
    weights = shapes.linear_weights(targets)
    touched = [n_out * n_in * dtype_bytes for n_out, n_in in weights.values()]
    on_gpu = device == "cuda"
    n_lora = lora_parameters(weights, rank)
    if quantize:  # LoRA_1 is hot-loaded: its factors on the device, no backup of merged weights
        backup = 0
        linears = shapes.all_linear_weights()
        dense = sum(n_out * n_in for n_out, n_in in linears.values())
        dit = quantized_bytes(linears, quantize) + (shapes.dit_params() - dense) * dtype_bytes
    else:
        backup = sum(pinned_bytes(b) for b in touched) if on_gpu else sum(touched)
        dit = shapes.dit_params() * dtype_bytes
    text = _text_encoder_bytes(shapes, dtype_bytes, text_encoders, quantize)
    offloaded = text if text_encoders == "offloaded" else 0
    all_weights = dit + text - offloaded + shapes.vae_params * dtype_bytes
    train_tokens = train_pixels // 256 if train_pixels else (train_px // 16) ** 2
    gen_tokens = generate_pixels // 256 if generate_pixels else (generate_px // 16) ** 2
    latent_cells = train_pixels // 64 if train_pixels else (train_px // 8) ** 2
    cache_pair = (2 * shapes.latent_channels * latent_cells + text_tokens * shapes.text_dim
                  + shapes.pooled_dim) * dtype_bytes
    parts = {
        "weights": all_weights,
        "DiT weights": dit,
        "touched weights": sum(touched),
        "LoRA_1 merge backup": backup,
        "running-base backups": running_base_backups * backup,
        "LoRA_1 factors (fp32, host)": n_lora * FP32,
        "latent cache (host)": pairs * cache_pair,
        "LoRA_2 training state": n_lora * (2 * FP32 + OPTIMIZER_STATE_BYTES[optimizer] + (FP32 if ema else 0)
                                           + (FP32 if world > 1 else 0)),
        "hot-loaded LoRAs (device)": (hot_loaded_round_loras + 1) * n_lora * FP32 if quantize else 0,
        "offloaded text encoders (host)": offloaded,
        "training activations": batch_size * _training_activations(shapes, train_tokens, text_tokens, dtype_bytes,
                                                                   gradient_checkpointing),
        "generation activations": _generation_activations(shapes, gen_tokens, text_tokens,
                                                          generate_pixels or generate_px * generate_px, dtype_bytes),
    }
    hot_train = parts["hot-loaded LoRAs (device)"]
    hot_gen = hot_loaded_round_loras * n_lora * FP32 if quantize else 0
    host_gen = parts["running-base backups"] + offloaded
    host_train = (parts["running-base backups"] + backup + parts["LoRA_1 factors (fp32, host)"]
                  + parts["latent cache (host)"] + offloaded)
    host_load = shapes.dit_params() * dtype_bytes + offloaded if quantize else 0
    dev_gen = parts["generation activations"] + hot_gen
    dev_train = parts["LoRA_2 training state"] + parts["training activations"] + hot_train
    if on_gpu:
        return MemoryPlan(host_gen, host_train, all_weights + dev_gen, all_weights + dev_train, parts, host_load)
    return MemoryPlan(host_gen + dev_gen, host_train + dev_train, 0, 0, parts, host_load)
