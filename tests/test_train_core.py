"""The flow-matching training core on a micro FLUX DiT: it learns, it checkpoints, and a
run resumed from a checkpoint ends bit-identical to one that never stopped."""

import dataclasses
import os

import pytest
import torch

from artaug_ext.tiny.models import TinyFluxDiT
from artaug_ext.train import (
    FlowMatchObjective,
    FluxDenoiser,
    SampleRandom,
    TrainConfig,
    TrainSettings,
    inject_lora,
    latest_checkpoint,
    lora_state_dict,
    train,
)
from artaug_ext.train.loop import lr_lambda

TRAIN_SETTINGS = {f.name for f in dataclasses.fields(TrainSettings)}


def _denoiser():
    torch.manual_seed(0)
    dit = TinyFluxDiT(dim=64, num_heads=1, num_joint_blocks=1, num_single_blocks=1, axes_dim=(16, 24, 24),
                      input_dim=64, text_dim=16, pooled_dim=8)
    return FluxDenoiser(dit)


def _data(n=12):
    g = torch.Generator().manual_seed(1)
    return {"latents": torch.randn(n, 16, 8, 8, generator=g), "prompt_emb": torch.randn(n, 4, 16, generator=g),
            "pooled_prompt_emb": torch.randn(n, 8, generator=g)}


def _run(model, out, steps, data, **kw):
    objective = FlowMatchObjective()
    loss = lambda m, b, rng: objective(m, b["latents"], b["prompt_emb"], b["pooled_prompt_emb"], rng)  # noqa: E731
    get = lambda idx: {k: v[idx] for k, v in data.items()}  # noqa: E731
    kw = {"batch_size": 3, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False, **kw}
    hp = {k: kw.pop(k) for k in list(kw) if k in TRAIN_SETTINGS}
    cfg = TrainConfig(str(out), steps=steps, settings=TrainSettings(**hp), **kw)
    return train(model, loss, get, len(data["latents"]), cfg)


def test_resume_gives_identical_state(tmp_path):
    data = _data()
    ref = _denoiser()
    r_ref = _run(ref, tmp_path / "a", 4, data, checkpoint_every=0)
    assert r_ref.finished and len(r_ref.losses) == 4 and latest_checkpoint(str(tmp_path / "a")) is None

    first = _denoiser()
    r1 = _run(first, tmp_path / "b", 4, data, checkpoint_every=2, time_budget_s=0)  # "killed" after step 1
    assert r1.step == 1 and not r1.finished
    ckpt = latest_checkpoint(str(tmp_path / "b"))
    assert ckpt.endswith("checkpoint-1") and not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "b"))

    resumed = _denoiser()  # a fresh process: same init, state comes from the checkpoint
    r2 = _run(resumed, tmp_path / "b", 4, data, checkpoint_every=2)
    assert r2.finished and r2.losses == r_ref.losses[1:]
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-2", "checkpoint-4", "loss.jsonl"]  # the newest two


def test_training_reduces_the_loss(tmp_path):
    data = _data(4)
    model = _denoiser()
    objective = FlowMatchObjective(weighting="uniform")

    def eval_loss():
        with torch.no_grad():
            return float(sum(objective(model, data["latents"], data["prompt_emb"], data["pooled_prompt_emb"],
                                       SampleRandom(5, list(range(4 * k, 4 * k + 4)))) for k in range(4)))

    before = eval_loss()
    _run(model, tmp_path, 8, data, checkpoint_every=0, batch_size=4, grad_accum=1, lr=3e-3, schedule="constant")
    assert eval_loss() < before


def test_lora_trains_only_the_adapters(tmp_path):
    model = _denoiser()
    inject_lora(model.dit, rank=4)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    _run(model, tmp_path, 2, _data(), checkpoint_every=0)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    lora = lora_state_dict(model.dit)
    assert lora and any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at zero


def test_objective_uses_diffsynth_training_schedule():
    obj = FlowMatchObjective()
    sched = obj.scheduler
    assert len(sched.timesteps) == 1000 and sched.training
    assert torch.allclose(sched.sigmas * 1000, sched.timesteps)
    with pytest.raises(ValueError):
        FlowMatchObjective(weighting="bogus")


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig("unused", steps=100, min_lr_ratio=0.1, settings=TrainSettings(warmup_steps=10, schedule="cosine"))
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)


