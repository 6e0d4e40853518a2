"""`artaug run` on a micro recipe (tiny-random, 64 px, a few steps): the whole loop, exact
combination, resume after kill -9 in the cache and in both stages, dry runs, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import MICRO_PROMPTS, REPO, child_env, kill_when_paused, micro_recipe
from safetensors.torch import load_file

from artaug_ext.errors import UsageError
from artaug_ext.recipe.config import load_recipe
from artaug_ext.recipe.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = MICRO_PROMPTS


def micro(tmp_path, name="micro.toml", mode="batched", margin=-1.0, final_rank=None, extra=""):
    """The micro recipe, which keeps every enhanced pair (margin -1): training always has data."""
    return micro_recipe(tmp_path / name, extra, run={"final_rank": final_rank}, filter={"margin": margin},
                        train={"mode": mode})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe):
    """One uninterrupted micro run (in this process, one torch thread)."""
    tmp = tmp_path_factory.mktemp("ref")
    summary = run_recipe(load_recipe(str(micro(tmp))), str(tmp / "run"), device="cpu", progress=False)
    return tmp / "run", summary


def _delta(sd_path):
    """{module: B @ A} of a LoRA file, through our reader (any format)."""
    from artaug_ext.lora import lora_layers

    return {k: (v.B.double() @ v.A.double()) for k, v in lora_layers(str(sd_path)).items()}


def test_the_whole_loop_runs_and_the_final_lora_is_the_exact_sum(reference, pipe):
    run_dir, summary = reference
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and summary["stopped"] is None
    for r in summary["rounds"]:
        assert r["kept"] >= 1 and r["trained_pairs"] == r["kept"] and r["train"]["stage2"]["steps"] == 3
        assert os.path.isfile(run_dir / r["lora"])
    final = run_dir / "final"
    assert {"lora.safetensors", "lora_diffsynth.safetensors", "model_card.json"} <= set(os.listdir(final))
    card = json.loads((final / "model_card.json").read_text())
    assert card["base_model"] == "tiny-random" and len(card["rounds"]) == 2 and card["recipe"]["train"]["rank"] == 2
    assert card["counts"]["prompts"] == 3 and set(card["base_model_sha256"]) >= {"dit", "vae"}
    rounds = [_delta(run_dir / r["lora"]) for r in summary["rounds"]]
    for name in ("lora.safetensors", "lora_diffsynth.safetensors"):
        combined = _delta(final / name)
        assert set(combined) == set(rounds[0]) | set(rounds[1])
        for key, d in combined.items():
            want = sum(r[key] for r in rounds if key in r)
            assert float((d - want).abs().max()) <= 1e-6 * max(float(want.abs().max()), 1e-12), key
    assert os.path.isfile(run_dir / "report.html")


def test_the_final_lora_loads_where_users_load_loras(reference, tmp_path):
    """kohya keys with .alpha = rank: our loader, and DiffSynth's own FluxLoRALoader key mapping."""
    from artaug_ext.cli import main

    run_dir, _ = reference
    out = tmp_path / "with.png"
    assert main(["generate", "--model", "tiny-random", "--prompt", PROMPTS[0], "--lora",
                 str(run_dir / "final" / "lora.safetensors"), "--steps", "1", "--height", "32", "--width", "32",
                 "--out", str(out)]) == 0
    assert out.exists()
    sd = load_file(str(run_dir / "final" / "lora.safetensors"))
    assert all(k.startswith("lora_unet_") for k in sd)


