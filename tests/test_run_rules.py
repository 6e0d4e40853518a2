"""The rules of `artaug run` that only show at scale: one lock per folder whatever the world
size, a shared --out for every process, the gain stop rule over every enhanced item, loss
summaries that are not one noisy step, and the guidance LoRAs are trained at."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers import REPO, child_env, start_paused

from artaug_ext.dist import Collective, ProcessInfo, lock_folder
from artaug_ext.errors import RunLockedError, UsageError
from artaug_ext.recipe.config import load_recipe, recipe_from_dict
from artaug_ext.recipe.layout import RUN_LOCK, RoundRecord
from artaug_ext.recipe.runner import RecipeRun, _loss_summary, run_recipe, train_guidance_note

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
[run]
name = "rules"
model = "tiny-random"
rounds = 2
seed = 3
{run_extra}

[data]
prompts = ["a large black square at the bottom and a small red circle at the top on a light purple background",
           "a large red square on the right and a small green circle in the top left on a black background, dim light"]
size = 64
steps = 2

[filter]
margin = -1.0

[train]
rank = 2
lr = 1e-3
steps_stage1 = 2
steps_stage2 = 2
resolution = 32
checkpoint_every = 0
"""


def _recipe(tmp_path, run_extra=""):
    path = tmp_path / "rules.toml"
    path.write_text(RECIPE.format(run_extra=run_extra))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(recipe, outs, timeout=240):
    """`artaug run` as a 2-process launch (gloo on CPU): what torchrun sets, rank by rank."""
    port = _free_port()
    procs = []
    for rank, out in enumerate(outs):
        env = dict(child_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "artaug_ext.cli", "run", str(recipe), "--out", str(out),
                                       "--device", "cpu", "--no-progress"], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, err.strip().splitlines()))
    return results


# ---------------------------------------------------------------------------------------- locks

class _Launch(Collective):
    """The ranks of one launch, played in this process: rank 0 decides, the others hear it."""

    def __init__(self, rank: int, world: int, heard: list):
        super().__init__(info=ProcessInfo(rank, world, rank))
        self.heard = heard

    def broadcast(self, obj):
        if self.info.main:
            self.heard.append(obj)
            return obj
        return self.heard[-1]


def test_one_lock_per_folder_refuses_a_launch_of_another_world_size_on_every_rank(tmp_path):
    first = lock_folder(str(tmp_path), _Launch(0, 1, []), RUN_LOCK)
    try:
        heard: list = []
        launch = [_Launch(rank, 8, heard) for rank in range(8)]
        errors = []
        for collective in launch:
            with pytest.raises(RunLockedError) as e:
                lock_folder(str(tmp_path), collective, RUN_LOCK)
            errors.append(str(e.value))
        assert len(set(errors)) == 1 and f"is in use by process {os.getpid()}" in errors[0]
        assert sorted(os.listdir(tmp_path)) == [RUN_LOCK]  # one lock file, whatever the world size
    finally:
        first.release()
    # released: a launch of 8 takes it, on its main process only
    heard = []
    locks = [lock_folder(str(tmp_path), _Launch(rank, 8, heard), RUN_LOCK) for rank in range(8)]
    assert locks[0] is not None and locks[1:] == [None] * 7
    locks[0].release()


def test_a_two_rank_run_on_a_folder_a_one_process_run_holds_is_refused_on_both_ranks(tmp_path):
    recipe = _recipe(tmp_path)
    out = tmp_path / "run"
    holder = start_paused(["run", str(recipe), "--out", str(out), "--device", "cpu", "--no-progress"], "item:1",
                          tmp_path / "paused")
    try:
        results = _launch_two_ranks(recipe, [out, out])
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    for code, err in results:
        assert code == 2, err
        assert len(err) == 1 and f"is in use by process {holder.pid}" in err[0], err
    assert not os.path.isdir(out / "rounds" / "round-01" / "cache")  # nothing of the refused launch ran


