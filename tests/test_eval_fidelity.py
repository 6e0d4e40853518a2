"""The fidelity judge: the exact render is perfect, another lighting or a recoloured object is
worse, the colour arithmetic matches published CIE values, a prompt outside the grammar is not
measurable (never 0), the eval counts the lower Delta E as the win, and no filter may use it."""

import dataclasses
import json
import logging
import math
import os

import numpy as np
import pytest
from PIL import Image

from artaug_ext import scenes
from artaug_ext.errors import UsageError
from artaug_ext.eval import fidelity
from artaug_ext.eval.prompts import PromptItem, read_prompt_set
from artaug_ext.eval.run import Arm, EvalConfig, image_path, run_eval
from artaug_ext.eval.scoring import make_scorer
from artaug_ext.eval.stats import summarize_metric
from artaug_ext.interact import scorers as filter_scorers

PROMPTS = ["a red circle in the center on a blue background, dim light",
           "a small yellow star in the top left on a dark green background, backlit",
           "a large white square at the top and a small red circle in the bottom right on a black gradient "
           "background, bright light",
           "an orange triangle on the right on a light purple background, overexposed",
           "a green star at the bottom on a white background"]


def rendered(prompt, size=64, **change):
    return Image.fromarray(scenes.render(dataclasses.replace(scenes.parse_caption(prompt), **change), size))


def score(image, prompt):
    return make_scorer("fidelity").score([image], prompt)[0]


# ---------------------------------------------------------------------- an independent reference

def reference_lab(r8, g8, b8):
    """sRGB 8-bit to L*a*b* (D65) one channel at a time in plain Python floats: the textbook
    formulas, written apart from the judge's vectorised numpy."""
    def linear(c):
        c /= 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = linear(float(r8)), linear(float(g8)), linear(float(b8))
    x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    y = (0.2126729 * r + 0.7151522 * g + 0.0721750 * b) / 1.0
    z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


# Published L*a*b* (D65) of sRGB colours (e.g. Lindbloom's and colormine's calculators).
PUBLISHED = {(255, 255, 255): (100.0, 0.0, 0.0), (0, 0, 0): (0.0, 0.0, 0.0),
             (255, 0, 0): (53.2408, 80.0925, 67.2032), (0, 255, 0): (87.7347, -86.1827, 83.1793),
             (0, 0, 255): (32.2970, 79.1875, -107.8602), (128, 128, 128): (53.5850, 0.0, 0.0)}


def test_srgb_to_lab_matches_published_values_and_a_scalar_reference():
    for rgb, lab in PUBLISHED.items():
        ours = fidelity.srgb_to_lab(np.array(rgb) / 255)
        assert ours == pytest.approx(lab, abs=2e-3), rgb
        assert ours == pytest.approx(reference_lab(*rgb), abs=1e-9), rgb
    rng = np.random.default_rng(0)
    for rgb in rng.integers(0, 256, size=(50, 3)):
        assert fidelity.srgb_to_lab(rgb / 255) == pytest.approx(reference_lab(*rgb), abs=1e-9)


def test_delta_e_is_cie76_on_known_pairs():
    lab = {rgb: fidelity.srgb_to_lab(np.array(rgb) / 255) for rgb in PUBLISHED}
    assert fidelity.delta_e(lab[(0, 0, 0)], lab[(255, 255, 255)]) == pytest.approx(100.0, abs=1e-3)
    red, green = PUBLISHED[(255, 0, 0)], PUBLISHED[(0, 255, 0)]
    assert fidelity.delta_e(lab[(255, 0, 0)], lab[(0, 255, 0)]) == pytest.approx(math.dist(red, green), abs=5e-3)
    assert fidelity.delta_e(lab[(128, 128, 128)], lab[(128, 128, 128)]) == 0.0


# ---------------------------------------------------------------------- the judge on renders

@pytest.mark.parametrize("prompt", PROMPTS)
def test_exact_render_is_perfect(prompt):
    for size in (32, 64):
        row = score(rendered(prompt, size), prompt)
        assert row == {"fidelity_delta_e": 0.0, "fidelity_rgb": 0.0, "fidelity_lighting": 1.0, "fidelity_iou": 1.0}