def test_recipe_budget_fit_is_kept_on_resume(tmp_path):
    """recipes/train_tiny.py fits the step count to a time budget once; a resumed run must keep
    it (re-fitting from --dit-steps stretched the LR schedule and retrained a finished phase)."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    from artaug_ext.train.loop import DONE_FILE

    def checkpoint(step, steps):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / DONE_FILE).write_text(json.dumps({"step": step, "config": {"steps": steps}}))

    cfg = TrainConfig(str(tmp_path), steps=20000)
    recipe.fit_steps_to_budget(cfg, 60.0, 20000)
    assert cfg.steps == 20000  # nothing to resume: fitted later by the hook
    checkpoint(10, 20000)  # saved before the probe: not fitted yet
    recipe.fit_steps_to_budget(cfg, 60.0, 20000)
    assert cfg.steps == 20000
    checkpoint(1730, 1730)  # a finished, fitted phase
    hook = recipe.fit_steps_to_budget(cfg, 60.0, 20000)
    assert cfg.steps == 1730
    hook(1), hook(30)
    assert cfg.steps == 1730
    cfg = TrainConfig(str(tmp_path), steps=5000)
    recipe.fit_steps_to_budget(cfg, None, 5000)  # no budget: the command's --steps rule
    assert cfg.steps == 5000


def _spawn_ranks(target, world: int, *args, timeout: float) -> list:
    """`target(rank, world, port, *args)` in `world` spawned processes with one rendezvous port;
    their exit codes (None for one that hung, which is killed)."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = []
    for p in procs:
        hung = p.is_alive()
        if hung:
            p.kill()
            p.join()
        codes.append(None if hung else p.exitcode)
    return codes


def _rank_trains_until_main_says(rank, world, port, out_dir):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from artaug_ext.train.loop import make_accelerator

    cfg = TrainConfig(out_dir, steps=8, progress=False, settings=TrainSettings(batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=0))
    accelerator = make_accelerator(cfg, cpu=True)
    assert accelerator.num_processes == world

    def shrink(step, loss):  # what recipes/train_tiny.py's budget fit does, on the main process only
        if step == 2:
            cfg.steps = 3

    objective = FlowMatchObjective()
    data = _data()
    loss = lambda m, b, rng: objective(m, b["latents"], b["prompt_emb"], b["pooled_prompt_emb"], rng)  # noqa: E731
    result = train(_denoiser(), loss, lambda idx: {k: v[idx] for k, v in data.items()}, len(data["latents"]), cfg,
                   accelerator=accelerator, on_step=shrink)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(str(result.step))
    accelerator.end_training()


def test_ranks_stop_together_when_the_main_process_refits_steps(tmp_path):
    """on_step runs on rank 0 only; a step count it changes must reach the other ranks (else
    they train on alone and hang in DDP's next all-reduce)."""
    assert _spawn_ranks(_rank_trains_until_main_says, 2, str(tmp_path), timeout=180) == [0, 0]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["3", "3"]


# ---------------------------------------------------------------------------- what a trained LoRA must be


def _lora_run(tmp_path, name, dtype=torch.float32, rank=4, alpha=2.0, steps=3, **kw):
    model = _denoiser()
    model.dit.to(dtype)
    inject_lora(model.dit, rank=rank, alpha=alpha, init_seed=7)
    res = _run(model, tmp_path / name, steps, _data(), **{"checkpoint_every": 0, "lr": 1e-2, **kw})
    return model, res


def test_trained_lora_round_trips_through_load_lora_at_its_trained_strength(tmp_path):
    """rank 4, alpha 2: the export folds alpha / rank = 0.5 into B and drops the wrapper prefix,
    so load_lora into a fresh base gives the PEFT-wrapped model's output (fp32, <= 1e-5)."""
    from artaug_ext.lora import load_lora

    model, _ = _lora_run(tmp_path, "a")
    state = lora_state_dict(model)  # through the FluxDenoiser wrapper: keys relative to the DiT
    assert state and all(k.startswith(("blocks.", "single_blocks.")) for k in state)
    fresh = _denoiser()  # same seed: the same base weights
    report = load_lora(fresh.dit, state)
    assert len(report.merged) == len(state) // 2
    data = _data(2)
    t = torch.tensor([500.0, 250.0])
    guidance = torch.full((2,), 3.5)
    model.eval()
    with torch.no_grad():
        want = model(data["latents"], t, data["prompt_emb"], data["pooled_prompt_emb"], guidance)
        got = fresh(data["latents"], t, data["prompt_emb"], data["pooled_prompt_emb"], guidance)
        base = _denoiser()(data["latents"], t, data["prompt_emb"], data["pooled_prompt_emb"], guidance)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert float((base - want).abs().max() / want.abs().max()) > 1e-3  # the LoRA did change the output


