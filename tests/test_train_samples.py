"""Sample images during training ([train] sample_every): the images are the LoRA in training's
(the final sample is what the stage's merged LoRA draws), sampling leaves the trained LoRA
bitwise unchanged, a micro run writes them into every stage folder and shows them in its report
(in Chromium), kill -9 and resume neither duplicates nor loses any, the stage identity holds the
sample settings only when they are used, and bad values are one line naming the key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    MICRO_PROMPTS,
    REPO,
    child_env,
    file_tree,
    kill_when_paused,
    micro_recipe,
    run_recorded_before,
)
from PIL import Image

from artaug_ext.errors import UsageError
from artaug_ext.recipe.config import load_recipe
from artaug_ext.recipe.runner import run_recipe
from artaug_ext.train.samples import SAMPLES_DIR, StageSampler, read_samples
from artaug_ext.train.settings import LoRATrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")

# Every step sampled, a checkpoint every 2nd step: a kill after step 1's images and before any
# checkpoint makes the rerun sample step 1 again (a duplicate, if the list were appended to).
SAMPLED = {"sample_every": 1, "checkpoint_every": 2}
SIZE = 32  # of the stage-level tests' images


def _cache(n=2):
    from artaug_ext.train.cache import LatentCache

    g = torch.Generator().manual_seed(0)
    return LatentCache([f"p{i}" for i in range(n)], torch.randn(n, 16, 4, 4, generator=g),
                       torch.randn(n, 16, 4, 4, generator=g), torch.randn(n, 32, 64, generator=g),
                       torch.randn(n, 32, generator=g))


def _sampler(pipe, prompts=MICRO_PROMPTS[:2]):
    return StageSampler(pipe, list(prompts), seed=7, steps=2, height=SIZE, width=SIZE, guidance=3.5)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _stage(pipe, folder, sample_every, sampler=None, steps=4):
    from artaug_ext.train.differential import train_stage

    settings = LoRATrainSettings(rank=2, batch_size=2, checkpoint_every=0, lr=2e-2, sample_every=sample_every,
                                 sample_prompts=list(MICRO_PROMPTS[:2]) if sample_every else None, sample_seed=7)
    return train_stage(pipe.dit, _cache(), "enhanced", settings, str(folder), seed=0, steps=steps, progress=False,
                       sampler=sampler)


def test_sampling_leaves_the_lora_bitwise_unchanged_and_draws_the_lora_in_training(pipe, tmp_path):
    from artaug_ext.lora import load_lora, unload_lora
    from artaug_ext.pipeline import generate_batch

    base = generate_batch(pipe, MICRO_PROMPTS[:2], [7, 7], steps=2, height=SIZE, width=SIZE)
    plain = _stage(pipe, tmp_path / "plain" / "stage2", sample_every=0)
    sampled = _stage(pipe, tmp_path / "sampled" / "stage2", sample_every=3, sampler=_sampler(pipe))
    assert sorted(plain) == sorted(sampled) and all(torch.equal(plain[k], sampled[k]) for k in plain)
    lora = os.path.join("stage2", "lora.safetensors")
    assert (tmp_path / "plain" / lora).read_bytes() == (tmp_path / "sampled" / lora).read_bytes()
    assert not (tmp_path / "plain" / "stage2" / SAMPLES_DIR).exists()
    # every 3rd step and the last: steps 3 and 4, each prompt once, from the fixed seed
    folder = tmp_path / "sampled" / "stage2"
    assert [(r["step"], r["prompt"], r["seed"]) for r in read_samples(str(folder))] == [
        (s, p, 7) for s in (3, 4) for p in MICRO_PROMPTS[:2]]
    assert sorted(os.listdir(folder / SAMPLES_DIR)) == [
        "samples.json", "step-000003-00.png", "step-000003-01.png", "step-000004-00.png", "step-000004-01.png"]
    # the last images are what the stage's LoRA, merged into the model, draws (fp32 merge rounding only)
    report = load_lora(pipe.dit, sampled)
    try:
        merged = generate_batch(pipe, MICRO_PROMPTS[:2], [7, 7], steps=2, height=SIZE, width=SIZE)
    finally:
        unload_lora(pipe.dit, report.handle)
    for i in range(2):
        last = _pixels(folder / SAMPLES_DIR / f"step-000004-0{i}.png")
        assert last.shape == (SIZE, SIZE, 3)
        assert np.abs(last - np.asarray(merged[i], dtype=np.int16)).max() <= 1
        assert np.abs(last - np.asarray(base[i], dtype=np.int16)).max() >= 8  # the LoRA changed the image
    assert not any("lora_" in n for n, _ in pipe.dit.named_parameters())  # the adapters are gone again


def test_a_stage_resumed_from_a_checkpoint_samples_again_from_there_without_duplicates(pipe, tmp_path):
    """A killed stage (images listed past its last checkpoint) resumed: the list holds each step once,
    the images equal an uninterrupted stage's byte for byte."""
    from artaug_ext.train.differential import train_stage

    settings = LoRATrainSettings(rank=2, batch_size=2, checkpoint_every=2, lr=2e-2, sample_every=1,
                                 sample_prompts=list(MICRO_PROMPTS[:1]), sample_seed=7)
    sampler = _sampler(pipe, MICRO_PROMPTS[:1])
    train_stage(pipe.dit, _cache(), "enhanced", settings, str(tmp_path / "ref"), seed=0, steps=4, progress=False,
                sampler=sampler)
    # a stage killed after step 3's images: checkpoint-2 is its newest, steps 1-3 are listed
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "ref", killed, ignore=lambda d, names: [n for n in names if n in (
        "lora.safetensors", "gap.json", "loss.jsonl", "checkpoint-4", "step-000004-00.png")])
    record = json.loads((killed / SAMPLES_DIR / "samples.json").read_text())
    record["samples"] = [r for r in record["samples"] if r["step"] <= 3]
    (killed / SAMPLES_DIR / "samples.json").write_text(json.dumps(record))
    train_stage(pipe.dit, _cache(), "enhanced", settings, str(killed), seed=0, steps=4, progress=False, sampler=sampler)
    assert [r["step"] for r in read_samples(str(killed))] == [1, 2, 3, 4]
    assert file_tree(killed / SAMPLES_DIR) == file_tree(tmp_path / "ref" / SAMPLES_DIR)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe):
    """One uninterrupted one-round micro run with every step sampled (in this process)."""
    tmp = tmp_path_factory.mktemp("samples")
    recipe = micro_recipe(tmp / "micro.toml", run={"rounds": 1}, train=SAMPLED)
    summary = run_recipe(load_recipe(str(recipe)), str(tmp / "run"), device="cpu", progress=False)
    return tmp / "run", recipe, summary