def test_reference_mask_is_the_renderers_coverage_away_from_the_edges():
    for prompt in PROMPTS:
        scene = scenes.parse_caption(prompt)
        ref = fidelity.reference(prompt, 128, 128)
        coverage = np.max([scenes.shape_coverage(o.shape, *scenes.POSITIONS[o.position], scenes.SIZES[o.size], 128)
                           for o in scene.objects], axis=0)
        for light, mask in ref.masks.items():
            assert mask[coverage == 1].all() and not mask[coverage == 0].any(), (prompt, light)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_another_lighting_is_read_as_that_lighting_and_scores_worse(prompt):
    stated = scenes.parse_caption(prompt).lighting
    ref = fidelity.reference(prompt, 64, 64)
    for light in scenes.LIGHTINGS:
        image = rendered(prompt, lighting=light)
        nearest, _ = fidelity.read_lighting(fidelity.srgb_to_lab(np.asarray(image) / 255), ref)
        assert nearest == light, (prompt, light)
        if light != stated:
            row = score(image, prompt)
            assert row["fidelity_lighting"] == 0.0 and row["fidelity_delta_e"] > 2 and row["fidelity_rgb"] > 2
            assert row["fidelity_iou"] == 1.0  # the shapes and places are right


def test_recoloured_object_raises_delta_e_by_its_colour_difference_times_its_area():
    prompt = PROMPTS[0]  # a red circle on blue, dim
    scene = scenes.parse_caption(prompt)
    yellow = dataclasses.replace(scene, objects=[dataclasses.replace(scene.main, colour="yellow")])
    row = score(Image.fromarray(scenes.render(yellow, 64)), prompt)
    _, colours = scenes.lit_layers(scene, 64)
    _, recoloured = scenes.lit_layers(yellow, 64)
    per_pixel = float(fidelity.delta_e(fidelity.srgb_to_lab(colours[0]), fidelity.srgb_to_lab(recoloured[0])))
    area = scenes.shape_coverage("circle", 0.5, 0.5, scenes.SIZES["medium"], 64).mean()
    assert row["fidelity_delta_e"] == pytest.approx(per_pixel * area, rel=0.05)
    assert row["fidelity_rgb"] > 1 and row["fidelity_lighting"] == 1.0 and row["fidelity_iou"] > 0.9


def test_a_non_square_image_is_compared_with_the_render_at_its_shape():
    prompt = PROMPTS[1]
    ref = fidelity.reference(prompt, 48, 32)
    assert ref.rgb.shape == (32, 48, 3) and ref.masks["backlit"].shape == (32, 48)
    row = score(Image.fromarray(np.round(ref.rgb).astype(np.uint8)), prompt)
    assert row["fidelity_delta_e"] < 0.5 and row["fidelity_lighting"] == 1.0 and row["fidelity_iou"] == 1.0


def test_a_prompt_outside_the_grammar_is_not_measurable_never_zero(caplog):
    with caplog.at_level(logging.WARNING, logger="artaug_ext"):
        rows = make_scorer("fidelity").score([rendered(PROMPTS[0])] * 2, "a photo of a cat on a sofa")
    assert len(rows) == 2 and all(math.isnan(v) for r in rows for v in r.values())
    assert set(rows[0]) == set(fidelity.KEYS)
    assert "'a photo of a cat on a sofa'" in caplog.text and "not measurable" in caplog.text


def test_no_filter_may_use_the_judge(tmp_path, monkeypatch):
    from artaug_ext import pipeline
    from artaug_ext.interact.config import InteractConfig
    from artaug_ext.interact.loop import InteractRun

    for spec in ("fidelity", "heuristic+fidelity"):
        with pytest.raises(UsageError, match="judges `artaug eval` only"):
            filter_scorers.make_scorer(spec)
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("refused before any model"))
    with pytest.raises(UsageError, match="no filter may use it"):
        InteractRun(InteractConfig(prompts=[PROMPTS[0]], model="tiny-random", scorer="heuristic+fidelity"),
                    str(tmp_path / "run"), progress=False)
    judge = make_scorer("fidelity")
    assert judge.quality_keys == () and judge.alignment_keys == ()  # keep_pair reads nothing of it
    with pytest.raises(UsageError, match="choose from .*fidelity"):
        make_scorer("fidelty")
    with pytest.raises(UsageError, match="choose from heuristic, .*imagereward \\("):
        filter_scorers.make_scorer("fidelty")  # the filter does not even offer it


