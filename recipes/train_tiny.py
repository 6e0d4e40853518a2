"""Train the embedded `tiny` FLUX model on procedural scenes (CPU or CUDA).

Phases, each resumable (checkpoints under --work-dir; rerun the same command to continue):

1. render     scenes to uint8 arrays (memory-mapped .npy, written by worker processes)
2. vae        the small FLUX-layout VAE (8x down, 16 latent channels), reconstruction loss
              plus a latent-statistics term that keeps latents near zero mean, unit std
3. latents    encode the DiT's scenes once with the trained VAE, captions once with the
              frozen tiny text encoders (the pipeline's own prompt encoder, same tokenizers)
4. dit        flow matching with artaug_ext.train on the cached latents, EMA of the weights
5. export     fp16 safetensors in FLUX.1-dev's layout into --export (the package assets)

    python recipes/train_tiny.py --device cuda --export artaug_ext/assets/tiny
    python recipes/train_tiny.py --micro            # seconds: a smoke run of every phase

The shipped `tiny-v2` weights: VAE, CLIP and a first DiT from one H100 (about 6.5 minutes):

    python recipes/train_tiny.py --device cuda --workers 16 --export artaug_ext/assets/tiny \
        --vae-time 120 --dit-time 240 --vae-batch 64 --dit-batch 128 --vae-steps 20000 --dit-steps 20000

(VAE 1730 steps x 64 at 128 px, held-out PSNR 30.5 dB at 128 / 28.8 dB at 256; DiT 3345 steps
x 128 at 256 px), then that DiT fine-tuned on 2 CPU cores for the T5 with its neighbour bias
(the H100 run used the bag-of-words T5; a fresh run now trains with the neighbour T5 directly):

    python recipes/train_tiny.py --finetune-dit --device cpu --workers 2 --work-dir /tmp/ft_dit \
        --dit-scenes 7000 --size 256 --dit-batch 32 --dit-lr 3e-4 --dit-steps 5000 --dit-time 4200 \
        --ema 0.995 --export artaug_ext/assets/tiny

(7000 scenes encoded in 19 minutes, txt_in refit MSE 0.246 -> 0.047, 1445 steps x 32 in 67
minutes, loss 0.106 -> 0.037; eval-tiny on 64 held-out prompts: object colour 62.5 -> 95.3%,
background 68.8 -> 93.8%, shape 75 -> 96.9%, colour swaps 25 -> 0%.)

With --vae-time/--dit-time the step count is fitted to the budget after 30
steps, so the cosine schedule still ends decayed. On 2 CPU cores use the same command with
--device cpu and smaller --dit-scenes/--vae-scenes/batches: it runs, but an hour of CPU is
about 2% of the H100 run's samples, so expect a weaker model.

--finetune-decoder fine-tunes only the shipped VAE decoder (encoder and DiT untouched). Tried
for 177 steps x 8 on 2 busy CPU cores: PSNR 31.1 -> 29.7 dB at 128, 28.8 -> 29.3 dB at 256,
eval-tiny unchanged within noise, so the shipped decoder is still the H100 one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import torch

from artaug_ext import scenes
from artaug_ext.pipeline import t5_sequence_length
from artaug_ext.tiny import layout
from artaug_ext.tiny.models import TinyFluxDiT, TinyFluxVAEDecoder, TinyFluxVAEEncoder
from artaug_ext.tiny.spec import SPECS
from artaug_ext.tiny.trained import export_model_files
from artaug_ext.train import FlowMatchObjective, FluxDenoiser, TrainConfig, TrainSettings, train
from artaug_ext.train.loop import DONE_FILE, TrainResult, latest_checkpoint, make_accelerator

logger = logging.getLogger("train_tiny")

VAE_SEED_BASE = 1_000_000  # VAE scenes: seeds 1e6.., DiT scenes: 0.., held-out PSNR: 9e6..
PSNR_SEED_BASE = 9_000_000


# ---------------------------------------------------------------------------------- render

def _render_chunk(args):
    path, start, stop, seed_base, size = args
    arr = np.load(path, mmap_mode="r+")
    captions = []
    for i in range(start, stop):
        scene = scenes.random_scene(seed_base + i, held_out=False)
        arr[i] = scenes.render(scene, size)
        captions.append(scene.caption)
    arr.flush()
    return start, captions


def render_dataset(work: str, name: str, n: int, size: int, seed_base: int, workers: int):
    """Images [n, size, size, 3] uint8 (memory-mapped) and captions; cached in `work`."""
    path = os.path.join(work, f"{name}_{size}.npy")
    cap_path = path + ".captions.json"
    if os.path.isfile(cap_path):
        with open(cap_path, encoding="utf-8") as f:
            captions = json.load(f)
        if len(captions) == n:
            return np.load(path, mmap_mode="r"), captions
    t0 = time.perf_counter()
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
    chunk = max(64, n // (workers * 8) + 1)
    jobs = [(path, s, min(s + chunk, n), seed_base, size) for s in range(0, n, chunk)]
    captions = [None] * n
    from tqdm import tqdm

    with mp.get_context("fork").Pool(workers) as pool:
        for start, caps in tqdm(pool.imap_unordered(_render_chunk, jobs), total=len(jobs), desc=f"render {name}"):
            captions[start:start + len(caps)] = caps
    tmp = cap_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(captions, f)
    os.replace(tmp, cap_path)  # written last: marks the images complete
    logger.info("rendered %d %s scenes at %d in %.1fs", n, name, size, time.perf_counter() - t0)
    return np.load(path, mmap_mode="r"), captions


def to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] in [-1, 1], the pipeline's VAE input range."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------- VAE

class VAEPair(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.encoder = TinyFluxVAEEncoder(channels=tuple(channels))
        self.decoder = TinyFluxVAEDecoder(channels=tuple(channels))


def vae_loss(model, batch, rng, latent_noise: float = 0.1):
    x = to_pixels(batch["images"])
    z = model.encoder(x)
    noise = rng.randn(*z.shape[1:]).to(z.device, z.dtype)
    y = model.decoder(z + latent_noise * noise)  # robust to the DiT's imperfect latents
    rec = (y.float() - x).abs().mean() + ((y.float() - x) ** 2).mean()
    zf = z.float()
    mean, std = zf.mean(dim=(0, 2, 3)), zf.std(dim=(0, 2, 3))
    stats = (mean ** 2).mean() + ((std - 1) ** 2).mean()
    return rec + 0.01 * stats


@torch.no_grad()
def psnr(encoder, decoder, images: np.ndarray, device, batch: int = 32) -> float:
    vals = []
    for s in range(0, len(images), batch):
        x = to_pixels(torch.from_numpy(np.array(images[s:s + batch])).to(device))
        y = decoder(encoder(x)).clamp(-1, 1)
        a = ((x + 1) * 127.5).round()
        b = ((y.float() + 1) * 127.5).round()
        mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-6)
        vals.append(10 * torch.log10(255.0 ** 2 / mse))
    return float(torch.cat(vals).mean())


# -------------------------------------------------------------------------------- latents

@torch.no_grad()
def encode_images(encoder, images: np.ndarray, device, batch: int = 64) -> torch.Tensor:
    from tqdm import tqdm

    out = []
    for s in tqdm(range(0, len(images), batch), desc="encode latents"):
        x = to_pixels(torch.from_numpy(np.array(images[s:s + batch])).to(device))
        out.append(encoder(x).to("cpu", torch.float16))
    return torch.cat(out)


@torch.no_grad()
def encode_captions(pipe, captions: list[str], t5_len: int, batch: int = 256):
    """The pipeline's own prompt encoder (same tokenizers, padding and pooling as inference)."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_PromptEmbedder
    from tqdm import tqdm

    unit = FluxImageUnit_PromptEmbedder()
    embs, pooled = [], []
    for s in tqdm(range(0, len(captions), batch), desc="encode captions"):
        e, p, _ = unit.encode_prompt(pipe.tokenizer_1, pipe.tokenizer_2, pipe.text_encoder_1, pipe.text_encoder_2,
                                     captions[s:s + batch], device=pipe.device, t5_sequence_length=t5_len)
        embs.append(e.to("cpu", torch.float16))
        pooled.append(p.to("cpu", torch.float16))
    return torch.cat(embs), torch.cat(pooled)