def test_every_stage_folder_holds_its_samples_by_step(reference):
    run_dir, _, summary = reference
    assert summary["rounds"][0]["train"]["stage2"]["steps"] == 3
    for stage in ("stage1", "stage2"):
        folder = run_dir / "rounds" / "round-01" / stage
        listed = read_samples(str(folder))
        # the recipe's first two training prompts (sample_prompts left out), seed 0, steps 1..3
        assert [(r["step"], r["prompt"], r["seed"]) for r in listed] == [
            (s, p, 0) for s in (1, 2, 3) for p in MICRO_PROMPTS[:2]]
        for r in listed:
            assert _pixels(folder / SAMPLES_DIR / r["file"]).shape == (64, 64, 3)  # data.size
        stage_record = json.loads((folder / "stage.json").read_text())
        assert stage_record["sample_prompts"] == MICRO_PROMPTS[:2] and stage_record["sample_every"] == 1


def test_the_report_shows_every_stage_s_samples_in_chromium(reference, tmp_path):
    import browser

    reason = browser.missing_reason()
    if reason:
        pytest.skip(reason)
    run_dir, _, _ = reference
    info = browser.open_page(str(run_dir / "report.html"), str(tmp_path / "report.png"))
    shown = [i for i in info["images"] if f"/{SAMPLES_DIR}/" in i["src"]]
    assert sorted(i["src"] for i in shown) == sorted(
        f"rounds/round-01/{stage}/{SAMPLES_DIR}/step-00000{s}-0{p}.png"
        for stage in ("stage1", "stage2") for s in (1, 2, 3) for p in (0, 1))
    assert all(i["ok"] for i in shown), [i for i in shown if not i["ok"]]  # loaded: naturalWidth > 0
    html = (run_dir / "report.html").read_text()
    assert "Round 1, stage1: sample images during training" in html
    assert "Round 1, stage2: sample images during training" in html