def test_unmerging_lora_1_restores_the_base_bit_for_bit(pipe, tmp_path):
    from artaug_ext.train.cache import LatentCache
    from artaug_ext.train.differential import LoRATrainSettings, train_round_lora

    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    cache = LatentCache(["a", "b"], torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g),
                        torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, generator=g))
    settings = LoRATrainSettings(rank=2, steps_stage1=2, steps_stage2=2, batch_size=2, checkpoint_every=0, lr=1e-2)
    result = train_round_lora(pipe.dit, cache, settings, str(tmp_path / "round"), progress=False)
    after = pipe.dit.state_dict()
    assert list(after) == list(before)  # the adapters are gone
    assert all(torch.equal(after[k], v) for k, v in before.items())  # and LoRA_1 is unmerged exactly
    assert result.state and os.path.isfile(result.path)

    # per-pair: the round's LoRA is the exact average of the pairs' LoRA_2s (before truncation)
    settings = LoRATrainSettings(mode="per-pair", rank=2, per_pair_rank=4, steps_stage1=2, steps_stage2=2,
                                 batch_size=1, checkpoint_every=0, lr=1e-2)
    result = train_round_lora(pipe.dit, cache, settings, str(tmp_path / "pp"), progress=False)
    pairs = [_delta(tmp_path / "pp" / f"pair-{i}" / "stage2" / "lora.safetensors") for i in ("a", "b")]
    avg = _delta(result.path)
    for key, d in avg.items():
        want = (pairs[0][key] + pairs[1][key]) / 2
        assert float((d - want).abs().max()) <= 1e-6 * float(want.abs().max()), key
    assert result.info["energy_min"] == 1.0  # rank 2 + 2 fits in rank 4: nothing truncated
    settings.per_pair_rank = None  # the default: back to rank 2, with the retained energy reported
    result = train_round_lora(pipe.dit, cache, settings, str(tmp_path / "pp"), progress=False)
    assert 0 < result.info["energy_min"] < 1
    assert all(torch.equal(pipe.dit.state_dict()[k], v) for k, v in before.items())
    # sft: one stage on the enhanced images
    settings = LoRATrainSettings(mode="sft", rank=2, steps_stage2=2, batch_size=2, checkpoint_every=0)
    result = train_round_lora(pipe.dit, cache, settings, str(tmp_path / "sft"), progress=False)
    assert not os.path.exists(tmp_path / "sft" / "stage1") and os.path.isfile(result.path)


def test_kill_9_in_the_cache_and_in_both_stages_then_resume_gives_the_same_lora(reference, tmp_path):
    """Killed after the 2nd cached pair of round 1, inside round 1's stage 1 (its 2nd step, before
    that step's checkpoint) and inside round 2's stage 2, then the same command again: the
    round and final LoRA files are bitwise those of the uninterrupted run."""
    ref_dir, _ = reference
    recipe = micro(tmp_path)
    args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu", "--threads", "1", "--no-progress"]
    marker = tmp_path / "paused"
    kill_when_paused(args, "cache:2", marker)
    assert (tmp_path / "run" / "rounds" / "round-01" / "cache").is_dir()
    kill_when_paused(args, "step:2", marker)
    # counted from this process's start: round 1's stage 1 resumes at step 2 (2 steps), its stage 2 (3),
    # round 2's stage 1 (3), then the 2nd step of round 2's stage 2
    kill_when_paused(args, "step:10", marker)
    assert (tmp_path / "run" / "rounds" / "round-02" / "stage2").is_dir()
    assert not (tmp_path / "run" / "rounds" / "round-02" / "lora.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "artaug_ext.cli", *args], env=child_env(), capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("lora.safetensors", "lora_diffsynth.safetensors"):
        assert (tmp_path / "run" / "final" / name).read_bytes() == (ref_dir / "final" / name).read_bytes(), name
    for r in (1, 2):
        rel = f"rounds/round-{r:02d}/lora.safetensors"
        assert (tmp_path / "run" / rel).read_bytes() == (ref_dir / rel).read_bytes(), rel


def test_dry_run_of_every_shipped_recipe(capsys):
    from artaug_ext.cli import main

    for name in ("smoke.toml", "tiny_artaug.toml", "flux_dev_artaug.toml", "flux_dev_artaug_8gpu.toml"):
        path = os.path.join(REPO, "recipes", name)
        assert main(["run", path, "--dry-run", "--gpus", "8" if "8gpu" in name else "1"]) == 0, name
        out = capsys.readouterr().out
        assert "needs:" in out and "estimate" in out and "GPU-hours" in out and "source:" in out, (name, out)
        if "flux" in name:
            assert "black-forest-labs/FLUX.1-dev" in out and "Qwen/Qwen2-VL-72B-Instruct" in out
            assert "240 prompts x 8 images = 1920 items a round" in out
        else:
            assert "embedded in artaug-ext" in out


def test_bad_recipes_name_the_file_line_key_and_fix(tmp_path):
    good = micro(tmp_path, "good.toml").read_text()
    cases = [
        (good.replace("rank = 2", "rnak = 2"), r"bad.toml:\d+: \[train\] has no key 'rnak'; known keys: mode, rank"),
        (good.replace("rank = 2", 'rank = "two"'), r"bad.toml:\d+: train.rank = 'two' must be int"),
        (good.replace('model = "tiny-random"', ""), r"bad.toml:\d+: run.model is required"),
        (good + "\n[trian]\nx = 1\n", r"unknown table \[trian\]"),
        (good.replace('mode = "batched"', 'mode = "both"'), r"train.mode 'both': use one of batched, per-pair, sft"),
        (good.replace('model = "tiny-random"', 'model = "sdxl"'), r"run.model 'sdxl' is not a base model"),
        (good.replace("[data]\nprompts =", "[data]\nprompts = 'nope.txt'\nx ="), r"has no key 'x'"),
        (good.replace("size = 64", "size = 65"), r"data.size 65 must be N or \[width, height\], multiples of 16"),
        ("[run\nmodel = 1", r"not valid TOML"),
    ]
    for text, message in cases:
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(UsageError if "TOML" not in message else Exception, match=message):
            load_recipe(str(tmp_path / "bad.toml"))
    (tmp_path / "bad.toml").write_text(good.replace(json.dumps(PROMPTS), '"missing.txt"'))
    with pytest.raises(UsageError, match="data.prompts file .*missing.txt does not exist"):
        load_recipe(str(tmp_path / "bad.toml"))


def test_rank_larger_than_a_layer_is_refused_before_any_image(tmp_path, pipe, monkeypatch):
    from artaug_ext import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pipe)
    recipe = load_recipe(str(micro(tmp_path).rename(tmp_path / "r.toml")))
    recipe.train.rank = 4096
    with pytest.raises(UsageError, match=r"r.toml: \[train\] LoRA rank 4096 exceeds layer .*use a rank <="):
        run_recipe(recipe, str(tmp_path / "run"), device="cpu", progress=False)
    assert not (tmp_path / "run" / "rounds").exists()