def load_text_pipeline(base_model: str, model_dir: str, device: str):
    """The frozen text encoders and tokenizers, loaded through DiffSynth like at inference.

    Their weights are rounded to fp16 first, as they ship, so training sees the exact
    embeddings the shipped model will compute.
    """
    from artaug_ext.pipeline import load_pipeline

    pipe = load_pipeline(base_model, model_dir=model_dir, device=device, torch_dtype=torch.float32)
    for enc in (pipe.text_encoder_1, pipe.text_encoder_2):
        for p in enc.parameters():
            p.data = p.data.half().float()
    return pipe


# ------------------------------------------------------------------------------------ main

def _recorded_steps(output_dir: str, probe: int) -> int | None:
    """cfg.steps as recorded by the newest checkpoint, if it was saved after the probe."""
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        return None
    with open(os.path.join(ckpt, DONE_FILE), encoding="utf-8") as f:
        record = json.load(f)
    return int(record["config"]["steps"]) if int(record["step"]) >= probe else None


def fit_steps_to_budget(cfg: TrainConfig, budget: float | None, max_steps: int, probe: int = 30):
    """An on_step hook: after `probe` steps, shrink cfg.steps to what fits the time budget.

    Runs inside the warmup, so the LR schedule (which reads cfg.steps) stays smooth and a
    time-limited run still ends with a decayed LR. A resumed run whose checkpoint is past the
    probe keeps the step count recorded with that checkpoint: fitting again from the
    command's max_steps would stretch the LR schedule mid-run and train a finished phase for
    another whole budget.
    """
    t0 = [None]
    pinned = _recorded_steps(cfg.output_dir, probe) if budget is not None else None
    if pinned is not None:
        cfg.steps = pinned
        logger.info("resuming %s: keeping the %d steps fitted to the budget", cfg.output_dir, pinned)

    def hook(step: int):
        if budget is None or pinned is not None:
            return
        if step == 1:
            t0[0] = time.perf_counter()
        elif step == probe and t0[0] is not None:
            per_step = (time.perf_counter() - t0[0]) / (probe - 1)
            cfg.steps = max(probe + 1, min(max_steps, int(budget / per_step * 0.97)))
            logger.info("%.3fs a step: %d steps fit the %.0fs budget", per_step, cfg.steps, budget)

    return hook


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="tiny-v2", help="architecture to train (artaug_ext.tiny.spec)")
    p.add_argument("--base-model", default="tiny-random", help="model whose frozen text encoders and tokenizers to use")
    p.add_argument("--work-dir", default="/tmp/artaug_tiny_train", help="data caches and checkpoints")
    p.add_argument("--export", default=None, help="write the trained fp16 model files here (e.g. artaug_ext/assets/tiny)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vae-scenes", type=int, default=20000)
    p.add_argument("--vae-size", type=int, default=128)
    p.add_argument("--vae-steps", type=int, default=6000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-time", type=float, default=None, help="seconds: stop the VAE phase early")
    p.add_argument("--dit-scenes", type=int, default=40000)
    p.add_argument("--size", type=int, default=256, help="DiT training resolution (pixels)")
    p.add_argument("--dit-steps", type=int, default=8000)
    p.add_argument("--dit-batch", type=int, default=128)
    p.add_argument("--dit-lr", type=float, default=5e-4)
    p.add_argument("--dit-time", type=float, default=None, help="seconds: stop the DiT phase early")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--export-every", type=int, default=1000, help="DiT steps between exports (a cut run still ships)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--micro", action="store_true", help="a seconds-long smoke run of every phase")
    p.add_argument("--finetune-dit", action="store_true",
                   help="fine-tune the shipped DiT for the word-order-keeping T5 (--dit-* options; CPU-sized)")
    p.add_argument("--t5-neighbour-bias", type=float, default=8.0,
                   help="relative-position bias of the T5's previous/next-token heads (--finetune-dit)")
    p.add_argument("--finetune-decoder", action="store_true",
                   help="only fine-tune the shipped model's VAE decoder (--vae-* options; CPU-sized)")
    args = p.parse_args(argv)
    if args.micro:
        args.vae_scenes, args.vae_steps, args.vae_batch = 64, 3, 4
        args.dit_scenes, args.dit_steps, args.dit_batch, args.size = 64, 3, 4, 128
        args.export_every, args.checkpoint_every = 2, 2
    return args


def shipped_vae(spec, device: str) -> VAEPair:
    """The shipped model's VAE (fp16 assets, computed in fp32), frozen."""
    from artaug_ext.tiny.converters import tiny_vae_decoder_converter, tiny_vae_encoder_converter
    from artaug_ext.tiny.trained import load_asset_state_dicts

    states = load_asset_state_dicts(spec.weights_from)
    vae = VAEPair(spec.vae["channels"])
    vae.encoder.load_state_dict({k: v.float() for k, v in tiny_vae_encoder_converter(states["vae"]).items()})
    vae.decoder.load_state_dict({k: v.float() for k, v in tiny_vae_decoder_converter(states["vae"]).items()})
    return vae.requires_grad_(False).eval().to(device)


def finetune_decoder(args, device: str) -> dict:
    """Fine-tune only the shipped VAE's decoder (the encoder, so the DiT's latent space, stays).

    Trains on 128-pixel crops of 256-pixel scenes: the decoder sees the edges of the default
    resolution at a quarter of the cost, which fits a CPU.
    """
    from artaug_ext.tiny.trained import asset_dir, load_asset_state_dicts

    spec = SPECS[args.spec]
    os.makedirs(args.work_dir, exist_ok=True)
    states = load_asset_state_dicts(spec.weights_from)
    vae = shipped_vae(spec, device)
    vae.decoder.requires_grad_(True)
    images, _ = render_dataset(args.work_dir, "decoder", args.vae_scenes, 256, VAE_SEED_BASE + 500_000, args.workers)
    n_eval = 4 if args.micro else 32
    held = {size: np.stack([scenes.render(scenes.random_scene(PSNR_SEED_BASE + i, held_out=None), size)
                            for i in range(n_eval)]) for size in (128, 256)}
    report = {"before": {s: psnr(vae.encoder, vae.decoder, held[s], device) for s in held}}
    logger.info("decoder PSNR before: %s", report["before"])

    def get(idx):
        crops = []
        for i in idx:  # a crop aligned to the 8-pixel latent grid, fixed per index
            y, x = 8 * ((i * 7919) % 17), 8 * ((i * 104729) % 17)
            crops.append(images[i, y:y + 128, x:x + 128])
        return {"images": torch.from_numpy(np.stack(crops))}

    def loss(model, batch, rng):
        x = to_pixels(batch["images"])
        with torch.no_grad():
            z = model.encoder(x)
        noise = rng.randn(*z.shape[1:]).to(z.device, z.dtype)
        y = model.decoder(z + 0.05 * noise)
        return (y.float() - x).abs().mean() + ((y.float() - x) ** 2).mean()

    cfg = TrainConfig(output_dir=os.path.join(args.work_dir, "decoder"), steps=args.vae_steps,
                      settings=TrainSettings(batch_size=args.vae_batch, lr=args.vae_lr,
                                             warmup_steps=min(50, args.vae_steps // 10), schedule="cosine",
                                             seed=args.seed, checkpoint_every=args.checkpoint_every),
                      betas=(0.9, 0.999), min_lr_ratio=0.05, time_budget_s=args.vae_time, log_every=50)
    fit = fit_steps_to_budget(cfg, args.vae_time, args.vae_steps)
    res = train(vae, loss, get, len(images), cfg, accelerator=make_accelerator(cfg, cpu=device == "cpu"),
                on_step=lambda step, _: fit(step))
    vae.eval()
    report["after"] = {s: psnr(vae.encoder, vae.decoder, held[s], device) for s in held}
    report["steps"] = res.step
    logger.info("decoder PSNR after %d steps: %s", res.step, report["after"])
    if args.export:
        states["vae"] = layout.vae_file_state_dict(vae.encoder, vae.decoder)
        export_model_files(states, asset_dir(spec.weights_from), args.export)
        logger.info("exported the model with the fine-tuned decoder to %s", args.export)
    return report


def cached_latents(args, spec, device: str):
    """Training scenes encoded once with the shipped VAE encoder (the DiT's latent space).

    Cached per scene count, size and VAE file hash, so a resumed or repeated fine-tune
    skips the encoding (on 2 CPU cores about 0.16 s an image at 256 pixels).
    """
    from artaug_ext.files import sha256_file
    from artaug_ext.tiny.trained import WEIGHT_FILES, asset_dir

    images, captions = render_dataset(args.work_dir, "dit", args.dit_scenes, args.size, 0, args.workers)
    vae_hash = sha256_file(os.path.join(asset_dir(spec.weights_from), WEIGHT_FILES["vae"]))[:12]
    path = os.path.join(args.work_dir, f"dit_latents_{args.size}_{args.dit_scenes}_{vae_hash}.pt")
    if not os.path.isfile(path):
        latents = encode_images(shipped_vae(spec, device).encoder, images, device)
        torch.save(latents, path + ".tmp")
        os.replace(path + ".tmp", path)
    return torch.load(path), captions


@torch.no_grad()
def refit_context_embedder(dit, old_emb: torch.Tensor, new_emb: torch.Tensor) -> dict:
    """Least-squares refit of the DiT's text input layer to a changed text encoder.

    Chooses the new `context_embedder` so that new embeddings map as close as a linear
    layer can to what the old ones produced, so fine-tuning starts from a DiT that still
    reads the words it knew and only has to learn what the new encoder adds.
    """
    layer = dit.context_embedder
    x_old = old_emb.reshape(-1, old_emb.shape[-1]).float()
    x_new = new_emb.reshape(-1, new_emb.shape[-1]).float()
    target = layer(x_old.to(layer.weight.device)).cpu()
    design = torch.cat([x_new, torch.ones(len(x_new), 1)], dim=1)
    solution = torch.linalg.lstsq(design.double(), target.double()).solution.float()
    before = float(((layer(x_new.to(layer.weight.device)).cpu() - target) ** 2).mean())
    layer.weight.copy_(solution[:-1].T)
    layer.bias.copy_(solution[-1])
    after = float(((layer(x_new.to(layer.weight.device)).cpu() - target) ** 2).mean())
    return {"mse_before": before, "mse_after": after, "target_var": float(target.var())}


def train_dit_with_ema(args, dit, data: dict, output_dir: str, device: str, warmup_cap: int, log_every: int,
                       export) -> TrainResult:
    """Flow matching on cached latents and caption embeddings, with an EMA of the weights.

    `data` holds latents, prompt_emb and pooled_prompt_emb on `device`; `export(ema)` runs
    every --export-every steps and at the end. The EMA is checkpointed with the run, so a
    resumed run keeps it. Shared by the from-scratch DiT phase and --finetune-dit.
    """
    ema = copy.deepcopy(dit).requires_grad_(False).to(device)
    denoiser = FluxDenoiser(dit, use_gradient_checkpointing=args.gradient_checkpointing)
    objective = FlowMatchObjective(weighting="uniform")
    cfg = TrainConfig(
        output_dir=output_dir, steps=args.dit_steps,
        settings=TrainSettings(batch_size=args.dit_batch, grad_accum=args.grad_accum, lr=args.dit_lr,
                               warmup_steps=min(warmup_cap, args.dit_steps // 10), schedule="cosine", seed=args.seed,
                               checkpoint_every=args.checkpoint_every),
        betas=(0.9, 0.999), min_lr_ratio=0.05, time_budget_s=args.dit_time, log_every=log_every,
    )
    accelerator = make_accelerator(cfg, cpu=device == "cpu")

    def loss_fn(model, batch, rng):
        return objective(model, batch["latents"].float(), batch["prompt_emb"].float(),
                         batch["pooled_prompt_emb"].float(), rng)

    def get_batch(idx):
        ix = torch.tensor(idx, device=device)
        return {k: v[ix] for k, v in data.items()}

    fit = fit_steps_to_budget(cfg, args.dit_time, args.dit_steps)

    def on_step(step, loss):
        fit(step)
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), dit.parameters(), strict=True):
                e.lerp_(p.detach().to(e.dtype), 1 - decay)
        if args.export_every and step % args.export_every == 0:
            export(ema)

    res = train(denoiser, loss_fn, get_batch, len(data["latents"]), cfg, accelerator=accelerator, on_step=on_step,
                extra_state={"ema": ema})
    export(ema)
    return res


def finetune_dit(args, device: str) -> dict:
    """Fine-tune the shipped DiT for a T5 that keeps word order (`attend_to_neighbours`).

    The shipped VAE and CLIP stay; the T5 gets its neighbour bias, the DiT's text input layer
    is refitted to it by least squares, then the whole DiT trains with flow matching on
    scenes encoded by the shipped VAE. Exports the model with the new T5 (CPU-sized: the
    shipped DiT already draws, so an hour of 2 cores is enough to teach it the bindings).
    """
    from artaug_ext.pipeline import load_pipeline
    from artaug_ext.tiny.trained import asset_dir, load_asset_state_dicts

    spec = SPECS[args.spec]
    os.makedirs(args.work_dir, exist_ok=True)
    latents, captions = cached_latents(args, spec, device)
    pipe = load_pipeline(spec.name, model_dir=os.path.join(args.work_dir, "models"), device=device,
                         torch_dtype=torch.float32)
    old_emb, _ = encode_captions(pipe, captions[:2000], t5_sequence_length(spec.name))
    pipe.text_encoder_2.attend_to_neighbours(args.t5_neighbour_bias)
    emb, pooled = encode_captions(pipe, captions, t5_sequence_length(spec.name))
    dit = pipe.dit.float().requires_grad_(True).train()
    report = {"context_refit": refit_context_embedder(dit, old_emb, emb[:2000])}
    logger.info("context embedder refit: %s", report["context_refit"])
    on_dev = {"latents": latents.to(device), "prompt_emb": emb.to(device), "pooled_prompt_emb": pooled.to(device)}
    states = load_asset_state_dicts(spec.weights_from) if args.export else None

    def export(ema):
        if not args.export:
            return
        states["dit"] = layout.dit_file_state_dict(ema)
        states["text_encoder_2"] = layout.t5_file_state_dict(pipe.text_encoder_2)
        export_model_files(states, asset_dir(spec.weights_from), args.export)
        logger.info("exported the fine-tuned model to %s", args.export)

    t0 = time.perf_counter()
    res = train_dit_with_ema(args, dit, on_dev, os.path.join(args.work_dir, "dit_finetune"), device, warmup_cap=50,
                             log_every=25, export=export)
    report["dit"] = {"steps": res.step, "seconds": round(time.perf_counter() - t0, 1),
                     "first_loss": float(np.mean(res.losses[:25])) if res.losses else None,
                     "final_loss": float(np.mean(res.losses[-25:])) if res.losses else None}
    logger.info("DiT fine-tune: %s", report["dit"])
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.finetune_decoder or args.finetune_dit:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("accelerate").setLevel(logging.WARNING)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        run = finetune_dit if args.finetune_dit else finetune_decoder
        print(json.dumps(run(args, device), default=str))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = SPECS[args.spec]
    os.makedirs(args.work_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    report = {"spec": spec.name, "device": device, "args": vars(args)}
    t_start = time.perf_counter()
    cpu = device == "cpu"

    # 1-2. VAE
    vae_images, _ = render_dataset(args.work_dir, "vae", args.vae_scenes, args.vae_size, VAE_SEED_BASE, args.workers)
    vae = VAEPair(spec.vae["channels"])
    vae_cfg = TrainConfig(
        output_dir=os.path.join(args.work_dir, "vae"), steps=args.vae_steps,
        settings=TrainSettings(batch_size=args.vae_batch, lr=args.vae_lr, warmup_steps=min(200, args.vae_steps // 10),
                               schedule="cosine", seed=args.seed, checkpoint_every=args.checkpoint_every),
        betas=(0.9, 0.999), min_lr_ratio=0.05, time_budget_s=args.vae_time, log_every=200,
    )
    get_vae = lambda idx: {"images": torch.from_numpy(np.stack([vae_images[i] for i in idx]))}  # noqa: E731
    t0 = time.perf_counter()
    vae_fit = fit_steps_to_budget(vae_cfg, args.vae_time, args.vae_steps)
    res = train(vae, vae_loss, get_vae, len(vae_images), vae_cfg, accelerator=make_accelerator(vae_cfg, cpu=cpu),
                on_step=lambda step, loss: vae_fit(step))
    report["vae"] = {"steps": res.step, "seconds": round(time.perf_counter() - t0, 1),
                     "final_loss": float(np.mean(res.losses[-50:])) if res.losses else None}
    vae = vae.to(device).eval()
    held = [scenes.render(scenes.random_scene(PSNR_SEED_BASE + i, held_out=None), 128) for i in range(64 if not args.micro else 4)]
    report["vae"]["psnr_128"] = psnr(vae.encoder, vae.decoder, np.stack(held), device)
    held256 = [scenes.render(scenes.random_scene(PSNR_SEED_BASE + i, held_out=None), 256) for i in range(32 if not args.micro else 2)]
    report["vae"]["psnr_256"] = psnr(vae.encoder, vae.decoder, np.stack(held256), device)
    logger.info("VAE: %s", report["vae"])

    # 3. cached latents and caption embeddings
    images, captions = render_dataset(args.work_dir, "dit", args.dit_scenes, args.size, 0, args.workers)
    # The T5 with its neighbour bias (what ships); the caption cache is keyed by that bias.
    text_pipe = load_text_pipeline(args.base_model, os.path.join(args.work_dir, "models"), device)
    text_pipe.text_encoder_2.attend_to_neighbours(args.t5_neighbour_bias)
    cache = os.path.join(args.work_dir, f"dit_cache_{args.size}_{res.step}_t5n{args.t5_neighbour_bias:g}.pt")
    if os.path.isfile(cache):
        data = torch.load(cache)
    else:
        emb, pooled = encode_captions(text_pipe, captions, t5_sequence_length(spec.name))
        data = {"latents": encode_images(vae.encoder, images, device), "prompt_emb": emb, "pooled_prompt_emb": pooled}
        torch.save(data, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    lat = data["latents"].float()
    report["latents"] = {"mean": float(lat.mean()), "std": float(lat.std()), "shape": list(lat.shape)}
    logger.info("latents: %s", report["latents"])
    on_dev = {k: v.to(device) for k, v in data.items()}

    # 4. DiT
    torch.manual_seed(args.seed)
    dit = TinyFluxDiT(**spec.dit)

    def export(ema):
        if not args.export:
            return
        base = os.path.join(args.work_dir, "models", SPECS[args.base_model].model_id)
        states = {
            "dit": layout.dit_file_state_dict(ema),
            "vae": layout.vae_file_state_dict(vae.encoder, vae.decoder),
            "text_encoder": layout.clip_file_state_dict(text_pipe.text_encoder_1),
            "text_encoder_2": layout.t5_file_state_dict(text_pipe.text_encoder_2),
        }
        export_model_files(states, base, args.export)
        logger.info("exported the model to %s", args.export)

    t0 = time.perf_counter()
    res = train_dit_with_ema(args, dit, on_dev, os.path.join(args.work_dir, "dit"), device, warmup_cap=300,
                             log_every=200, export=export)
    report["dit"] = {"steps": res.step, "seconds": round(time.perf_counter() - t0, 1),
                     "final_loss": float(np.mean(res.losses[-100:])) if res.losses else None,
                     "params_M": round(sum(p.numel() for p in dit.parameters()) / 1e6, 2)}
    logger.info("DiT: %s", report["dit"])
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(args.work_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, default=str))
    return 0 if math.isfinite(report["dit"]["final_loss"] or 0.0) else 1


if __name__ == "__main__":
    sys.exit(main())
