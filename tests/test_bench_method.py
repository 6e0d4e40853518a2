"""benchmarks/bench_method.py at micro size (tiny-random, 64 px, 2 steps): every arm's plumbing,
the split and ledger it reports, sft at the differential arms' total steps, and the controls
(oracle = base where no suggestion is usable; cells change only inside the critic's boxes)."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from artaug_ext import scenes
from artaug_ext.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_method", os.path.join(REPO, "benchmarks", "bench_method.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MICRO = ["--model", "tiny-random", "--size", "64", "--gen-steps", "2", "--train-prompts", "6", "--steps", "2",
         "--eval-prompts", "3", "--eval-seeds", "2", "--heldout", "multi", "--per-pair", "--per-pair-pairs", "2",
         "--full-res", "--margin", "-1"]  # tiny-random's noise gains nothing: keep every enhanced pair


def test_every_arm_runs_at_micro_size_and_reports_its_split(tmp_path, monkeypatch):
    from artaug_ext.eval.layout import image_path
    from artaug_ext.interact.critics import make_critic
    from artaug_ext.interact.parse import split_identities
    from artaug_ext.train.loss_log import read_loss_log

    monkeypatch.setenv("ARTAUG_THREADS", "1")
    bench = _bench()
    out = tmp_path / "bm"
    assert bench.main(["--out", str(out), *MICRO, "--prior-dev-configs", "2"]) == 0
    fig = json.loads((out / "method.json").read_text())
    assert fig["held_out"] == {"set": "tiny-heldout-multi/dev:3", "split": "dev", "prompts": 3, "seeds": 2}
    assert fig["ledger"]["dev_configs_before"] == 2 and fig["ledger"]["test_runs_before"] == 0
    arms = {r["arm"]: r for r in fig["arms"]}
    assert set(arms) == {"batched-1", "batched-2", "sft", "per-pair", "tone", "cells", "oracle"}
    for r in arms.values():
        assert r["quality"]["selection"] is True  # the filter's own score, labelled
        assert not r["fidelity_delta_e"]["selection"] and not r["fidelity_rgb"]["selection"]
        assert 0 <= r["fidelity_delta_e"]["win_ci"][0] <= r["fidelity_delta_e"]["win"] <= r["fidelity_delta_e"]["win_ci"][1]
        assert set(r["fidelity_delta_e"]["by_category"]) <= set(scenes.LIGHTINGS)
        assert sum(v["n"] for v in r["fidelity_delta_e"]["by_category"].values()) == 6
    assert set(fig["target"]) == {"batched-1", "batched-2"} and "not_worse_than_sft" in fig["target"]["batched-1"]
    assert fig["settings"]["resolution"] is None  # --full-res: at the generation resolution
    # sft: stage 1 + stage 2 optimizer steps, one stage
    assert len(read_loss_log(str(out / "sft" / "stage2"))) == 4
    assert [s["round"] for s in fig["suggestions"]] == [1, 2]
    assert all(0 <= s["usable"] <= s["suggestions"] for s in fig["suggestions"])
    # the controls, image by image
    critic, ctrl = make_critic("heuristic"), str(out / "control")
    from artaug_ext.eval.prompts import read_prompt_set

    enhanced = 0
    for p, item in enumerate(read_prompt_set("tiny-heldout-multi/dev:3")):
        for k in range(2):
            base = np.asarray(Image.open(image_path(str(out / "eval"), "base", p, k)).convert("RGB"))
            assert np.array_equal(base, np.asarray(Image.open(image_path(ctrl, "base", p, k))))
            usable, _ = split_identities(critic.critique(Image.fromarray(base), item.prompt).suggestions, item.prompt)
            oracle = np.asarray(Image.open(image_path(ctrl, "oracle", p, k)))
            cells = np.asarray(Image.open(image_path(ctrl, "cells", p, k)))
            inside = np.zeros(base.shape[:2], dtype=bool)
            for s in usable:
                x0, y0, x1, y1 = bench.box_pixels(s.box, 64, 64)
                inside[y0:y1, x0:x1] = True
            assert np.array_equal(cells[~inside], base[~inside])
            if usable:
                enhanced += 1
                assert not np.array_equal(oracle, base)
            else:
                assert np.array_equal(oracle, base) and np.array_equal(cells, base)
    assert enhanced == fig["oracle_enhanced_images"]
    ledger = [json.loads(line) for line in open(tmp_path / "bench_method_ledger.jsonl")]
    assert [r["split"] for r in ledger] == ["dev"]


def test_training_prompts_have_one_to_three_objects_none_held_out():
    prompts = _bench().training_prompts(40)
    parsed = [scenes.parse_caption(p) for p in prompts]
    assert len(set(prompts)) == 40 and [len(s.objects) for s in parsed[:6]] == [1, 2, 3, 1, 2, 3]
    assert not any(scenes.is_held_out(o.colour, o.shape, o.position, s.background) for s in parsed for o in s.objects)
    assert {s.lighting for s in parsed} == {"dim", "overexposed", "backlit", "bright"}


def test_the_ledger_counts_other_dev_configurations_and_test_runs(tmp_path):
    from artaug_ext.files import append_line

    bench = _bench()
    path = str(tmp_path / "ledger.jsonl")
    a, b = {"steps": 40}, {"steps": 60}
    assert bench.ledger_counts(path, a) == {"dev_configs_before": 0, "config_run_on_dev": False, "test_runs_before": 0}
    for split, config in (("dev", a), ("dev", a), ("dev", b), ("test", b)):
        append_line(path, {"split": split, "config": config})
    assert bench.ledger_counts(path, b) == {"dev_configs_before": 1, "config_run_on_dev": True, "test_runs_before": 1}
    assert bench.ledger_counts(path, {"steps": 80})["dev_configs_before"] == 2


def test_a_split_asked_for_more_prompts_than_it_holds_stops_before_training(tmp_path):
    with pytest.raises(UsageError, match="holds .* scenes; ask for at most tiny-heldout-lit/test:"):
        _bench().main(["--out", str(tmp_path / "bm"), "--split", "test", "--eval-prompts", "1000"])
    assert not (tmp_path / "bm").exists()


def test_tone_correct_cells_changes_only_the_boxes():
    bench = _bench()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(40, 120, (64, 64, 3), dtype=np.uint8))
    out = np.asarray(bench.tone_correct_cells(image, [(0.0, 0.0, 0.5, 0.25)]))
    src = np.asarray(image)
    assert np.array_equal(out[16:], src[16:]) and np.array_equal(out[:, 32:], src[:, 32:])
    assert np.array_equal(out[:16, :32], np.asarray(bench.tone_correct(image.crop((0, 0, 32, 16)))))
    assert not np.array_equal(out[:16, :32], src[:16, :32])
