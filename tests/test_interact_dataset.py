"""Pair datasets: manifest contents, resume after SIGKILL at several points, sharding, export, scorers."""

import csv
import json
import os
import time

import pytest
import torch
from helpers import file_tree, kill_when_paused, ranks_in_turn
from PIL import Image

from artaug_ext.eval.prompts import read_prompt_file
from artaug_ext.files import atomic_write_bytes
from artaug_ext.interact.config import InteractConfig
from artaug_ext.interact.export import export_pairs
from artaug_ext.interact.keep import FilterConfig, keep_pair
from artaug_ext.interact.loop import run_interact
from artaug_ext.interact.manifest import merge_manifests, read_manifest
from artaug_ext.interact.parse import Suggestion
from artaug_ext.interact.pictures import pair_picture
from artaug_ext.interact.scorers import HeuristicScorer, make_scorer


def read_prompts(path):
    """What `artaug interact --prompts` reads."""
    return [item.prompt for item in read_prompt_file(path)]


PROMPTS = ["a red circle on a blue background, dim light", "a yellow star in the top left, bright light",
           "a white square on a black background, overexposed", "a green triangle in the center"]
SIZE, STEPS = 64, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # and `pipe`: tests/conftest.py


def cfg(**kw):
    base = dict(prompts=PROMPTS, model="tiny-random", steps=STEPS, height=SIZE, width=SIZE)
    base.update(kw)
    return InteractConfig(**base)


