"""The flow-matching training core on a micro FLUX DiT: it learns, it checkpoints, and a
run resumed from a checkpoint ends bit-identical to one that never stopped."""

import os

import pytest
import torch

from artaug_ext.tiny.models import TinyFluxDiT
from artaug_ext.train import (
    FlowMatchObjective,
    FluxDenoiser,
    TrainConfig,
    inject_lora,
    latest_checkpoint,
    lora_state_dict,
    train,
)
from artaug_ext.train.loop import lr_lambda


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
    loss = lambda m, b, gen: objective(m, b["latents"], b["prompt_emb"], b["pooled_prompt_emb"], gen)  # noqa: E731
    get = lambda idx: {k: v[idx] for k, v in data.items()}  # noqa: E731
    kw = {"batch_size": 3, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False, **kw}
    cfg = TrainConfig(str(out), steps=steps, **kw)
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
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-2", "checkpoint-4"]  # keeps the newest two


def test_training_reduces_the_loss(tmp_path):
    data = _data(4)
    model = _denoiser()
    objective = FlowMatchObjective(weighting="uniform")

    def eval_loss():
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return float(sum(objective(model, data["latents"], data["prompt_emb"], data["pooled_prompt_emb"], gen)
                             for _ in range(4)))

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
    cfg = TrainConfig("unused", steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)


def _rank_generators(rank, world, init_file, out):
    import torch.distributed as dist

    from artaug_ext.train.loop import _LoopState

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        st = _LoopState(10 + rank, rank, world)
        torch.rand(3, generator=st.generator)
        st.step = 5
        saved = st.state_dict()  # collective: every rank calls it, as in accelerator.save_state
        expected = torch.rand(3, generator=st.generator)
        torch.save({"saved": saved, "expected": expected}, f"{out['dir']}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_loop_state_keeps_every_ranks_generator(tmp_path):
    """accelerate writes custom state from rank 0 only: each rank must still get its own
    generator back on resume, not rank 0's (else all ranks draw the same noise)."""
    import multiprocessing

    from artaug_ext.train.loop import _LoopState

    ctx = multiprocessing.get_context("spawn")
    out = {"dir": str(tmp_path)}
    procs = [ctx.Process(target=_rank_generators, args=(r, 2, str(tmp_path / "init"), out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rank0 = torch.load(tmp_path / "rank0.pt")  # what the checkpoint holds
    for rank in range(2):
        expected = torch.load(tmp_path / f"rank{rank}.pt")["expected"]
        resumed = _LoopState(10 + rank, rank, 2)
        resumed.load_state_dict(rank0["saved"])
        assert resumed.step == 5 and torch.equal(torch.rand(3, generator=resumed.generator), expected), rank
    single = _LoopState(3)
    single.load_state_dict(_LoopState(3).state_dict())  # one process: the old format, unchanged
    assert set(_LoopState(3).state_dict()) == {"step", "generator"}


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


def _rank_trains_until_main_says(rank, world, port, out_dir):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from artaug_ext.train.loop import make_accelerator

    cfg = TrainConfig(out_dir, steps=8, batch_size=2, lr=1e-3, warmup_steps=1, progress=False, checkpoint_every=0)
    accelerator = make_accelerator(cfg, cpu=True)
    assert accelerator.num_processes == world

    def shrink(step, loss):  # what recipes/train_tiny.py's budget fit does, on the main process only
        if step == 2:
            cfg.steps = 3

    objective = FlowMatchObjective()
    data = _data()
    loss = lambda m, b, gen: objective(m, b["latents"], b["prompt_emb"], b["pooled_prompt_emb"], gen)  # noqa: E731
    result = train(_denoiser(), loss, lambda idx: {k: v[idx] for k, v in data.items()}, len(data["latents"]), cfg,
                   accelerator=accelerator, on_step=shrink)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(str(result.step))
    accelerator.end_training()


def test_ranks_stop_together_when_the_main_process_refits_steps(tmp_path):
    """on_step runs on rank 0 only; a step count it changes must reach the other ranks (else
    they train on alone and hang in DDP's next all-reduce)."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_trains_until_main_says, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung and [p.exitcode for p in procs] == [0, 0]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["3", "3"]
