"""The training loop: batches, gradient accumulation, mixed precision, LR schedule,
checkpoints with `accelerator.save_state`, and exact resume.

Everything random the loop owns (data order, timesteps, noise) is a function of the seed
and the step, or comes from a generator saved in the checkpoint, so a run killed and
resumed ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

logger = logging.getLogger(__name__)

CKPT_PREFIX = "checkpoint-"
DONE_FILE = "artaug_step.json"


@dataclass
class TrainConfig:
    output_dir: str
    steps: int
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.05
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or no | bf16 | fp16
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    log_every: int = 50
    time_budget_s: float | None = None  # stop (with a checkpoint) after this long
    progress: bool = True
    resume: bool = True


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    finished: bool = False
    seconds: float = 0.0


class _LoopState:
    """What the loop itself must carry across a restart: the step and its generator.

    Each process has its own generator (seeded seed + rank), but accelerate writes custom
    state from the main process only; so with several processes the state holds every
    rank's generator (gathered while saving; every process calls `state_dict`), and each
    rank takes its own back on resume. Without that every rank resumed with rank 0's
    timesteps and noise."""

    def __init__(self, seed: int, process_index: int = 0, num_processes: int = 1):
        self.step = 0
        self.process_index, self.num_processes = process_index, num_processes
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self):
        state = {"step": self.step, "generator": self.generator.get_state()}
        if self.num_processes > 1:
            import torch.distributed as dist

            generators = [None] * self.num_processes
            dist.all_gather_object(generators, state["generator"])
            state["generators"] = generators
        return state

    def load_state_dict(self, state):
        self.step = int(state["step"])
        generators = state.get("generators") or [state["generator"]]
        if len(generators) == self.num_processes:
            self.generator.set_state(generators[self.process_index])
        elif self.process_index == 0:
            self.generator.set_state(state["generator"])
        else:  # a different number of processes than the checkpoint's: keep this rank's fresh stream
            logger.warning("resuming on %d processes from a checkpoint of %d: rank %d's noise differs from an "
                           "uninterrupted run", self.num_processes, len(generators), self.process_index)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
        if cfg.schedule == "linear":
            decay = 1.0 - progress
        elif cfg.schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown schedule {cfg.schedule!r}")
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return fn


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint folder (complete = its step file was written)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(CKPT_PREFIX) and os.path.isfile(os.path.join(path, DONE_FILE)):
            try:
                found.append((int(name[len(CKPT_PREFIX):]), path))
            except ValueError:
                continue
    return max(found)[1] if found else None


class _Order:
    """Deterministic sample order: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, self.n)
            if epoch not in self._cache:
                self._cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + epoch))}
            out.append(int(self._cache[epoch][i]))
        return out


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() else "no"


def make_accelerator(cfg: TrainConfig, cpu: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision="no" if cpu else _mixed_precision(cfg), cpu=cpu,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, automatic_checkpoint_naming=False),
    )


def _save_checkpoint(accelerator, cfg: TrainConfig, state: _LoopState) -> str:
    """save_state into a temporary folder, then rename: a kill never leaves half a checkpoint."""
    final = os.path.join(cfg.output_dir, f"{CKPT_PREFIX}{state.step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, DONE_FILE), "w", encoding="utf-8") as f:
            json.dump({"step": state.step, "config": asdict(cfg)}, f, default=str)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(
            (int(n[len(CKPT_PREFIX):]), n) for n in os.listdir(cfg.output_dir)
            if n.startswith(CKPT_PREFIX) and n[len(CKPT_PREFIX):].isdigit()
        )
        for _, name in kept[:-cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(cfg.output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _agree_with_main_process(accelerator, cfg: TrainConfig, out_of_time: bool) -> bool:
    """Every rank takes the main process's step count and time-budget verdict.

    on_step hooks run on the main process only (one may refit cfg.steps) and each rank reads
    its own clock; ranks that disagreed on when to stop would hang in the next collective.
    """
    from accelerate.utils import broadcast

    decision = torch.tensor([cfg.steps, int(out_of_time)], dtype=torch.int64, device=accelerator.device)
    decision = broadcast(decision, from_process=0)
    cfg.steps = int(decision[0])
    return bool(decision[1])


def train(model: torch.nn.Module, loss_fn: Callable, get_batch: Callable[[list[int]], dict], dataset_size: int,
          cfg: TrainConfig, accelerator=None, on_step: Callable | None = None) -> TrainResult:
    """Train `model`'s trainable parameters for `cfg.steps` optimizer steps.

    loss_fn(model, batch, generator) -> scalar loss; get_batch(indices) -> batch dict (on
    any device; moved here). `on_step(step, loss)` is called after each optimizer step on
    the main process; a step count it sets in `cfg.steps` reaches every rank. Resumes from
    the newest checkpoint in `cfg.output_dir` if any.
    """
    from tqdm import tqdm

    os.makedirs(cfg.output_dir, exist_ok=True)
    accelerator = accelerator or make_accelerator(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    state = _LoopState(cfg.seed + accelerator.process_index, accelerator.process_index, accelerator.num_processes)
    # Registered, not prepared: accelerate's scheduler wrapper steps once per process.
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(state)

    ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if ckpt:
        accelerator.load_state(ckpt)
        logger.info("resumed from %s at step %d", ckpt, state.step)

    order = _Order(dataset_size, cfg.seed)
    world = accelerator.num_processes
    per_step = cfg.batch_size * cfg.grad_accum * world
    result = TrainResult(step=state.step)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", disable=not (cfg.progress and accelerator.is_main_process),
               dynamic_ncols=True)
    model.train()
    running = None
    last_saved = state.step
    while state.step < cfg.steps:
        total = 0.0
        for micro in range(cfg.grad_accum):
            start = state.step * per_step + (micro * world + accelerator.process_index) * cfg.batch_size
            batch = get_batch(order.indices(start, cfg.batch_size))
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            sync = micro == cfg.grad_accum - 1
            ctx = accelerator.no_sync(model) if not sync and world > 1 else _null()
            with ctx:
                with accelerator.autocast():
                    loss = loss_fn(model, batch, state.generator)
                accelerator.backward(loss / cfg.grad_accum)
            total += float(loss.detach()) / cfg.grad_accum
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        result.losses.append(total)
        running = total if running is None else 0.98 * running + 0.02 * total
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if accelerator.is_main_process:
            if cfg.log_every and state.step % cfg.log_every == 0:
                logger.info("step %d loss %.5f (avg %.5f) lr %.3e", state.step, total, running, scheduler.get_last_lr()[0])
            if on_step is not None:
                on_step(state.step, total)
        out_of_time = cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s
        if world > 1:
            out_of_time = _agree_with_main_process(accelerator, cfg, out_of_time)
        if bar.total != cfg.steps:  # an on_step hook refitted the step count (time budget)
            bar.total = cfg.steps
            bar.refresh()
        if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or out_of_time:
            _save_checkpoint(accelerator, cfg, state)
            last_saved = state.step
        if out_of_time:
            logger.info("time budget of %.0fs spent at step %d", cfg.time_budget_s, state.step)
            break
    bar.close()
    if state.step >= cfg.steps and last_saved != state.step and cfg.checkpoint_every:
        _save_checkpoint(accelerator, cfg, state)
    result.step = state.step
    result.finished = state.step >= cfg.steps
    result.seconds = time.perf_counter() - t0
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