def test_run_writes_manifest_pngs_and_resumes_without_redoing(tmp_path, pipe, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = tmp_path / "run"
    stats = run_interact(cfg(prompts=PROMPTS[:2], images_per_prompt=2), str(run), pipe=pipe, progress=False)
    assert stats["items"] == 4 and stats["processed"] == 4 and stats["merged"] == 4
    records = read_manifest(str(run / "manifest.jsonl"))
    assert [r["id"] for r in records] == [f"{p:05d}-{i:02d}" for p in range(2) for i in range(2)]
    assert len({r["seed"] for r in records}) == 4
    for r in records:
        assert r["prompt"] == PROMPTS[r["prompt_index"]]
        assert set(r["model_sha256"]) >= {"dit", "vae", "text_encoder", "text_encoder_2"}
        assert all(len(h) == 64 for h in r["model_sha256"].values()) and r["loras"] == []
        assert Image.open(run / r["original"]).size == (SIZE, SIZE)
        if r["suggestions"]:
            assert Image.open(run / r["enhanced"]).size == (SIZE, SIZE)
            assert set(r["scores"]) == {"original", "enhanced"} and isinstance(r["kept"], bool)
        if r["kept"]:
            assert Image.open(run / r["picture"]).size[0] == 2 * SIZE + 4
    before = file_tree(run)
    again = run_interact(cfg(prompts=PROMPTS[:2], images_per_prompt=2), str(run), pipe=pipe, progress=False)
    assert again["processed"] == 0 and file_tree(run) == before
    with pytest.raises(ValueError, match="other settings"):
        run_interact(cfg(prompts=PROMPTS[:2], images_per_prompt=2, seed=7), str(run), pipe=pipe, progress=False)


def test_lora_in_diffsynth_training_format_is_merged(tmp_path, pipe):
    """--lora with the previous round's LoRA (DiffSynth's training keys, as artaug_ext.train
    writes them) must change the DiT: DiffSynth's own pipe.load_lora merged 0 tensors of it."""
    from safetensors.torch import save_file

    from artaug_ext.interact.loop import InteractRun

    w = pipe.dit.blocks[0].attn.a_to_qkv.weight
    g = torch.Generator().manual_seed(0)
    lora = {"blocks.0.attn.a_to_qkv.lora_A.default.weight": torch.randn(4, w.shape[1], generator=g),
            "blocks.0.attn.a_to_qkv.lora_B.default.weight": torch.randn(w.shape[0], 4, generator=g)}
    path = str(tmp_path / "round1.safetensors")
    save_file(lora, path)
    run = InteractRun(cfg(loras=[(path, 0.5)]), str(tmp_path / "run"), device="cpu", progress=False)
    delta = run.pipe.dit.blocks[0].attn.a_to_qkv.weight.float() - w.float()
    expected = 0.5 * lora["blocks.0.attn.a_to_qkv.lora_B.default.weight"] @ lora["blocks.0.attn.a_to_qkv.lora_A.default.weight"]
    assert torch.allclose(delta, expected, atol=1e-4) and run.lora_sha[0]["path"] == "round1.safetensors"


def test_transformers_critic_stays_on_its_rank_device(tmp_path, pipe, monkeypatch):
    from artaug_ext.interact import critics
    from artaug_ext.interact.loop import InteractRun

    seen = {}
    monkeypatch.setattr(critics, "make_critic", lambda name, **options: seen.update(options) or object())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = cfg(critic="transformers", critic_options={"path": "some/vlm"})
    InteractRun(config, str(tmp_path / "run"), pipe=pipe, scorer=HeuristicScorer(), device="cuda", progress=False,
                collective=ranks_in_turn())
    want = "cuda:1" if torch.cuda.is_available() else "cpu"
    assert seen == {"path": "some/vlm", "device_map": want} and config.critic_options == {"path": "some/vlm"}


def test_sharded_ranks_merge_to_the_single_rank_manifest(tmp_path, pipe, monkeypatch):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    run_interact(cfg(prompts=PROMPTS[:3]), str(single), pipe=pipe, progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        stats = run_interact(cfg(prompts=PROMPTS[:3]), str(sharded), pipe=pipe, progress=False,
                             collective=ranks_in_turn())
        assert stats["processed"] == (2 if rank == 0 else 1)
    assert stats["merged"] == 3
    a, b = file_tree(single), file_tree(sharded)
    assert a["manifest.jsonl"] == b["manifest.jsonl"]
    assert {k: v for k, v in a.items() if k.startswith(("images", "pictures"))} == \
           {k: v for k, v in b.items() if k.startswith(("images", "pictures"))}
    assert sorted(k for k in b if k.startswith("shards/manifest")) == [
        "shards/manifest-rank00000-of-00002.jsonl", "shards/manifest-rank00001-of-00002.jsonl"]


def test_torn_manifest_line_is_repaired(tmp_path, pipe, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = tmp_path / "run"
    run_interact(cfg(prompts=PROMPTS[:2]), str(run), pipe=pipe, progress=False)
    shard = run / "shards" / "manifest-rank00000-of-00001.jsonl"
    full = shard.read_bytes()
    lines = full.splitlines(keepends=True)
    shard.write_bytes(lines[0] + lines[1][:40])  # killed while appending the second line:
    (run / "shards" / "done-rank00000-of-00001").unlink()  # ... so the rank never finished
    assert len(read_manifest(str(shard))) == 1
    stats = run_interact(cfg(prompts=PROMPTS[:2]), str(run), pipe=pipe, progress=False)
    assert stats["processed"] == 1 and shard.read_bytes() == full


def _write_many(path, data, n):
    for _ in range(n):
        atomic_write_bytes(path, data, shared=True)


def test_shared_atomic_writes_from_two_processes(tmp_path):
    """Two ranks may write run.json / manifest.jsonl at the same moment: neither may fail
    (with one temporary name the second rename raised FileNotFoundError) and the file is whole."""
    import multiprocessing

    path, data = str(tmp_path / "manifest.jsonl"), b"x" * 100_000
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, data, 200)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert open(path, "rb").read() == data and os.listdir(tmp_path) == ["manifest.jsonl"]


def test_export_for_diffsynth_trainer(tmp_path, pipe, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run, out = tmp_path / "run", tmp_path / "export"
    # margin -1: keep every enhanced pair, so the export has rows whatever the scores are
    run_interact(cfg(prompts=PROMPTS[:3], filter=FilterConfig(margin=-1.0, alignment_tolerance=1.0)), str(run), pipe=pipe,
                 progress=False)
    kept = [r for r in read_manifest(str(run / "manifest.jsonl")) if r["kept"]]
    assert kept
    n = export_pairs(str(run), str(out))
    assert n == len(kept)
    for which in ("original", "enhanced"):
        with open(out / which / "metadata.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["prompt"] for r in rows] == [k["prompt"] for k in kept]
        assert all((out / which / r["image"]).is_file() for r in rows)
        jl = [json.loads(line) for line in (out / which / "metadata.jsonl").read_text().splitlines()]
        assert jl == rows
    assert export_pairs(str(run), str(tmp_path / "half"), keep_fraction=0.5) == (len(kept) + 1) // 2
    assert merge_manifests(str(run)) == 3


def test_keep_rule_and_heuristic_scorer():
    s = HeuristicScorer()
    a, b = {"quality": 0.5, "colour_match": 1.0, "prompt_match": 1.0}, {"quality": 0.6, "colour_match": 1.0, "prompt_match": 1.0}
    assert keep_pair(a, b, s, FilterConfig(margin=0.05))[0]
    assert not keep_pair(a, b, s, FilterConfig(margin=0.2))[0]
    assert keep_pair(a, b, s, FilterConfig(margin=0.15, relative=True))[0]  # +20% relative
    worse_text = dict(b, colour_match=0.5)
    keep, why, _ = keep_pair(a, worse_text, s, FilterConfig())
    assert not keep and "alignment" in why
    assert keep_pair(a, worse_text, s, FilterConfig(alignment_tolerance=0.5))[0]
    red = Image.new("RGB", (32, 32), (220, 40, 40))
    assert s.score([red], "a red circle")[0]["colour_match"] == 1.0
    assert s.score([red], "a blue circle")[0]["colour_match"] == 0.0


def test_metric_scorers_never_download(monkeypatch, tmp_path):
    from artaug_ext.hub import MissingModelError

    monkeypatch.setenv("ARTAUG_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(MissingModelError, match="DiffSynth-Studio/ImageMetrics"):
        make_scorer("heuristic+aesthetic", model_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("mps")


def test_pair_picture_and_prompt_files(tmp_path):
    img = Image.new("RGB", (64, 48), (10, 10, 10))
    pic = pair_picture(img, img, [Suggestion((0.1, 0.1, 0.5, 0.5), "bright light", "exposure")], "a prompt")
    assert pic.size[0] == 132 and pic.size[1] > 48
    assert pic.getpixel((int(0.1 * 64), int(0.3 * 48))) != (10, 10, 10)  # box outline drawn
    (tmp_path / "p.txt").write_text("# comment\n\na red circle\n  a blue star  \n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a red circle", "a blue star"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="p.jsonl:2"):
        read_prompts(str(tmp_path / "p.jsonl"))


# ---------------------------------------------------------------------------- SIGKILL and resume


def _cli(run_dir, prompts_file):
    return ["interact", "--prompts", str(prompts_file), "--out", str(run_dir), "--model", "tiny-random", "--steps",
            str(STEPS), "--size", str(SIZE), "--no-progress", "--threads", "1"]


def test_sigkill_at_three_points_then_resume_is_byte_identical(tmp_path, pipe, monkeypatch):
    """`artaug interact` SIGKILLed between items, inside a PNG write and half-way through a
    manifest line, then resumed, ends byte-identical to an uninterrupted run. (The uninterrupted
    run and the last resume run in this process to keep the test short; the killed runs are
    real subprocesses of the CLI.)"""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:3]) + "\n")
    reference, run, marker = tmp_path / "reference", tmp_path / "run", tmp_path / "paused"
    config = cfg(prompts=read_prompts(str(prompts_file)), critic_options={"max_suggestions": 3})
    run_interact(config, str(reference), pipe=pipe, progress=False)  # uninterrupted
    cmd = _cli(run, prompts_file)
    shard = run / "shards" / "manifest-rank00000-of-00001.jsonl"
    kill_when_paused(cmd, "item:2", marker)       # between items (first item done)
    assert len(read_manifest(str(shard))) == 1
    kill_when_paused(cmd, "png:2", marker)        # in the middle of writing a PNG
    assert any(name.endswith(".png.tmp") for name in file_tree(run)), "the kill should land inside the atomic write"
    kill_when_paused(cmd, "manifest:1", marker)   # half-way through a manifest line
    assert not shard.read_bytes().endswith(b"\n") and len(read_manifest(str(shard))) == 1
    stats = run_interact(config, str(run), pipe=pipe, progress=False)  # the resume
    assert stats["processed"] == 2 and stats["items"] == 3
    ref, got = file_tree(reference), file_tree(run)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name] == ref[name], name


def test_cli_errors_are_one_line(tmp_path, capsys):
    from artaug_ext.cli import build_parser, main

    assert main(["interact", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("artaug: error: --prompts") and "\n" not in err
    assert main(["interact-export", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    args = build_parser().parse_args(["interact", "--prompts", "p", "--out", "o", "--size", "128x64",
                                      "--lora", "x.safetensors:0.5"])
    assert args.size == (128, 64) and args.lora == [("x.safetensors", 0.5)] and args.run.__name__ == "run_interact"


def test_concurrent_critic_chunks_keep_order_and_results(tmp_path, pipe, monkeypatch):
    from artaug_ext.interact.critics import HeuristicCritic

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    class Concurrent(HeuristicCritic):
        max_concurrency = 3
        batches = []

        def critique_many(self, items):
            self.batches.append(len(items))
            return [self.critique(im, p) for im, p in items]

    critic = Concurrent()
    run_interact(cfg(), str(tmp_path / "a"), pipe=pipe, critic=critic, progress=False)
    run_interact(cfg(), str(tmp_path / "b"), pipe=pipe, progress=False)
    assert critic.batches == [3]  # then one item alone through critique()
    a, b = file_tree(tmp_path / "a"), file_tree(tmp_path / "b")
    assert a["manifest.jsonl"] == b["manifest.jsonl"]
    assert {k: v for k, v in a.items() if k.startswith("images")} == {k: v for k, v in b.items() if k.startswith("images")}