def test_ranks_with_different_out_folders_stop_at_once_naming_the_fix(tmp_path):
    """Node-local disks, played by giving each rank its own --out."""
    recipe = _recipe(tmp_path)
    results = _launch_two_ranks(recipe, [tmp_path / "node0", tmp_path / "node1"])
    for code, err in results:
        assert code == 2, err
        assert len(err) == 1 and "rank(s) 1 of 2 do not see the file" in err[0], err
        assert err[0].endswith("put --out on a filesystem every node sees"), err
    assert not (tmp_path / "node0" / "run.json").exists()  # refused before anything was written
    assert [p for p in os.listdir(tmp_path / "node0") if p.startswith(".artaug-shared")] == []


def test_a_shared_folder_passes_the_check(tmp_path):
    Collective().check_shared_folder(str(tmp_path))  # one process: nothing to check, nothing written
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ gain stop rule

def _record(**kw) -> RoundRecord:
    base = dict(round=1, seed=0, items=10, enhanced=8, kept=2, kept_fraction=0.2, mean_gain=0.5, trained_pairs=2)
    return RoundRecord(**{**base, **kw})


def _stop_reason(recipe_text_extra: str, record: RoundRecord, tmp_path) -> str | None:
    run = RecipeRun.__new__(RecipeRun)  # the rule needs only the recipe
    run.recipe = load_recipe(str(_recipe(tmp_path, recipe_text_extra)))
    return run._stop_reason(record)


def test_the_gain_stop_rule_reads_every_enhanced_item_not_the_kept_ones(tmp_path):
    # kept pairs gained 0.5 (each passed the margin), but the round's enhanced items lost on average
    record = _record(mean_gain=0.5, mean_gain_enhanced=-0.1)
    reason = _stop_reason("stop_mean_gain = 0.0", record, tmp_path)
    assert reason == "round 1 gained -0.1 on average over its 8 enhanced items, below run.stop_mean_gain 0"
    assert _stop_reason("stop_mean_gain = -0.2", record, tmp_path) is None
    assert "had no enhanced item" in _stop_reason("stop_mean_gain = -0.2", _record(enhanced=0), tmp_path)


def test_the_gain_stop_rule_is_off_by_default(tmp_path):
    recipe = load_recipe(str(_recipe(tmp_path)))
    assert recipe.run.stop_mean_gain is None
    assert _stop_reason("", _record(mean_gain_enhanced=-5.0), tmp_path) is None
    for shipped in ("flux_dev_artaug.toml", "flux_dev_artaug_8gpu.toml", "smoke.toml"):
        assert load_recipe(os.path.join(REPO, "recipes", shipped)).run.stop_mean_gain is None, shipped


def test_the_gain_stop_rule_stops_a_run(tmp_path, pipe):
    recipe = load_recipe(str(_recipe(tmp_path, "stop_mean_gain = 1000.0")))
    summary = run_recipe(recipe, str(tmp_path / "run"), device="cpu", progress=False)
    assert len(summary["rounds"]) == 1 and not (tmp_path / "run" / "rounds" / "round-02").exists()
    with open(tmp_path / "run" / "rounds" / "round-01" / "interact" / "manifest.jsonl") as f:
        records = [json.loads(line) for line in f]
    gains = [r["gain"] for r in records if r["enhanced"]]
    rec = summary["rounds"][0]
    assert gains and rec["enhanced"] == len(gains)
    assert rec["mean_gain_enhanced"] == pytest.approx(sum(gains) / len(gains), abs=1e-12)
    assert summary["stopped"] == (f"round 1 gained {rec['mean_gain_enhanced']:.4g} on average over its "
                                  f"{len(gains)} enhanced items, below run.stop_mean_gain 1000")
    assert summary["final"] is not None  # the round's LoRA is still the run's result
    # the round says how many of the critic's suggestions had a local prompt of their own
    assert rec["usable_suggestions"] == sum(len(r["suggestions"]) for r in records) > 0
    assert rec["suggestions"] == rec["usable_suggestions"] + sum(r.get("identity_suggestions", 0) for r in records)


# -------------------------------------------------------------------------------- loss summary