def test_a_changed_recipe_does_not_resume_and_nothing_is_overwritten(reference, tmp_path):
    ref_dir, _ = reference
    changed = micro(tmp_path, margin=-0.5)
    before = {p: os.path.getmtime(p) for p in (ref_dir / "final").iterdir()}
    with pytest.raises(UsageError, match=r"holds a run of another recipe \(recipe.filter.margin: -1.0 -> -0.5\)"):
        run_recipe(load_recipe(str(changed)), str(ref_dir), device="cpu", progress=False)
    assert {p: os.path.getmtime(p) for p in (ref_dir / "final").iterdir()} == before


def test_a_round_that_keeps_nothing_ends_the_run_cleanly(tmp_path, pipe, monkeypatch, capsys):
    from artaug_ext import pipeline
    from artaug_ext.cli import main

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pipe)
    recipe = micro(tmp_path, margin=10.0)  # no gain is that large
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "round 1 kept no pairs (of 3 items): nothing to learn from" in out and "no LoRA was trained" in out
    assert not (tmp_path / "run" / "final").exists()


def test_missing_or_corrupt_pair_image_is_named(reference, tmp_path, pipe):
    from artaug_ext.errors import FileFormatError
    from artaug_ext.interact.images import load_image
    from artaug_ext.interact.pairs import read_pairs

    ref_dir, _ = reference
    pairs = read_pairs(str(ref_dir / "rounds" / "round-01" / "interact"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(open(pairs[0].original, "rb").read()[:200])
    with pytest.raises(FileFormatError, match="broken.png: not a readable image"):
        load_image(str(bad))
    import shutil

    copy = tmp_path / "interact"
    shutil.copytree(ref_dir / "rounds" / "round-01" / "interact", copy)
    os.remove(copy / pairs[0].enhanced.split("interact/")[1])
    with pytest.raises(FileFormatError, match=r"\.enhanced\.png: missing image of a kept pair"):
        read_pairs(str(copy))


def test_run_report_renders_in_headless_chromium(reference, tmp_path):
    import browser

    reason = browser.missing_reason()
    if reason:
        pytest.skip(reason)
    run_dir, summary = reference
    assert summary["report"] == "report.html"
    info = browser.open_page(str(run_dir / "report.html"), str(tmp_path / "run.png"))
    assert info["title"] == "artaug run: run" and info["scripts"] == 0
    assert info["images"] and all(i["ok"] for i in info["images"]), [i for i in info["images"] if not i["ok"]]
    assert [r.split("\t")[0] for r in info["rows"][1:3]] == ["1", "2"]  # the rounds table
    assert info["svgs"] >= 4  # kept share, gain, one loss plot per round
