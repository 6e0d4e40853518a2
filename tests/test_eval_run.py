"""`artaug eval` on the untrained tiny model: the table matches a recomputation from the saved
images, a second eval scores nothing again, bad input is one line, the report renders."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from artaug_ext.cli import main
from artaug_ext.eval.layout import image_path
from artaug_ext.eval.prompts import PromptItem
from artaug_ext.eval.run import Arm, EvalConfig, run_eval

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [PromptItem("a red circle in the center on a blue background, dim light", "dim"),
           PromptItem("a yellow star on the left on a green background, overexposed", "over"),
           PromptItem("a white square at the top on a black background", "normal"),
           PromptItem("a photo of a cat on a sofa", "other")]  # outside the analyser's grammar: NaN there


def random_lora(path, pipe, scale=0.3, seed=0):
    """A DiffSynth-format LoRA for the tiny-random DiT (what `artaug run` writes, random)."""
    from artaug_ext.files import save_safetensors

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in pipe.dit.named_modules():
        if name.endswith(("a_to_qkv", "to_qkv_mlp")):
            out_f, in_f = module.weight.shape
            sd[f"{name}.lora_A.default.weight"] = torch.randn(2, in_f, generator=g) * scale
            sd[f"{name}.lora_B.default.weight"] = torch.randn(out_f, 2, generator=g) * scale
    save_safetensors(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, pipe):
    tmp = tmp_path_factory.mktemp("eval")
    lora = random_lora(tmp / "lora.safetensors", pipe)
    cfg = EvalConfig(model="tiny-random", arms=[Arm("base"), Arm("lora", [(lora, 1.0)])], prompts=PROMPTS, seeds=2,
                     seed=5, steps=2, width=32, height=32, scorer="heuristic+analyser", batch_size=3, n_boot=500)
    result = run_eval(cfg, str(tmp / "out"), pipe=pipe, progress=False)
    return tmp / "out", cfg, result


def test_table_matches_an_independent_recomputation_from_the_saved_images(evaluated):
    from artaug_ext.interact.scorers import HeuristicScorer

    out, cfg, result = evaluated
    assert result["timing"]["generated_images"] == 16
    scorer = HeuristicScorer()  # the scorer called directly on the files
    q = {arm: np.array([scorer.score([Image.open(image_path(str(out), arm, p, k)).convert("RGB")], item.prompt)[0]
                        ["quality"] for p, item in enumerate(cfg.prompts) for k in range(cfg.seeds)])
         for arm in ("base", "lora")}
    row = result["comparisons"]["lora"]["quality"]
    d = q["lora"] - q["base"]
    assert row["mean_a"] == pytest.approx(q["lora"].mean(), abs=1e-12)
    assert row["mean_b"] == pytest.approx(q["base"].mean(), abs=1e-12)
    assert row["mean_diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert row["win_rate"] == pytest.approx(((d > 0) + 0.5 * (d == 0)).mean(), abs=1e-12)
    assert row["diff_ci"][0] <= row["mean_diff"] <= row["diff_ci"][1] and row["n"] == 8 and row["prompts"] == 4
    # the analyser reads only scene captions: the cat prompt is left out of its rows
    assert result["comparisons"]["lora"]["match"]["n"] == 6
    assert result["comparisons"]["lora"]["mps"]["kind"] == "unavailable"
    assert set(result["comparisons"]["lora"]["quality"]["by_category"]) == {"dim", "over", "normal", "other"}
    # the same seeds in both arms, and a LoRA that changes the images
    a = np.asarray(Image.open(image_path(str(out), "base", 0, 0)), dtype=int)
    b = np.asarray(Image.open(image_path(str(out), "lora", 0, 0)), dtype=int)
    assert np.abs(a - b).mean() > 0.5
    saved = json.loads((out / "results.json").read_text())
    assert saved["comparisons"]["lora"]["quality"]["mean_diff"] == row["mean_diff"]


def test_second_eval_runs_no_scorer_forward_pass(evaluated, pipe):
    out, cfg, first = evaluated
    assert first["timing"]["scorer_forward_passes"] == 16 * 2  # 16 images x (heuristic, analyser)

    class NoPipe:
        pass

    again = run_eval(cfg, str(out), pipe=NoPipe(), progress=False)  # nothing to generate, nothing to score
    assert again["timing"]["generated_images"] == 0 and again["timing"]["scorer_forward_passes"] == 0
    assert again["timing"]["score_cache_hits"] == 32
    assert again["comparisons"] == json.loads(json.dumps(first["comparisons"]))


def test_batched_generation_equals_one_by_one(pipe):
    from artaug_ext.pipeline import generate, generate_batch

    prompts, seeds = [PROMPTS[0].prompt, PROMPTS[1].prompt, PROMPTS[0].prompt], [1, 2, 3]
    batch = generate_batch(pipe, prompts, seeds, steps=2, height=32, width=48)
    for image, prompt, seed in zip(batch, prompts, seeds, strict=True):
        single = generate(pipe, prompt, seed=seed, steps=2, height=32, width=48, progress=False)
        assert image.size == (48, 32)
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(single, dtype=int)).max() <= 1


def test_tiny_metric_scorers_through_the_eval_with_pickscore_as_a_preference(tmp_path, pipe):
    from artaug_ext.interact.scorers import make_scorer
    from artaug_ext.tiny.metrics import ensure_tiny_metrics

    metrics = ensure_tiny_metrics(str(tmp_path / "metrics"))
    scorer = make_scorer("aesthetic+pickscore+clip", model_dir=metrics, device="cpu")
    cfg = EvalConfig(model="tiny-random", arms=[Arm("base"), Arm("lora", [(random_lora(tmp_path / "l.safetensors", pipe),
                                                                           1.0)])],
                     prompts=PROMPTS[:3], seeds=2, steps=1, width=32, height=32, scorer="aesthetic+pickscore+clip",
                     n_boot=200)
    result = run_eval(cfg, str(tmp_path / "out"), pipe=pipe, scorer=scorer, progress=False, report=False)
    rows = result["comparisons"]["lora"]
    assert rows["pickscore"]["kind"] == "preference" and 0 < rows["pickscore"]["preference"] < 1
    assert rows["aesthetic"]["kind"] == "quality" and rows["clip"]["kind"] == "alignment"
    # preference = mean softmax over each pair's two PickScores, recomputed from the cache
    records = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    pick = {r["image"]: r["scores"]["pickscore"] for r in records if "pickscore" in r["scores"]}
    from artaug_ext.eval.scoring import image_sha256

    probs = []
    for p in range(3):
        for k in range(2):
            a = pick[image_sha256(image_path(str(tmp_path / "out"), "lora", p, k))]
            b = pick[image_sha256(image_path(str(tmp_path / "out"), "base", p, k))]
            probs.append(1 / (1 + np.exp(b - a)))
    assert rows["pickscore"]["preference"] == pytest.approx(np.mean(probs), abs=1e-9)


def _one_line(capsys, args, *expected):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, (args, err)
    for e in expected:
        assert e in err, (args, err)


def test_bad_input_is_one_line_before_any_image(tmp_path, capsys, pipe, monkeypatch):
    from artaug_ext import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pipe)
    lora = random_lora(tmp_path / "l.safetensors", pipe)
    common = ["eval", "--model", "tiny-random", "--lora", lora, "--steps", "1", "--size", "32", "--no-progress"]
    (tmp_path / "p.xyz").write_bytes(b"\x00\x01binary")
    _one_line(capsys, common + ["--prompts", str(tmp_path / "p.xyz"), "--out", str(tmp_path / "o1")],
              "p.xyz", "PartiPrompts", "DrawBench")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    _one_line(capsys, common + ["--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o2")], "empty.txt")
    with pytest.raises(SystemExit):
        main(common + ["--prompts", "tiny-heldout:2", "--seeds", "0", "--out", str(tmp_path / "o3")])
    assert "must be positive" in capsys.readouterr().err
    # a LoRA of another model: refused before any image is written
    from artaug_ext.files import save_safetensors

    save_safetensors({"blocks.0.attn.a_to_qkv.lora_A.default.weight": torch.zeros(2, 3072),
                      "blocks.0.attn.a_to_qkv.lora_B.default.weight": torch.zeros(9216, 2)}, str(tmp_path / "big.safetensors"))
    _one_line(capsys, ["eval", "--model", "tiny-random", "--lora", str(tmp_path / "big.safetensors"), "--prompts",
                       "tiny-heldout:2", "--steps", "1", "--size", "32", "--out", str(tmp_path / "o4"), "--no-progress"],
              "arm big", "shape mismatch")
    assert not (tmp_path / "o4" / "images").exists()
    # metric weights missing offline: the ModelScope id and the fix
    monkeypatch.setenv("ARTAUG_OFFLINE", "1")
    _one_line(capsys, common + ["--prompts", "tiny-heldout:2", "--scorer", "aesthetic", "--out", str(tmp_path / "o5"),
                                "--model-dir", str(tmp_path / "nothing")],
              "DiffSynth-Studio/ImageMetrics", "artaug download")
    monkeypatch.delenv("ARTAUG_OFFLINE")
    # an output folder that belongs to another eval
    assert main(common + ["--prompts", "tiny-heldout:2", "--seeds", "1", "--out", str(tmp_path / "o6")]) == 0
    capsys.readouterr()
    before = sorted(os.listdir(tmp_path / "o6" / "images" / "l"))
    _one_line(capsys, common + ["--prompts", "tiny-heldout:3", "--seeds", "1", "--out", str(tmp_path / "o6")],
              "belongs to another eval")
    assert sorted(os.listdir(tmp_path / "o6" / "images" / "l")) == before
    _one_line(capsys, ["eval", "--model", "tiny-random", "--prompts", "tiny-heldout:2", "--out", str(tmp_path / "o7")],
              "nothing to compare")


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    import browser

    reason = browser.missing_reason()
    if reason:
        pytest.skip(reason)
    out, _, _ = evaluated
    info = browser.open_page(str(out / "report.html"), str(tmp_path / "eval.png"))
    assert info["title"].startswith("artaug eval")
    assert info["images"] and all(i["ok"] for i in info["images"]), [i for i in info["images"] if not i["ok"]]
    rows = info["rows"]
    assert any(r.startswith("quality") for r in rows) and any(r.startswith("match") for r in rows)
    assert any(r.startswith("mps") and "not available" in r for r in rows)
    assert info["svgs"] >= 2 and info["scripts"] == 0
    assert os.path.getsize(tmp_path / "eval.png") > 10_000