def test_the_loss_summary_averages_the_first_and_last_tenth_of_the_steps():
    losses = [float(i) for i in range(1, 21)]  # 20 steps: windows of 2
    s = _loss_summary({"stage1": losses, "stage2": losses[::-1]})
    assert s["stage1"] == {"first": 1.5, "last": 19.5, "window": 2, "steps": 20}
    assert s["stage2"] == {"first": 19.5, "last": 1.5, "window": 2, "steps": 20}
    assert _loss_summary({"stage2": [4.0, 2.0, 3.0]})["stage2"] == {"first": 4.0, "last": 3.0, "window": 1, "steps": 3}
    per_pair = _loss_summary({"p1": {"stage1": losses, "stage2": losses},
                              "p2": {"stage1": [x + 1 for x in losses], "stage2": losses}})
    assert per_pair["stage1"] == {"first": 2.0, "last": 20.0, "window": 2, "steps": 20, "pairs": 2}


# ------------------------------------------------------------------------------------ guidance

def test_loras_train_at_the_authors_guidance_on_flux_dev_and_the_card_says_so():
    for shipped in ("flux_dev_artaug.toml", "flux_dev_artaug_8gpu.toml"):
        recipe = load_recipe(os.path.join(REPO, "recipes", shipped))
        assert recipe.train.guidance == 1.0 and recipe.data.guidance == 3.5
        note = train_guidance_note(recipe)
        assert note["value"] == 1.0 and note["choice"].startswith("the authors' setting: DiffSynth's FLUX trainer")
    text = {"run": {"model": "flux-dev"}, "data": {"prompts": ["a cat"]}}
    assert recipe_from_dict(text).train.guidance == 1.0  # left out: the authors' value
    ours = recipe_from_dict({**text, "train": {"guidance": 3.5}})
    assert ours.train.guidance == 3.5 and train_guidance_note(ours)["choice"].startswith("the recipe's choice, not the authors' 1")
    tiny = recipe_from_dict({"run": {"model": "tiny-random"}, "data": {"prompts": ["a cat"]}})
    assert tiny.train.guidance == 3.5 and "no authors' setting" in train_guidance_note(tiny)["choice"]


def test_a_launch_without_a_rendezvous_is_refused_in_one_line(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UsageError, match="WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set: start the processes "
                                         "with torchrun or accelerate launch"):
        Collective(info=ProcessInfo(1, 2, 1)).barrier()


# --------------------------------------------------------------------------------- tensorboard

def test_a_run_with_log_with_tensorboard_writes_the_losses_as_event_files(tmp_path, pipe):
    pytest.importorskip("tensorboard")  # in the test extra; without it the recipe is refused (test_recipe_values)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from artaug_ext.train.loss_log import read_loss_log

    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("rounds = 2", "rounds = 1") + 'log_with = "tensorboard"\n')
    out = tmp_path / "run"
    run_recipe(load_recipe(str(path)), str(out), device="cpu", progress=False)
    stages = {}
    for root, _, files in os.walk(out):
        if any(f.startswith("events.out.tfevents.") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            if "loss" in acc.Tags()["scalars"]:
                stages[os.path.relpath(root, out)] = [(e.step, e.value) for e in acc.Scalars("loss")]
    # each stage of each round is its own run (before: all rounds' stage 1 in one, stage 2 in both)
    assert sorted(stages) == ["rounds/round-01/stage1", "rounds/round-01/stage2"], stages
    for stage, events in stages.items():
        logged = read_loss_log(str(out / stage))
        assert [s for s, _ in events] == [r["step"] for r in logged]
        assert [v for _, v in events] == pytest.approx([r["loss"] for r in logged], rel=1e-6)


def test_an_error_in_main_only_work_reaches_every_rank(tmp_path):
    """Not only a held lock: any error of the main process's share (a filesystem without flock,
    a full disk) is raised on every rank, instead of leaving them waiting in a collective."""
    heard: list = []
    launch = [_Launch(rank, 4, heard) for rank in range(4)]
    ran = []

    def fails():
        ran.append(1)
        raise OSError(37, "No locks available")

    with pytest.raises(OSError, match="No locks available"):
        launch[0].on_main(fails)
    for collective in launch[1:]:
        with pytest.raises(UsageError, match=r"No locks available"):
            collective.on_main(fails)
    assert ran == [1]  # the main process alone did the work
    heard.clear()
    for collective in launch:
        collective.on_main(lambda: ran.append(2))
    assert ran == [1, 2]