def test_kill_9_inside_both_stages_then_resume_neither_duplicates_nor_loses_samples(reference, tmp_path):
    """Killed inside stage 1 after step 1's images and before any checkpoint (the rerun samples
    step 1 again), then inside stage 2 after checkpoint-2, before step 3's images; the same command
    again: every stage's samples folder is byte for byte the uninterrupted run's, and so is the LoRA."""
    ref_dir, recipe, _ = reference
    args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu", "--threads", "1", "--no-progress"]
    marker = tmp_path / "paused"
    kill_when_paused(args, "step:2", marker)
    stage1 = tmp_path / "run" / "rounds" / "round-01" / "stage1"
    assert [r["step"] for r in read_samples(str(stage1))] == [1, 1] and not list(stage1.glob("checkpoint-*"))
    kill_when_paused(args, "step:6", marker)  # stage 1 again from its start (3 steps), stage 2's 3rd step
    stage2 = tmp_path / "run" / "rounds" / "round-01" / "stage2"
    assert [r["step"] for r in read_samples(str(stage2))] == [1, 1, 2, 2] and (stage2 / "checkpoint-2").is_dir()
    done = subprocess.run([sys.executable, "-m", "artaug_ext.cli", *args], env=child_env(), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("stage1", "stage2"):
        rel = os.path.join("rounds", "round-01", stage, SAMPLES_DIR)
        assert file_tree(tmp_path / "run" / rel) == file_tree(ref_dir / rel), rel
    for rel in ("rounds/round-01/lora.safetensors", "final/lora.safetensors"):
        assert (tmp_path / "run" / rel).read_bytes() == (ref_dir / rel).read_bytes(), rel


def test_the_identity_holds_the_sample_settings_only_when_samples_are_made():
    keys = set(LoRATrainSettings().identity())
    assert not keys & {"sample_every", "sample_prompts", "sample_seed"}  # as before these keys existed
    sampled = LoRATrainSettings(sample_every=5, sample_prompts=["a cat"], sample_seed=3).identity()
    assert set(sampled) - keys == {"sample_every", "sample_prompts", "sample_seed"}
    assert (sampled["sample_every"], sampled["sample_prompts"], sampled["sample_seed"]) == (5, ["a cat"], 3)
    assert LoRATrainSettings(sample_seed=9).identity() == LoRATrainSettings().identity()


def test_a_stage_sampled_with_other_prompts_is_refused_not_resumed(pipe, tmp_path):
    from artaug_ext.train.differential import train_stage

    settings = LoRATrainSettings(rank=2, batch_size=2, checkpoint_every=1, sample_every=1, sample_prompts=["a"])
    train_stage(pipe.dit, _cache(), "enhanced", settings, str(tmp_path / "s"), seed=0, steps=1, progress=False)
    settings.sample_prompts = ["b"]
    with pytest.raises(UsageError, match=r"holds a stage trained with other settings \(sample_prompts"):
        train_stage(pipe.dit, _cache(), "enhanced", settings, str(tmp_path / "s"), seed=0, steps=1, progress=False)


@pytest.mark.parametrize("keys, message", [
    ({"sample_every": -1}, r"train\.sample_every -1: must be 0 \(no sample images\) or a positive number of steps"),
    ({"sample_every": 2, "sample_prompts": []}, r"train\.sample_prompts \[\]: is an empty list"),
    ({"sample_every": 2, "sample_prompts": ["a red square", "  "]}, r"train\.sample_prompts .*: prompt 2 is empty"),
    ({"sample_prompts": ["a red square"]}, r"train\.sample_prompts .*: is set but train\.sample_every is 0"),
    ({"sample_every": 2, "sample_seed": -1}, r"train\.sample_seed -1: must be 0 or more and below 2\*\*63"),
    ({"sample_every": 2, "sample_seed": 2 ** 63}, r"train\.sample_seed \d+: must be 0 or more"),
    ({"sample_every": 1.5}, r"train\.sample_every = 1\.5 must be int"),
    ({"sample_prompts": "a cat"}, r"train\.sample_prompts = 'a cat' must be list\[str\] \| None"),
])
def test_bad_sample_values_are_one_line_naming_the_key_before_any_model_loads(tmp_path, monkeypatch, capsys, keys,
                                                                              message):
    from artaug_ext import pipeline
    from artaug_ext.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline, "load_pipeline", no_model)
    path = micro_recipe(tmp_path / "micro.toml", train=keys)
    with pytest.raises(UsageError, match=r"micro\.toml:\d+: " + message) as e:
        load_recipe(str(path))
    assert "\n" not in str(e.value)
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.sample_" in err, err
    assert not (tmp_path / "run" / "rounds").exists()


def test_a_run_recorded_before_the_sample_keys_existed_resumes(tmp_path):
    from artaug_ext.recipe.runner import _check_run_json

    out, recipe = run_recorded_before(tmp_path, {"train": ("sample_every", "sample_prompts", "sample_seed")})
    _check_run_json(str(out), recipe)  # the defaults: the same run
    sampled = load_recipe(str(micro_recipe(tmp_path / "other.toml", train={"sample_every": 2})))
    with pytest.raises(UsageError, match=r"holds a run of another recipe \(recipe\.train\.sample_every"):
        _check_run_json(str(out), sampled)