def test_the_eval_scorer_is_the_filter_scorers_and_the_judges_side_by_side(monkeypatch):
    combined = make_scorer("heuristic+fidelity+analyser")
    assert [type(p).__name__ for p in combined.components()] == ["HeuristicScorer", "FidelityScorer", "AnalyserScorer"]
    assert combined.name == "heuristic+fidelity+analyser"
    row = combined.score([rendered(PROMPTS[0])], PROMPTS[0])[0]
    assert set(row) == {"quality", "colour_match", "prompt_match", *fidelity.KEYS, *filter_scorers.AnalyserScorer.KEYS}
    assert row["fidelity_delta_e"] == 0.0
    # every judge the interact layer refuses by name, the eval builds
    for name in filter_scorers.JUDGES:
        assert make_scorer(name).name == name
    # a bad name anywhere in the spec is found before any weights load
    monkeypatch.setattr(filter_scorers, "DiffSynthMetricScorer", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(UsageError, match="unknown scorer 'bogus'"):
        make_scorer("aesthetic+fidelity+bogus")
    with pytest.raises(UsageError, match="--scorer is empty"):
        make_scorer(" + ")


# ---------------------------------------------------------------------- through the eval

def write_images(out, prompts, arm, **change):
    for p, prompt in enumerate(prompts):
        path = image_path(str(out), arm, p, 0)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        scene = scenes.parse_caption(prompt)
        image = rendered(prompt, 32, **change) if scene else rendered(PROMPTS[0], 32)
        image.save(path)


def test_the_eval_counts_the_lower_delta_e_as_the_win(tmp_path):
    prompts = PROMPTS[:4] + ["a photo of a cat on a sofa"]
    out = tmp_path / "out"
    write_images(out, prompts, "base", lighting="normal")  # the wrong lighting for four of the five
    write_images(out, prompts, "exact")
    cfg = EvalConfig(model="tiny-random", arms=[Arm("base"), Arm("exact")],
                     prompts=[PromptItem(p, "scene" if i < 4 else "other") for i, p in enumerate(prompts)],
                     seeds=1, width=32, height=32, scorer="heuristic+fidelity", n_boot=200)
    result = run_eval(cfg, str(out), progress=False)  # every image exists: nothing is generated
    rows = result["comparisons"]["exact"]
    for metric in ("fidelity_delta_e", "fidelity_rgb"):
        r = rows[metric]
        assert r["better"] == "lower" and r["kind"] == "judge" and r["mean_a"] == 0.0 and r["mean_diff"] < 0
        assert r["win_rate"] == 1.0 and r["by_category"]["scene"]["win_rate"] == 1.0, metric
        assert r["n"] == 4 and r["not_measurable"] == 1  # the cat prompt is left out, not scored 0
    assert rows["fidelity_lighting"]["better"] == "higher" and rows["fidelity_lighting"]["win_rate"] == 1.0
    assert rows["fidelity_lighting"]["mean_a"] == 1.0 and rows["fidelity_iou"]["mean_a"] == 1.0
    # the same scores summarised as higher-is-better would call the worse arm the winner
    a, b = np.zeros(4), np.array([3.0, 1.0, 2.0, 5.0])
    assert summarize_metric(a, b, n_boot=50)["win_rate"] == 0.0
    assert summarize_metric(a, b, n_boot=50, lower_is_better=True)["win_rate"] == 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["comparisons"]["exact"]["fidelity_delta_e"]["win_rate"] == 1.0
    assert "fidelity_delta_e (lower is better)" in (out / "report.html").read_text()


def test_an_eval_of_prompts_outside_the_grammar_marks_the_rows_not_measurable(tmp_path):
    prompts = ["a photo of a cat on a sofa", "a castle at dusk"]
    out = tmp_path / "out"
    for arm in ("base", "other"):
        write_images(out, prompts, arm)
    cfg = EvalConfig(model="tiny-random", arms=[Arm("base"), Arm("other")], prompts=[PromptItem(p) for p in prompts],
                     seeds=1, width=32, height=32, scorer="fidelity", n_boot=50)
    rows = run_eval(cfg, str(out), progress=False, report=False)["comparisons"]["other"]
    for metric in fidelity.KEYS:
        assert rows[metric]["skipped"].startswith("not measurable"), rows[metric]


def test_cli_eval_accepts_the_judge(tmp_path, capsys, monkeypatch):
    from artaug_ext import pipeline
    from artaug_ext.cli import main
    from artaug_ext.files import save_safetensors

    def no_model(*args, **kwargs):
        raise AssertionError("every image exists: the eval must not load a model")

    monkeypatch.setattr(pipeline, "load_pipeline", no_model)
    import torch

    save_safetensors({"x.lora_A.default.weight": torch.zeros(2, 4)}, str(tmp_path / "l.safetensors"))
    prompts = [item.prompt for item in read_prompt_set("tiny-heldout-lit", limit=2)]
    out = tmp_path / "out"
    write_images(out, prompts, "base", lighting="dim")
    write_images(out, prompts, "l")
    assert main(["eval", "--model", "tiny-random", "--lora", str(tmp_path / "l.safetensors"), "--prompts",
                 "tiny-heldout-lit", "--limit", "2", "--seeds", "1", "--size", "32", "--scorer", "heuristic+fidelity",
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "fidelity_delta_e" in text and "fidelity_iou" in text and "lower is better for fidelity_delta_e" in text
