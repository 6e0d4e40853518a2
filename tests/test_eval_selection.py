"""Selection scores are labelled: an eval row the run's filter scorer also computed is marked
"selection score: not independent" in results.json, the text table, the HTML table and the run
report, and the verdict is drawn from the independent scorers only."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from artaug_ext import scenes
from artaug_ext.eval.fidelity import FidelityScorer
from artaug_ext.eval.layout import image_path
from artaug_ext.eval.prompts import read_prompt_set
from artaug_ext.eval.report import metric_table, verdict
from artaug_ext.eval.run import Arm, EvalConfig, format_table, run_eval
from artaug_ext.eval.scoring import SELECTION_LABEL, selection_metrics
from artaug_ext.interact.scorers import CombinedScorer, Scorer

SIZE = 32
SEEDS = 2


class Brightness(Scorer):
    """A stand-in for the filter's scorer: quality = mean brightness, so the brightened arm wins
    every pair on it (what a LoRA trained on the pairs that scorer preferred would do)."""

    name = "heuristic"
    quality_keys = ("quality",)

    def score(self, images, prompt):
        return [{"quality": float(np.asarray(im, dtype=np.float64).mean())} for im in images]


def _write_images(out_dir, prompts):
    """base: the exact render of each prompt's scene; brighter: the same, 60 levels brighter
    (higher 'quality', further from the scene: worse render fidelity)."""
    for p, item in enumerate(prompts):
        exact = scenes.render(item.scene, SIZE)
        for k in range(SEEDS):
            for arm, array in (("base", exact), ("brighter", np.clip(exact.astype(int) + 60, 0, 255).astype(np.uint8))):
                path = image_path(out_dir, arm, p, k)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(array).save(path)


def _eval(tmp_path, scorer, selection, name="eval"):
    prompts = read_prompt_set("tiny-heldout-lit:6")
    out = str(tmp_path / name)
    _write_images(out, prompts)
    cfg = EvalConfig(model="tiny", arms=[Arm("base"), Arm("brighter")], prompts=prompts, seeds=SEEDS, seed=10_000,
                     width=SIZE, height=SIZE, scorer=scorer.name, n_boot=300, selection_scorer=selection)
    return out, cfg, run_eval(cfg, out, scorer=scorer, progress=False)


def test_the_filters_own_score_is_labelled_and_the_verdict_comes_from_the_judge(tmp_path):
    out, cfg, result = _eval(tmp_path, CombinedScorer([Brightness(), FidelityScorer()]), "heuristic")
    rows = result["comparisons"]["brighter"]
    assert rows["quality"]["selection"] is True and rows["quality"]["win_ci"][0] > 0.5  # it "wins" on its own score
    assert not any(rows[k].get("selection") for k in ("fidelity_delta_e", "fidelity_rgb", "fidelity_lighting"))
    assert result["selection_metrics"] == ["quality"] and result["selection_scorer"] == "heuristic"
    assert rows["fidelity_delta_e"]["win_ci"][1] < 0.5  # further from the scene in every pair
    said = verdict(result)
    assert "beats" not in said and "worse than the baseline on fidelity_delta_e" in said and "quality" not in said
    on_disk = json.load(open(os.path.join(out, "results.json")))
    assert on_disk["comparisons"]["brighter"]["quality"]["selection"] is True
    table = format_table(result).splitlines()
    assert [line for line in table if SELECTION_LABEL in line and line.strip().startswith("quality")]
    assert not [line for line in table if SELECTION_LABEL in line and "fidelity" in line.split()[0]]
    html = metric_table(result)
    assert html.count(SELECTION_LABEL) == 1 and html.index("quality") < html.index(SELECTION_LABEL)
    report = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert SELECTION_LABEL in report and "beats" not in report


def test_without_the_runs_filter_scorer_the_same_rows_are_plain_scores(tmp_path):
    _, _, result = _eval(tmp_path, CombinedScorer([Brightness(), FidelityScorer()]), None)
    assert not any(r.get("selection") for r in result["comparisons"]["brighter"].values())
    assert "brighter beats" not in verdict(result)  # beats on quality, worse on fidelity: no clear difference
    assert "better on quality, worse on fidelity_delta_e" in verdict(result)
    assert SELECTION_LABEL not in format_table(result)


def test_only_selection_scores_give_no_verdict_never_beats(tmp_path):
    _, _, result = _eval(tmp_path, Brightness(), "heuristic")
    said = verdict(result)
    assert "beats" not in said and "no verdict" in said and "not independent" in said


def test_the_label_depends_on_the_filter_not_on_the_eval_folder(tmp_path):
    """The label is not part of what the images and scores depend on: the same folder is
    re-scored with another filter scorer named, and nothing is refused or regenerated."""
    scorer = CombinedScorer([Brightness(), FidelityScorer()])
    out, cfg, first = _eval(tmp_path, scorer, "heuristic")
    cfg.selection_scorer = "clip"
    again = run_eval(cfg, out, scorer=scorer, progress=False)
    assert again["timing"]["scorer_forward_passes"] == 0 and first["timing"]["scorer_forward_passes"] > 0
    assert not any(r.get("selection") for r in again["comparisons"]["brighter"].values())


@pytest.mark.parametrize(("spec", "want"), [("heuristic", {"quality"}), ("heuristic+clip", {"quality"}),
                                            (" clip + heuristic ", {"quality"}), ("clip", set()), (None, set()),
                                            ("", set())])
def test_selection_metrics_are_the_scores_of_the_filters_components(spec, want):
    assert selection_metrics(CombinedScorer([Brightness(), FidelityScorer()]), spec) == want


def test_the_runs_held_out_check_names_its_filter_scorer_and_the_demo_is_judged_by_fidelity(monkeypatch, tmp_path):
    """The runner's held-out check passes the filter scorer to the eval, and builds its scorer
    through the eval's make_scorer (the judge is there); the demo recipe's check has fidelity,
    its filter does not and cannot."""
    import artaug_ext.eval.run as eval_run
    import artaug_ext.lora as lora
    from artaug_ext.cli.demo import DEMO_RECIPE
    from artaug_ext.dist import Collective
    from artaug_ext.errors import UsageError
    from artaug_ext.eval.scoring import make_scorer as eval_scorer
    from artaug_ext.interact.scorers import make_scorer as filter_scorer
    from artaug_ext.recipe.config import load_recipe
    from artaug_ext.recipe.runner import RecipeRun

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = load_recipe(os.path.join(repo, "recipes", DEMO_RECIPE))  # what `artaug demo` runs
    seen = {}

    def fake_run_eval(cfg, folder, **kwargs):
        seen["cfg"], seen["scorer"] = cfg, kwargs.get("scorer")
        return {"comparisons": {}, "arms": [{"name": "base"}], "prompts": 0, "seeds": 0}

    monkeypatch.setattr(eval_run, "run_eval", fake_run_eval)
    monkeypatch.setattr(lora, "unload_lora", lambda pipe, *a: None)
    run = RecipeRun.__new__(RecipeRun)
    run.recipe, run.out_dir, run.pipe, run.main = recipe, str(tmp_path), None, True
    run.model_dir = run.device = None
    run.collective = Collective()  # one process
    run.progress, run.round_loras = False, []
    run._held_out_check()
    cfg = seen["cfg"]
    assert cfg.selection_scorer == recipe.filter.scorer == "heuristic" and seen["scorer"] is None  # built by run_eval
    assert "fidelity" in cfg.scorer.split("+") and cfg.prompts[0].prompt in {
        it.prompt for it in read_prompt_set("tiny-heldout-lit/dev")}
    assert any(isinstance(p, FidelityScorer) for p in eval_scorer(cfg.scorer).components())
    assert not any(isinstance(p, FidelityScorer) for p in filter_scorer(recipe.filter.scorer).components())
    with pytest.raises(UsageError):
        filter_scorer("heuristic+fidelity")


def test_the_run_report_shows_the_label_and_no_beats_on_a_selection_score(tmp_path):
    from artaug_ext.recipe.report import write_run_report

    _, _, result = _eval(tmp_path, Brightness(), "heuristic", name="final_eval")
    summary = {"rounds": [], "eval": {"what": "held-out check", "report": "final_eval/report.html", "result": result}}
    write_run_report(str(tmp_path), summary)
    page = open(tmp_path / "report.html", encoding="utf-8").read()
    assert "beats" not in page and "no verdict" in page
    assert f"quality: {SELECTION_LABEL}" in page


def test_an_eval_of_a_run_folder_reads_the_runs_filter_scorer(tmp_path):
    from artaug_ext.errors import FileFormatError
    from artaug_ext.recipe.layout import filter_scorer_of

    assert filter_scorer_of(str(tmp_path)) is None  # not a run folder: nothing is labelled
    (tmp_path / "run.json").write_text(json.dumps({"format": 1, "recipe": {"filter": {"scorer": "heuristic+clip"}}}))
    assert filter_scorer_of(str(tmp_path)) == "heuristic+clip"
    (tmp_path / "run.json").write_text("{torn")
    with pytest.raises(FileFormatError, match="run.json.*--lora instead of --run"):
        filter_scorer_of(str(tmp_path))
