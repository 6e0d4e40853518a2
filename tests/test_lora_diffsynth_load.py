"""Every LoRA file a run leaves for users (outside its stage and checkpoint folders) gives the
same DiT weights through DiffSynth's own `pipe.load_lora` as through ours (issue 18: keys
spelled `...lora_A.default.weight` fused 0 tensors in DiffSynth's FLUX loader, silently).

The files come from real micro runs of the tiny model, with alpha != rank (so a loader that
dropped or doubled the scale would disagree) and the final LoRA truncated to a smaller rank."""

import os

import pytest
import torch
from helpers import micro_recipe
from safetensors.torch import load_file, save_file

from artaug_ext.lora import load_lora
from artaug_ext.pipeline import load_pipeline
from artaug_ext.recipe.config import load_recipe
from artaug_ext.recipe.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

# The micro recipe with alpha != rank, so a loader that dropped or doubled the scale would
# disagree, and a final rank below the sum's.
CHANGES = {"run": {"name": "diffsynth-load", "seed": 5, "final_rank": 3},
           "train": {"alpha": 5.0, "lr": 1e-2, "steps_stage1": 2, "steps_stage2": 2, "checkpoint_every": 100}}

# What a run leaves for users, by kind: round LoRAs and the final LoRA (training format), the
# final LoRA (kohya format).
USER_LORAS = ["rounds/round-01/lora.safetensors", "rounds/round-02/lora.safetensors",
              "final/lora_diffsynth.safetensors", "final/lora.safetensors"]
# Folders a run keeps for itself: pair data, latents, training stages and their checkpoints.
INTERNAL = ("interact", "cache", "stage1", "stage2", "pair-", "checkpoint-")


@pytest.fixture(scope="module", params=["batched", "per-pair"])
def run_dir(request, tmp_path_factory):
    """A 2-round micro run; batched rounds save the trained adapters (`lora_state_dict`),
    per-pair rounds an exact average of them (`layers_to_training_state`)."""
    tmp = tmp_path_factory.mktemp(request.param)
    recipe = micro_recipe(tmp / "recipe.toml", run=CHANGES["run"], train={**CHANGES["train"], "mode": request.param})
    run_recipe(load_recipe(str(recipe)), str(tmp / "run"), device="cpu", progress=False)
    return tmp / "run"


def fresh_pipeline():
    return load_pipeline("tiny-random", device="cpu", torch_dtype=torch.float32)


def dit_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in pipe.dit.state_dict().items()}


def test_the_run_leaves_exactly_these_lora_files(run_dir):
    found = []
    for folder, _, files in os.walk(run_dir):
        rel = os.path.relpath(folder, run_dir)
        if any(part.startswith(INTERNAL) for part in rel.split(os.sep)):
            continue
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(".safetensors")]
    assert sorted(found) == sorted(USER_LORAS)


@pytest.mark.parametrize("kind", USER_LORAS)
def test_diffsynth_load_lora_fuses_what_ours_merges(run_dir, kind, capsys):
    path = str(run_dir / kind)
    base = dit_weights(fresh_pipeline())

    theirs = fresh_pipeline()
    capsys.readouterr()
    theirs.load_lora(theirs.dit, path)
    fused_message = capsys.readouterr().out
    ours = fresh_pipeline()
    report = load_lora(ours, path)

    assert report.merged and not report.unmapped and not report.skipped
    assert f"{len(report.merged)} tensors are fused" in fused_message, fused_message
    theirs_w, ours_w = dit_weights(theirs), dit_weights(ours)
    changed_by_ours = {k for k in base if not torch.equal(ours_w[k], base[k])}
    changed_by_theirs = {k for k in base if not torch.equal(theirs_w[k], base[k])}
    assert len(changed_by_ours) == len(report.merged) and changed_by_theirs == changed_by_ours
    worst = max(float((theirs_w[k] - ours_w[k]).abs().max()) for k in base)
    assert worst <= 1e-5, f"{kind}: DiffSynth's and our merge differ by {worst:.3g}"


def test_files_with_the_old_adapter_spelling_still_load_through_ours(run_dir, tmp_path):
    """Files written before the fix (`.lora_A.default.weight`) merge as the new ones do."""
    new = str(run_dir / "rounds" / "round-01" / "lora.safetensors")
    sd = load_file(new)
    assert not any(".default." in k for k in sd)
    old = str(tmp_path / "old.safetensors")
    save_file({k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in sd.items()}, old)
    with_new, with_old = fresh_pipeline(), fresh_pipeline()
    load_lora(with_new, new)
    load_lora(with_old, old)
    a, b = dit_weights(with_new), dit_weights(with_old)
    assert all(torch.equal(a[k], b[k]) for k in a)
