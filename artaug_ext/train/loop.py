"""The training loop: batches, gradient accumulation, mixed precision, LR schedule, small
checkpoints, exact resume, and a loss log.

Everything random is a function of the seed and of a sample's GLOBAL position in the run
(step x global batch + index), never of a per-rank generator: the data order is a seeded
permutation per epoch (samples of several sizes: seeded batches of one size each), and each
sample draws its timestep and noise from its own generator (`SampleRandom`). So one process
and two processes with the same global batch train the same weights, and a run killed and
resumed ends with the same weights as one that never stopped, by construction: a checkpoint
holds only the trainable parameters, the optimizer, the LR schedule (the fp16 loss scale, the
weights' EMA), never the frozen base model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..dist import process_info
from ..errors import UsageError
from ..files import append_line, atomic_write_json, first_difference, read_json, read_jsonl, writing
from .loss_log import LOSS_LOG
from .settings import SCHEDULES, TrainSettings

logger = logging.getLogger(__name__)

CKPT_PREFIX = "checkpoint-"
DONE_FILE = "artaug_step.json"  # written last into a checkpoint: marks it complete
CHECKPOINT_FORMAT = 4  # 3: the identity holds every training setting; 4: and what the caller trains on (depends_on)


@dataclass
class TrainConfig:
    """The loop's view of a training: its folder and step count, the settings it is optimised
    with (one `TrainSettings`, the recipe's defaults), and what only the loop knows."""

    output_dir: str
    steps: int
    settings: TrainSettings = field(default_factory=TrainSettings)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    min_lr_ratio: float = 0.05  # the floor of the cosine and linear schedules
    keep_checkpoints: int = 2
    log_every: int = 50
    time_budget_s: float | None = None  # stop (with a checkpoint) after this long
    progress: bool = True
    resume: bool = True
    # What the trained parameters depend on that the loop cannot see (a stage's images and the
    # base it trains on top of), JSON values: part of the identity, so a checkpoint made on other
    # data or another base is refused instead of resumed.
    depends_on: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """What a checkpoint must agree on to be resumed (the step count included: it shapes the LR schedule)."""
        own = {"steps": self.steps, "weight_decay": self.weight_decay, "betas": list(self.betas),
               "min_lr_ratio": self.min_lr_ratio, **self.settings.identity()}
        clash = sorted(set(own) & set(self.depends_on))
        if clash:
            raise UsageError(f"TrainConfig.depends_on key {clash[0]!r} is a training setting's name; name it otherwise")
        return {**own, **self.depends_on}


class ParameterEMA:
    """An exponential moving average of the trainable parameters, in fp32, updated after every
    optimizer step: ema = decay * ema + (1 - decay) * param. No warm-up and no bias correction:
    it starts from the parameters' values before the first step (a fresh LoRA: lora_B zero),
    so after n steps the start still weighs decay**n (with decay 0.99, 37% after 100 steps:
    choose the decay for the stage's step count). Every rank keeps one (DDP: the same
    parameters, so the same average; each rank merges the LoRA it returns); the main process
    checkpoints it, every rank restores it."""

    EXTRA_STATE = "ema"  # its name among the loop's checkpointed extra state

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        if not 0 < decay < 1:
            raise UsageError(f"EMA decay {decay!r} must be between 0 and 1 (exclusive)")
        self.decay = decay
        self.params = dict(params)
        self.average = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        # lerp(ema, p, 1 - decay) = ema + (1 - decay) (p - ema), one fused pass over every tensor
        # (as torch.optim.swa_utils' EMA does); p.float() is p itself for fp32 parameters
        torch._foreach_lerp_(list(self.average.values()), [p.detach().float() for p in self.params.values()],
                             1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "average": {n: t.detach().cpu() for n, t in self.average.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("decay") != self.decay or set(state.get("average", {})) != set(self.average):
            raise UsageError(f"an EMA checkpoint of decay {state.get('decay')!r} over {len(state.get('average', {}))} "
                             f"tensors does not match this one (decay {self.decay}, {len(self.average)} tensors); "
                             "delete the training's folder to start it again")
        for n, t in self.average.items():
            t.copy_(state["average"][n])

    @contextlib.contextmanager
    def applied(self):
        """The parameters hold the average inside the block (to export or measure it); their
        own values again after."""
        with torch.no_grad():
            trained = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.average[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(trained[n])


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    finished: bool = False
    seconds: float = 0.0
    ema: ParameterEMA | None = None  # the weights' average (settings.ema_decay), on every rank


def sample_seed(seed: int, key: int) -> int:
    """A 63-bit generator seed from (seed, key) (splitmix64's finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + key * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class SampleRandom:
    """The random numbers of one micro-batch: sample i draws from its own CPU generator,
    seeded by (seed, key_i), where key_i is the sample's global position in the run. Draws
    are made in the same order for every sample, so results do not depend on how samples
    are split over processes or micro-batches."""

    def __init__(self, seed: int, keys: list[int]):
        self.keys = list(keys)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, k)) for k in self.keys]

    def __len__(self) -> int:
        return len(self.keys)

    def randn(self, *shape: int) -> torch.Tensor:
        """[batch, *shape] standard normal, fp32 on the CPU."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def rand(self) -> torch.Tensor:
        """[batch] uniform in [0, 1)."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        """[batch] integers in [0, high)."""
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.generators])


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    schedule, warmup = cfg.settings.schedule, cfg.settings.warmup_steps
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown LR schedule {schedule!r}; use constant, cosine or linear")

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(cfg.steps - warmup, 1), 1.0)
        decay = 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
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


class EpochPermutation:
    """Deterministic sample order: epoch e is a permutation of the dataset seeded by (seed, e)."""

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


class BucketBatches:
    """Deterministic batches of one bucket each (samples of several sizes cannot share a
    batch): epoch e shuffles each bucket's samples with a generator seeded by (seed, e), cuts
    them into batches of `batch_size` (a bucket's last batch filled up from the start of its
    shuffled samples, so every batch is full), and shuffles the epoch's batches with the same
    generator. Micro-batch k of the run (its position / batch_size) is batch k of that sequence,
    a function of (seed, k) alone: resumes and process counts see the same batches."""

    def __init__(self, buckets: list, seed: int, batch_size: int):
        self.seed, self.batch_size = seed, batch_size
        members: dict = {}
        for i, key in enumerate(buckets):
            members.setdefault(key, []).append(i)
        self.members = [members[key] for key in sorted(members)]
        self.per_epoch = sum(-(-len(m) // batch_size) for m in self.members)
        self._cache: dict[int, list[list[int]]] = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = []
            for m in self.members:
                order = [m[int(j)] for j in torch.randperm(len(m), generator=g)]
                count = -(-len(order) // self.batch_size)
                filled = [order[j % len(order)] for j in range(count * self.batch_size)]
                batches += [filled[b * self.batch_size:(b + 1) * self.batch_size] for b in range(count)]
            self._cache = {epoch: [batches[int(j)] for j in torch.randperm(len(batches), generator=g)]}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        if start % self.batch_size or count != self.batch_size:
            raise UsageError(f"bucketed batches are drawn a whole batch at a time (asked for {count} samples at "
                             f"{start}, batch size {self.batch_size})")
        epoch, k = divmod(start // self.batch_size, self.per_epoch)
        return list(self._epoch(epoch)[k])


def sample_order(dataset_size: int, seed: int, batch_size: int, buckets: list | None = None):
    """The run's sample order: an `EpochPermutation` when every sample is in one bucket (or
    `buckets` is None), else `BucketBatches`."""
    if buckets is not None and len(buckets) != dataset_size:
        raise UsageError(f"train: {len(buckets)} bucket keys for {dataset_size} samples; give one a sample")
    if buckets is None or len(set(buckets)) <= 1:
        return EpochPermutation(dataset_size, seed)
    return BucketBatches(buckets, seed, batch_size)


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.settings.mixed_precision != "auto":
        return cfg.settings.mixed_precision
    return "bf16" if torch.cuda.is_available() else "no"


def make_accelerator(cfg: TrainConfig, cpu: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision="no" if cpu else _mixed_precision(cfg), cpu=cpu, log_with=cfg.settings.log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, automatic_checkpoint_naming=False),
    )


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(accelerator, cfg: TrainConfig, step: int, model, optimizer, scheduler,
                     extra_state: dict) -> str:
    """Trainable parameters, optimizer, schedule, loss scale and extra state into a temporary
    folder, renamed into place: a kill never leaves half a checkpoint. Main process only
    (with DDP every rank holds the same parameters and optimizer state)."""
    from safetensors.torch import save_file

    final = os.path.join(cfg.output_dir, f"{CKPT_PREFIX}{step}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(final, tmp):  # a full disk: one line naming the checkpoint; the previous one is intact
            os.makedirs(tmp)
            params = trainable_parameters(accelerator.unwrap_model(model))
            save_file({n: p.detach().cpu().contiguous() for n, p in params.items()},
                      os.path.join(tmp, "trainable.safetensors"))
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "extra": {k: v.state_dict() for k, v in extra_state.items()}}
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()
            torch.save(state, os.path.join(tmp, "state.pt"))
            atomic_write_json(os.path.join(tmp, DONE_FILE), {"step": step, "format": CHECKPOINT_FORMAT,
                                                             "config": cfg.identity()})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted((int(n[len(CKPT_PREFIX):]), n) for n in os.listdir(cfg.output_dir)
                      if n.startswith(CKPT_PREFIX) and n[len(CKPT_PREFIX):].isdigit())
        for _, name in kept[:-max(cfg.keep_checkpoints, 1)]:
            shutil.rmtree(os.path.join(cfg.output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(path: str, cfg: TrainConfig, model, optimizer, scheduler, accelerator, extra_state: dict) -> int:
    """Restore a checkpoint into the (unwrapped) model; refuse one made with other settings."""
    from safetensors.torch import load_file

    info = read_json(os.path.join(path, DONE_FILE), "checkpoint record",
                     f"delete the folder {path}: training resumes from the checkpoint before it (or from the start)")
    if info.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path}: a checkpoint of another format ({info.get('format')}); delete the folder "
                         f"{cfg.output_dir} to start this training again")
    diff = first_difference(info.get("config", {}), cfg.identity())
    if diff:
        raise UsageError(f"{cfg.output_dir} holds a training with other settings ({diff}); resume with the same "
                         "settings or use a new output folder")
    params = trainable_parameters(accelerator.unwrap_model(model))
    saved = load_file(os.path.join(path, "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise UsageError(f"{path}: its parameters do not match this model (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}); delete {cfg.output_dir} to start again")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    for k, obj in extra_state.items():
        obj.load_state_dict(state["extra"][k])
    return int(info["step"])


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


def _tracker_run_name(accelerator, output_dir: str) -> str:
    """The stage folder relative to the accelerator's logging folder (rounds/round-01/stage1),
    so that every stage of every round is its own run in TensorBoard or wandb."""
    base = getattr(accelerator, "logging_dir", None)
    out = os.path.abspath(output_dir)
    if base and os.path.commonpath([os.path.abspath(base), out]) == os.path.abspath(base) and out != os.path.abspath(base):
        return os.path.relpath(out, base)
    return os.path.basename(os.path.normpath(output_dir)) or "train"


def _trim_loss_log(path: str, step: int) -> None:
    """On resume: drop lines written after the checkpoint (those steps run again)."""
    if os.path.exists(path):
        records = [r for r in read_jsonl(path, repair=True, what="loss log") if r["step"] <= step]
        tmp = path + ".tmp"
        with writing(path, tmp), open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _adamw(params, cfg: TrainConfig):
    """AdamW, fused where torch has a fused kernel for the parameters' device and dtype (on a
    LoRA's many small tensors the per-tensor loop costs more than the update itself: measured
    4.6x on the tiny DiT's adapters on 2 CPU cores)."""
    try:
        return torch.optim.AdamW(params, lr=cfg.settings.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.settings.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _adamw8bit(params, cfg: TrainConfig):
    """bitsandbytes' AdamW with 8-bit moments (blockwise-quantised, dequantised for each update),
    the same lr, betas and weight decay. min_8bit_size=0: every tensor's moments are 8-bit.
    bitsandbytes' default (4096 elements) keeps smaller tensors in 32 bits, which would be
    every LoRA tensor of the tiny model (nothing 8-bit would be tested on CPU) and the
    lora_A/lora_B of FLUX's narrower layers at low ranks."""
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=cfg.settings.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                               min_8bit_size=0)


OPTIMIZER_BUILDERS = {"adamw": _adamw, "adamw8bit": _adamw8bit}


def make_optimizer(params, cfg: TrainConfig):
    """The optimizer `cfg.settings.optimizer` names, over `params`."""
    name = cfg.settings.optimizer
    if name not in OPTIMIZER_BUILDERS:
        raise UsageError(f"train.optimizer {name!r}: use one of {', '.join(OPTIMIZER_BUILDERS)}")
    return OPTIMIZER_BUILDERS[name](params, cfg)


def broadcast_trainable_only(model: torch.nn.Module) -> list[str]:
    """Have DDP leave the frozen parameters out of its synchronisation; returns their names.

    DDP's constructor broadcasts every parameter from rank 0 at each wrap: with a LoRA on
    FLUX.1-dev that is the frozen 24 GB base, once per stage (and per pair in per-pair mode),
    to ranks that already hold it (every rank loads the same files and merges the same LoRAs
    with the same exact merge). Only what trains needs the same start on every rank; the
    gradients DDP all-reduces are those of the trainable parameters whatever is ignored.
    Buffers are still synced (FLUX's DiT has none)."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return frozen


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or a quantised weight's inner
    tensors (torchao's tensor subclasses: the int8 data and its scales), recursively."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [inner for name in names for inner in _plain_tensors(getattr(t, name))]
    return [t]


def bit_sums(tensors) -> torch.Tensor:
    """Per tensor, the exact int64 sum of its bits read as int32 words (bytes where the size is
    not a multiple of 4), over its inner tensors for a quantised one: the same tensors give the
    same sums on any device, in any order."""
    sums = []
    for t in tensors:
        total = torch.zeros((), dtype=torch.int64, device=t.device)
        for plain in _plain_tensors(t.detach()):
            raw = plain.reshape(-1).view(torch.uint8)
            words = raw.view(torch.int32) if raw.numel() % 4 == 0 and raw.storage_offset() % 4 == 0 else raw
            total = total + words.sum(dtype=torch.int64)
        sums.append(total)
    return torch.stack(sums)


def check_frozen_agree(model: torch.nn.Module, accelerator) -> None:
    """Refuse to train when a rank's frozen parameters differ from rank 0's. The wrap no longer
    copies rank 0's base over the others' (`broadcast_trainable_only`), so a rank that loaded
    other files or merged other LoRAs would otherwise train on another model, silently. Costs a
    read of the base on its device and a gather of one int64 per tensor, not a 24 GB broadcast."""
    names = [n for n, p in model.named_parameters() if not p.requires_grad]
    if not names:
        return
    params = dict(model.named_parameters())
    mine = bit_sums(params[n] for n in names).to(accelerator.device)
    every = accelerator.gather(mine).reshape(accelerator.num_processes, len(names))
    for rank in range(1, accelerator.num_processes):
        differ = torch.nonzero(every[rank] != every[0]).flatten()
        if len(differ):
            raise UsageError(f"rank {rank}'s frozen {names[int(differ[0])]} differs from rank 0's ({len(differ)} of "
                             f"{len(names)} tensors): every rank must load the same model files and merge the same "
                             "LoRAs")


def _prepare(model, cfg: TrainConfig, accelerator, extra_state: dict):
    """Optimizer and schedule over the trainable parameters, prepared by accelerate, the
    weights' EMA (settings.ema_decay; checkpointed with `extra_state`), and the step to start
    from (the newest checkpoint's, when its settings match)."""
    named = trainable_parameters(model)
    params = list(named.values())
    if not params:
        raise UsageError("train: the model has no trainable parameters")
    ema = None
    if cfg.settings.ema_decay is not None:
        if ParameterEMA.EXTRA_STATE in extra_state:
            raise UsageError(f"train: extra_state {ParameterEMA.EXTRA_STATE!r} is the EMA of settings.ema_decay; "
                             "name it otherwise")
        ema = ParameterEMA(named, cfg.settings.ema_decay)
        extra_state[ParameterEMA.EXTRA_STATE] = ema
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if accelerator.num_processes > 1:
        check_frozen_agree(model, accelerator)
        broadcast_trainable_only(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if ckpt:
        step = _load_checkpoint(ckpt, cfg, model, optimizer, scheduler, accelerator, extra_state)
        logger.info("resumed from %s at step %d", ckpt, step)
    return model, params, optimizer, scheduler, ema, step


def _step_loss(model, loss_fn: Callable, get_batch: Callable, order, cfg: TrainConfig, accelerator,
               step: int) -> tuple[float, dict]:
    """Forward and backward over the step's micro-batches (gradients accumulated, synchronised
    on the last); returns the step's loss and the loss function's metrics (averaged), over
    every rank's samples."""
    hp = cfg.settings
    info = process_info(accelerator)
    world, rank = info.world, info.rank
    per_step = hp.batch_size * hp.grad_accum * world
    total, metrics = 0.0, {}
    for micro in range(hp.grad_accum):
        start = step * per_step + (micro * world + rank) * hp.batch_size
        keys = list(range(start, start + hp.batch_size))
        batch = get_batch(order.indices(start, hp.batch_size))
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync = micro == hp.grad_accum - 1
        with accelerator.no_sync(model) if not sync and world > 1 else _null():
            with accelerator.autocast():
                loss = loss_fn(model, batch, SampleRandom(hp.seed, keys))
            if isinstance(loss, tuple):  # (loss, {name: float}): what the step log records beside the loss
                loss, step_metrics = loss
                for k, v in step_metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v) / hp.grad_accum
            if not torch.isfinite(loss):
                from ..errors import NonFiniteError

                raise NonFiniteError(f"training {cfg.output_dir}: the loss is {float(loss)} at step {step + 1}; "
                                     f"lower the learning rate ({hp.lr:g}) or use bf16/fp32 instead of fp16")
            accelerator.backward(loss / hp.grad_accum)
        total += float(loss.detach()) / hp.grad_accum
    if world > 1:  # the step's loss over every rank's samples (what one process would log)
        names = sorted(metrics)
        values = torch.tensor([total] + [metrics[k] for k in names], device=accelerator.device)
        values = accelerator.reduce(values, "mean").tolist()
        total, metrics = values[0], dict(zip(names, values[1:], strict=True))
    return total, metrics


def train(model: torch.nn.Module, loss_fn: Callable, get_batch: Callable[[list[int]], dict], dataset_size: int,
          cfg: TrainConfig, accelerator=None, on_step: Callable | None = None,
          extra_state: dict | None = None, buckets: list | None = None) -> TrainResult:
    """Train `model`'s trainable parameters for `cfg.steps` optimizer steps.

    loss_fn(model, batch, rng) -> scalar loss (or (loss, {name: float}): metrics logged beside
    it), with `rng` a `SampleRandom` for the batch's samples; get_batch(indices) -> batch dict (on any device; moved here). `on_step(step, loss)`
    runs after each optimizer step on the main process; a step count it sets in `cfg.steps`
    reaches every rank. `extra_state`: objects with state_dict/load_state_dict checkpointed
    with the run (settings.ema_decay adds the weights' EMA, returned in the result). Resumes
    from the newest checkpoint in `cfg.output_dir` if its settings match. Can run again on the
    same accelerator (stage after stage): each call starts from a clean accelerator and leaves
    one. `buckets`: a hashable key a sample (its size); samples of several keys are batched one
    key a batch (`BucketBatches`), all of one key as without (`sample_order`).
    """
    from tqdm import tqdm

    if dataset_size <= 0:
        raise UsageError("train: the dataset is empty")
    hp = cfg.settings
    order = sample_order(dataset_size, hp.seed, hp.batch_size, buckets)
    os.makedirs(cfg.output_dir, exist_ok=True)
    accelerator = accelerator or make_accelerator(cfg)
    accelerator.free_memory()  # a previous stage's model and optimizer must not be unscaled or saved again
    extra_state = dict(extra_state or {})
    model, params, optimizer, scheduler, ema, step = _prepare(model, cfg, accelerator, extra_state)
    main = accelerator.is_main_process
    log_path = os.path.join(cfg.output_dir, LOSS_LOG)
    if main:
        _trim_loss_log(log_path, step)
    if hp.log_with and main:
        accelerator.init_trackers(_tracker_run_name(accelerator, cfg.output_dir),
                                  config={k: v for k, v in cfg.identity().items() if isinstance(v, (int, float, str))})
    result = TrainResult(step=step, ema=ema)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {os.path.basename(cfg.output_dir)}", dynamic_ncols=True,
               disable=not (cfg.progress and main))
    model.train()
    running = None
    last_saved = step
    try:
        while step < cfg.steps:
            total, metrics = _step_loss(model, loss_fn, get_batch, order, cfg, accelerator, step)
            if hp.max_grad_norm:
                accelerator.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
            if ema is not None and not accelerator.optimizer_step_was_skipped:  # fp16: an overflow skips a step
                ema.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            lr = scheduler.get_last_lr()[0]
            result.losses.append(total)
            running = total if running is None else 0.98 * running + 0.02 * total
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
            if main:
                append_line(log_path, {"step": step, "loss": total, "lr": lr, **metrics,
                                       "seconds": round(time.perf_counter() - t0, 3)})
                if hp.log_with:
                    accelerator.log({"loss": total, "lr": lr, **metrics}, step=step)
                if cfg.log_every and step % cfg.log_every == 0:
                    logger.info("step %d loss %.5f (avg %.5f) lr %.3e", step, total, running, lr)
                if on_step is not None:
                    on_step(step, total)
            out_of_time = cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s
            if accelerator.num_processes > 1:
                out_of_time = _agree_with_main_process(accelerator, cfg, out_of_time)
            if bar.total != cfg.steps:  # an on_step hook refitted the step count (time budget)
                bar.total = cfg.steps
                bar.refresh()
            if (hp.checkpoint_every and step % hp.checkpoint_every == 0) or out_of_time:
                _save_checkpoint(accelerator, cfg, step, model, optimizer, scheduler, extra_state)
                last_saved = step
            if out_of_time:
                logger.info("time budget of %.0fs spent at step %d", cfg.time_budget_s, step)
                break
        result.seconds = time.perf_counter() - t0  # the steps (checkpoints included), not the clean-up below
        if step >= cfg.steps and last_saved != step and hp.checkpoint_every:
            _save_checkpoint(accelerator, cfg, step, model, optimizer, scheduler, extra_state)
    finally:
        bar.close()
        if hp.log_with and main:
            for tracker in accelerator.trackers:  # not end_training(): it also ends the process group
                tracker.finish()
            accelerator.trackers = []  # the next stage logs into its own run, not also into this one
        accelerator.free_memory()
    result.step = step
    result.finished = step >= cfg.steps
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
