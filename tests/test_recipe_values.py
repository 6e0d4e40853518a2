"""Every [train] value is checked when the recipe loads: `artaug run --dry-run` and the first
second of a run refuse it with file:line of the key, the key and what is allowed, before any
generation (before, a negative max_grad_norm trained uphill and a misspelt schedule failed
only inside training, after round 1's whole generation)."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from helpers import REPO

from artaug_ext.errors import UsageError
from artaug_ext.recipe.config import load_recipe

CASES = [
    ("max_grad_norm = -1", "max_grad_norm", r"a negative bound flips every gradient"),
    ('schedule = "cosin"', "schedule", r"use one of constant, cosine, linear"),
    ('weighting = "uniformm"', "weighting", r"use one of diffsynth, uniform"),
    ("alpha = 0", "alpha", r"must be positive"),
    ("alpha = -4.0", "alpha", r"must be positive"),
    ("checkpoint_every = -1", "checkpoint_every", r"must be 0 or more"),
    ("warmup_steps = -5", "warmup_steps", r"must be 0 or more"),
    ("lr = -1e-4", "lr", r"must be a positive number"),
    ('mixed_precision = "fp8"', "mixed_precision", r"use one of auto, no, bf16, fp16"),
    ('log_with = "mlflow"', "log_with", r"use one of tensorboard, wandb"),
    ("per_pair_rank = 0", "per_pair_rank", r"must be positive"),
    ("target_modules = []", "target_modules", r"name at least one layer"),
]


def _recipe(tmp_path, train_lines: str, drop: tuple[str, ...] = ()) -> str:
    text = open(os.path.join(REPO, "recipes", "smoke.toml"), encoding="utf-8").read()
    for key in drop:
        text = re.sub(rf"^{key} = .*\n", "", text, flags=re.M)
    text = text.replace("[train]\n", f"[train]\n{train_lines}\n")
    shutil.copy(os.path.join(REPO, "recipes", "smoke_prompts.txt"), tmp_path / "smoke_prompts.txt")
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _line(path: str, key: str) -> int:
    lines = open(path, encoding="utf-8").read().splitlines()
    start = lines.index("[train]")
    return next(i + 1 for i in range(start, len(lines)) if lines[i].startswith(f"{key} ="))


@pytest.mark.parametrize("line, key, allowed", CASES)
def test_a_bad_train_value_is_refused_at_load_with_its_line(tmp_path, line, key, allowed):
    path = _recipe(tmp_path, line, drop=(key,))  # smoke.toml's own value of the key (lr, checkpoint_every) goes
    with pytest.raises(UsageError) as e:
        load_recipe(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{_line(path, key)}: train.{key} "), message
    assert re.search(allowed, message), message


def test_resolution_must_be_a_multiple_of_16_and_not_above_the_images(tmp_path):
    path = _recipe(tmp_path, "resolution = 100", drop=("resolution",))
    with pytest.raises(UsageError, match=rf"{re.escape(path)}:{_line(path, 'resolution')}: train.resolution 100: "
                                         "must be a positive multiple of 16"):
        load_recipe(path)
    path = _recipe(tmp_path, "resolution = 512", drop=("resolution",))  # the tiny model makes 256 px images
    with pytest.raises(UsageError, match=r"train.resolution 512 is above the images' size 256 .*use at most 256"):
        load_recipe(path)


def test_a_weighting_the_timestep_sampling_ignores_is_refused(tmp_path):
    path = _recipe(tmp_path, 'timestep_sampling = "logit-normal"\nweighting = "uniform"')
    with pytest.raises(UsageError, match=rf":{_line(path, 'weighting')}: train.weighting 'uniform': .*ignores it"):
        load_recipe(path)
    path = _recipe(tmp_path, 'timestep_sampling = "logit-normal"\nweighting = "diffsynth"')
    with pytest.raises(UsageError, match="ignores it; leave weighting out"):
        load_recipe(path)
    assert load_recipe(_recipe(tmp_path, 'timestep_sampling = "logit-normal"')).train.timestep_sampling == "logit-normal"


def test_a_tracker_that_is_not_installed_is_refused_with_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    from artaug_ext.train import settings

    real = importlib.util.find_spec
    monkeypatch.setattr(settings.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    path = _recipe(tmp_path, 'log_with = "tensorboard"')
    with pytest.raises(UsageError, match=r"train.log_with 'tensorboard': the tensorboard package is not installed.*"
                                         r"pip install 'artaug-ext\[tensorboard\]'"):
        load_recipe(path)


def test_the_dry_run_refuses_before_planning(tmp_path, capsys):
    from artaug_ext.cli import main

    path = _recipe(tmp_path, "max_grad_norm = -1")
    assert main(["run", path, "--dry-run"]) != 0
    err = capsys.readouterr().err
    assert f"{path}:{_line(path, 'max_grad_norm')}: train.max_grad_norm -1" in err


def test_the_shipped_recipes_pass():
    for name in ("smoke.toml", "flux_dev_artaug.toml", "flux_dev_artaug_8gpu.toml"):
        load_recipe(os.path.join(REPO, "recipes", name))