def test_checkpoints_hold_only_what_trains(tmp_path):
    from safetensors import safe_open

    model, _ = _lora_run(tmp_path, "c", steps=2, checkpoint_every=1)
    ckpt = latest_checkpoint(str(tmp_path / "c"))
    with safe_open(os.path.join(ckpt, "trainable.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all("lora_" in k for k in keys)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    size = sum(os.path.getsize(os.path.join(ckpt, n)) for n in os.listdir(ckpt))
    assert size < frozen / 4, (size, frozen)  # the base is not in it


def test_two_stages_on_one_accelerator_and_a_changed_resume_is_refused(tmp_path):
    from artaug_ext.errors import UsageError
    from artaug_ext.train.loop import make_accelerator

    cfg = TrainConfig(str(tmp_path / "s1"), steps=2, progress=False, settings=TrainSettings(batch_size=3, checkpoint_every=1))
    accelerator = make_accelerator(cfg, cpu=True)
    objective = FlowMatchObjective()
    data = _data()
    loss = lambda m, b, rng: objective(m, b["latents"], b["prompt_emb"], b["pooled_prompt_emb"], rng)  # noqa: E731
    get = lambda idx: {k: v[idx] for k, v in data.items()}  # noqa: E731
    for stage in ("s1", "s2"):
        model = _denoiser()
        inject_lora(model.dit, rank=2, init_seed=1)
        res = train(model, loss, get, 12, TrainConfig(str(tmp_path / stage), steps=2, progress=False, settings=TrainSettings(batch_size=3, checkpoint_every=1)), accelerator=accelerator)
        assert res.finished
        assert accelerator._models == [] and accelerator._optimizers == []  # a clean accelerator for the next stage
    model = _denoiser()
    inject_lora(model.dit, rank=2, init_seed=1)
    with pytest.raises(UsageError, match=r"holds a training with other settings \(lr: 0.0001 -> 0.001\)"):
        train(model, loss, get, 12, TrainConfig(str(tmp_path / "s1"), steps=3, progress=False, settings=TrainSettings(batch_size=3, lr=1e-3)),
              accelerator=accelerator)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_train_in_fp32_on_a_low_precision_base(tmp_path, dtype):
    model = _denoiser()
    model.dit.to(dtype)
    inject_lora(model.dit, rank=2, init_seed=0)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(p.dtype == dtype for n, p in model.named_parameters() if "lora_" not in n)


def test_rank_larger_than_a_layer_is_refused():
    from artaug_ext.errors import UsageError

    with pytest.raises(UsageError, match=r"LoRA rank 100 exceeds layer .* \(64 in, .*use a rank <= 64"):
        inject_lora(_denoiser().dit, rank=100)


def test_remove_lora_restores_the_module_tree():
    from artaug_ext.train import remove_lora

    model = _denoiser()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model.dit, rank=2)
    assert remove_lora(model) > 0
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_sample_randomness_is_a_function_of_the_global_position():
    a = SampleRandom(3, [0, 1, 2, 3]).randn(5)
    b = torch.cat([SampleRandom(3, [0, 1]).randn(5), SampleRandom(3, [2, 3]).randn(5)])
    assert torch.equal(a, b)
    assert not torch.equal(SampleRandom(3, [0]).randn(5), SampleRandom(4, [0]).randn(5))


def _rank_trains_a_lora(rank, world, port, out_dir, batch):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from artaug_ext.train.loop import make_accelerator

    cfg = TrainConfig(out_dir, steps=3, progress=False, settings=TrainSettings(batch_size=batch, grad_accum=2, lr=1e-2, checkpoint_every=0))
    accelerator = make_accelerator(cfg, cpu=True)
    model = _denoiser()
    inject_lora(model.dit, rank=2, init_seed=5)
    objective = FlowMatchObjective()
    data = _data()
    loss = lambda m, b, rng: objective(m, b["latents"], b["prompt_emb"], b["pooled_prompt_emb"], rng)  # noqa: E731
    train(model, loss, lambda idx: {k: v[idx] for k, v in data.items()}, len(data["latents"]), cfg,
          accelerator=accelerator)
    if accelerator.is_main_process:
        torch.save(lora_state_dict(model), os.path.join(out_dir, "lora.pt"))
    accelerator.wait_for_everyone()


def test_two_ranks_train_the_same_lora_as_one_with_the_same_global_batch(tmp_path):
    """gloo on CPU: world 2 x batch 2 against world 1 x batch 4 (grad_accum 2 in both)."""
    results = {}
    for world, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"w{world}"
        out.mkdir()
        assert _spawn_ranks(_rank_trains_a_lora, world, str(out), batch, timeout=240) == [0] * world
        results[world] = torch.load(out / "lora.pt")
    one, two = results[1], results[2]
    assert one.keys() == two.keys()
    for k in one:
        # The same samples, noise and timesteps; only the fp32 summation order differs (a gradient averaged
        # over ranks vs over one batch). Adam divides each gradient by its own magnitude, so elements whose
        # gradient is near its eps turn that rounding into visible differences (measured: <= 3e-4 of the
        # weights' scale after 3 steps at lr 1e-2); a different sample or noise would differ by ~100%.
        err = float((one[k] - two[k]).abs().max())
        assert err <= 1e-3 * float(one[k].abs().max()), (k, err)


def _rank_counts_what_the_wrap_broadcasts(rank, world, port, out_dir):
    """Trains the same LoRA twice on one accelerator: with DDP's wrap syncing every parameter
    (torch's default, the old behaviour) and with ours; records the bytes of each broadcast."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import torch.distributed as dist

    from artaug_ext.errors import UsageError
    from artaug_ext.train.loop import make_accelerator

    sent = []
    real_broadcast = dist._broadcast_coalesced

    def counting(group, tensors, *args, **kwargs):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return real_broadcast(group, tensors, *args, **kwargs)

    dist._broadcast_coalesced = counting
    ddp = torch.nn.parallel.DistributedDataParallel
    real_ignore = ddp.__dict__["_set_params_and_buffers_to_ignore_for_model"]
    objective = FlowMatchObjective()
    data = _data()
    loss = lambda m, b, rng: objective(m, b["latents"], b["prompt_emb"], b["pooled_prompt_emb"], rng)  # noqa: E731
    accelerator = None
    results = {}
    for name in ("every parameter", "ours"):
        ddp._set_params_and_buffers_to_ignore_for_model = real_ignore if name == "ours" else staticmethod(lambda m, n: None)
        model = _denoiser()
        inject_lora(model.dit, rank=2, init_seed=5 + rank)  # rank 1 starts elsewhere: the wrap must sync the LoRA
        cfg = TrainConfig(os.path.join(out_dir, name), steps=2, progress=False,
                          settings=TrainSettings(batch_size=2, lr=1e-2, checkpoint_every=0))
        accelerator = accelerator or make_accelerator(cfg, cpu=True)
        sent.clear()
        train(model, loss, lambda idx: {k: v[idx] for k, v in data.items()}, len(data["latents"]), cfg,
              accelerator=accelerator)
        results[name] = {"sent": list(sent), "lora": lora_state_dict(model),
                         "trainable": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                         "frozen": sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)}
    model = _denoiser()
    inject_lora(model.dit, rank=2, init_seed=5)
    if rank == 1:  # a rank on another base: the wrap no longer hides it under rank 0's copy
        with torch.no_grad():
            model.dit.single_blocks[0].proj_out.weight[3, 7] += 1e-6
    try:
        train(model, loss, lambda idx: {k: v[idx] for k, v in data.items()}, len(data["latents"]),
              TrainConfig(os.path.join(out_dir, "other base"), steps=2, progress=False), accelerator=accelerator)
    except UsageError as e:
        results["other base"] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    accelerator.wait_for_everyone()


def test_the_ddp_wrap_broadcasts_the_trainable_parameters_only(tmp_path):
    """gloo on CPU, 2 ranks: DDP's wrap (once per stage, per pair in per-pair mode) sends the
    LoRA and not the frozen base, and the LoRA trained is bitwise the one of a wrap that sends
    everything (rank 1's LoRA starts elsewhere and is synced from rank 0 all the same); a rank
    whose frozen base differs from rank 0's is refused, by name, on both ranks."""
    assert _spawn_ranks(_rank_counts_what_the_wrap_broadcasts, 2, str(tmp_path), timeout=240) == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in ranks:
        everything, ours = res["every parameter"], res["ours"]
        assert ours["trainable"] > 0 and ours["frozen"] > 10 * ours["trainable"]
        assert everything["sent"] == [everything["frozen"] + everything["trainable"]]  # torch's wrap: the base too
        assert ours["sent"] == [ours["trainable"]]  # ours: the LoRA alone, nothing after
        for k, v in everything["lora"].items():
            assert torch.equal(ours["lora"][k], v), k
    for k, v in ranks[0]["ours"]["lora"].items():
        assert torch.equal(ranks[1]["ours"]["lora"][k], v), k
    for res in ranks:  # both ranks refuse (neither waits alone in a collective)
        assert res["other base"] == ("rank 1's frozen dit.single_blocks.0.proj_out.base_layer.weight differs from rank 0's "
                                     "(1 of 52 tensors): every rank must load the same model files and merge the same LoRAs")
