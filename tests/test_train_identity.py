"""A stage folder is reused or resumed only when everything its LoRA depends on is the same:
every training setting, the steps, the images (side, pair ids, cached tensors) and the base
(the LoRAs merged under it, LoRA_1 for stage 2). Anything else is a one-line refusal naming
the setting and the folder to delete, before any training, with nothing in the folder changed."""

import dataclasses
import json
import os
import re
import shutil

import pytest
import torch
from helpers import file_tree

from artaug_ext.errors import UsageError
from artaug_ext.tiny.models import TinyFluxDiT
from artaug_ext.train import differential
from artaug_ext.train.cache import LatentCache
from artaug_ext.train.differential import LoRATrainSettings, train_round_lora, train_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def _dit():
    torch.manual_seed(0)
    return TinyFluxDiT(dim=64, num_heads=1, num_joint_blocks=1, num_single_blocks=1, axes_dim=(16, 24, 24),
                       input_dim=64, text_dim=16, pooled_dim=8)


def _cache(ids=("a", "b"), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    return LatentCache(list(ids), torch.randn(n, 16, 8, 8, generator=g), torch.randn(n, 16, 8, 8, generator=g),
                       torch.randn(n, 4, 16, generator=g), torch.randn(n, 8, generator=g))


SETTINGS = LoRATrainSettings(rank=2, steps_stage1=2, steps_stage2=2, batch_size=2, checkpoint_every=1, lr=1e-2)


def _no_training(*args, **kwargs):
    raise AssertionError("a stale stage folder was trained on")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished batched round (stages with lora.safetensors and checkpoints), its LoRA, and
    copies killed inside stage 1 and inside stage 2 (checkpoints, no lora.safetensors)."""
    root = tmp_path_factory.mktemp("identity")
    done = root / "done"
    result = train_round_lora(_dit(), _cache(), SETTINGS, str(done), progress=False)
    for stage in ("stage1", "stage2"):
        names = sorted(os.listdir(done / stage))
        assert {"stage.json", "lora.safetensors", "checkpoint-2", "loss.jsonl"} <= set(names), names
    mid2 = root / "mid2"
    shutil.copytree(done, mid2)
    os.remove(mid2 / "stage2" / "lora.safetensors")
    mid1 = root / "mid1"
    shutil.copytree(done, mid1)
    shutil.rmtree(mid1 / "stage2")
    os.remove(mid1 / "stage1" / "lora.safetensors")
    assert os.path.isfile(result.path)
    return {"done": done, "mid1": mid1, "mid2": mid2}


def test_the_same_settings_reuse_every_stage_without_training(trained, tmp_path, monkeypatch):
    folder = tmp_path / "again"
    shutil.copytree(trained["done"], folder)
    monkeypatch.setattr(differential, "train", _no_training)
    os.remove(folder / "lora.safetensors")
    result = train_round_lora(_dit(), _cache(), SETTINGS, str(folder), progress=False)
    assert open(result.path, "rb").read() == (trained["done"] / "lora.safetensors").read_bytes()


# (what changes, the stage folder named, the setting named in the error)
CHANGES = [
    ({"rank": 4}, "stage1", r"rank: 2 -> 4"),
    ({"alpha": 1.0}, "stage1", r"alpha: null -> 1.0"),
    ({"lr": 1e-3}, "stage1", r"lr: 0.01 -> 0.001"),
    ({"target_modules": ["a_to_qkv"]}, "stage1", r"target_modules: .* -> \[\"a_to_qkv\"\]"),
    ({"schedule": "cosine"}, "stage1", r"schedule: constant -> cosine"),
    ({"seed": 5}, "stage1", r"seed: 0 -> 5"),
    ({"batch_size": 1}, "stage1", r"batch_size: 2 -> 1"),
    ({"resolution": 64}, "stage1", r"resolution: null -> 64"),
    ({"weighting": "uniform"}, "stage1", r"weighting: diffsynth -> uniform"),
    ({"timestep_sampling": "logit-normal"}, "stage1", r"timestep_sampling: diffsynth -> logit-normal"),
    ({"guidance": 1.0}, "stage1", r"guidance: 3.5 -> 1.0"),
    ({"steps_stage1": 3}, "stage1", r"steps: 2 -> 3"),
    ({"steps_stage2": 3}, "stage2", r"steps: 2 -> 3"),  # stage 1 is fine: refused before it is even reused
]


@pytest.mark.parametrize("which", ["done", "mid2"])
@pytest.mark.parametrize(("change", "stage", "named"), CHANGES, ids=[next(iter(c[0])) for c in CHANGES])
def test_a_stale_stage_is_refused_naming_the_setting_and_the_folder(trained, monkeypatch, which, change, stage, named):
    folder = trained[which]
    before = file_tree(folder)
    monkeypatch.setattr(differential, "train", _no_training)
    settings = dataclasses.replace(SETTINGS, **change)
    with pytest.raises(UsageError) as e:
        train_round_lora(_dit(), _cache(), settings, str(folder), progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / stage} holds a stage trained with other settings (")
    assert "delete the folder" in message
    assert re.search(named, message), message
    assert file_tree(folder) == before


@pytest.mark.parametrize("which", ["done", "mid1"])
def test_other_pairs_latents_or_base_are_refused(trained, monkeypatch, which):
    folder = trained[which]
    before = file_tree(folder)
    monkeypatch.setattr(differential, "train", _no_training)
    cases = [
        (dict(cache=_cache(("a", "c"))), r"pairs\[1\]: b -> c"),
        (dict(cache=_cache(("a", "b"), seed=1)), r"pairs_sha256.a: [0-9a-f]+ -> [0-9a-f]+"),
        (dict(base_loras=["ab" * 32]), r'base_loras: \[\] -> \["abab'),
    ]
    for kwargs, named in cases:
        cache = kwargs.pop("cache", _cache())
        with pytest.raises(UsageError, match=rf"^{re.escape(str(folder / 'stage1'))} holds a stage trained with other settings "
                                             rf"\({named}.*\); delete the folder"):
            train_round_lora(_dit(), cache, SETTINGS, str(folder), progress=False, **kwargs)
    assert file_tree(folder) == before


def test_another_image_side_is_refused(trained, tmp_path, monkeypatch):
    folder = tmp_path / "stage"
    shutil.copytree(trained["done"] / "stage1", folder)  # trained on the originals
    before = file_tree(folder)
    monkeypatch.setattr(differential, "train", _no_training)
    with pytest.raises(UsageError, match=r"holds a stage trained with other settings \(image_side: original -> enhanced\)"):
        train_stage(_dit(), _cache(), "enhanced", SETTINGS, str(folder), 0, 2, progress=False)
    assert file_tree(folder) == before


def test_a_stage_2_on_another_lora_1_is_refused(trained, tmp_path, monkeypatch):
    """LoRA_1 is part of stage 2's base: a stage 1 whose LoRA is another, or gone, refuses stage 2."""
    folder = tmp_path / "round"
    shutil.copytree(trained["done"], folder)
    lora_1 = folder / "stage1" / "lora.safetensors"
    from safetensors.torch import load_file

    from artaug_ext.train.lora import save_lora

    state = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"):
             v * (1.5 if "lora_B" in k else 1.0) for k, v in load_file(str(lora_1)).items()}
    save_lora(state, str(lora_1), {"stage": "stage1"})  # another LoRA_1 (the recorded stage 1 is reused)
    before = file_tree(folder)
    monkeypatch.setattr(differential, "train", _no_training)
    with pytest.raises(UsageError, match=rf"^{re.escape(str(folder / 'stage2'))} holds a stage trained with other settings "
                                         r"\(lora_1: [0-9a-f]+ -> [0-9a-f]+\); delete the folder"):
        train_round_lora(_dit(), _cache(), SETTINGS, str(folder), progress=False)
    assert file_tree(folder) == before
    shutil.rmtree(folder / "stage1")  # stage 1 gone: it would be trained again, under a stage 2 of the old LoRA_1
    before = file_tree(folder)
    with pytest.raises(UsageError, match=rf"^{re.escape(str(folder / 'stage2'))} was trained on a LoRA_1 that {re.escape(str(folder / 'stage1'))} no "
                                         rf"longer holds; delete {re.escape(str(folder / 'stage2'))}"):
        train_round_lora(_dit(), _cache(), SETTINGS, str(folder), progress=False)
    assert file_tree(folder) == before


def test_a_stage_folder_without_a_record_is_refused(trained, tmp_path, monkeypatch):
    """A stage folder of an older artaug-ext (no stage.json): finished, or killed with a checkpoint."""
    monkeypatch.setattr(differential, "train", _no_training)
    for name, drop in (("finished", ()), ("killed", ("lora.safetensors",))):
        folder = tmp_path / name
        shutil.copytree(trained["done"], folder)
        for stage in ("stage1", "stage2"):
            for f in ("stage.json", *drop):
                os.remove(folder / stage / f)
        before = file_tree(folder)
        with pytest.raises(UsageError, match=rf"^{re.escape(str(folder / 'stage1'))} holds a stage without a stage.json \(from an older "
                                             r"artaug-ext\), so what it was trained with is unknown; delete the folder"):
            train_round_lora(_dit(), _cache(), SETTINGS, str(folder), progress=False)
        assert file_tree(folder) == before


def test_a_checkpoint_is_refused_on_other_data_and_in_the_old_format(trained, tmp_path):
    """The loop's own check (under the stage record): a checkpoint's identity holds what the stage
    trains on, and a checkpoint of format 3 (which did not) is refused in one line."""
    from artaug_ext.train.differential import stage_config
    from artaug_ext.train.flow import FlowMatchObjective, FluxDenoiser
    from artaug_ext.train.loop import DONE_FILE, train
    from artaug_ext.train.lora import inject_lora

    folder = tmp_path / "stage1"
    shutil.copytree(trained["mid1"] / "stage1", folder)
    os.remove(folder / "stage.json")
    dit = _dit()
    inject_lora(dit, 2, init_seed=0)
    objective = FlowMatchObjective()
    cache = _cache()

    def go(image_side):
        cfg = stage_config(cache, image_side, SETTINGS, str(folder), 0, 2, progress=False)
        train(FluxDenoiser(dit), lambda m, b, rng: objective(m, b["latents"], b["prompt_emb"], b["pooled_prompt_emb"], rng),
              lambda idx: cache.batch(image_side, idx), len(cache), cfg)

    before = file_tree(folder)
    with pytest.raises(UsageError, match=r"holds a training with other settings \(image_side: original -> enhanced\)"):
        go("enhanced")
    assert file_tree(folder) == before
    done_file = folder / "checkpoint-2" / DONE_FILE
    info = json.loads(done_file.read_text())
    done_file.write_text(json.dumps({**info, "format": 3}))
    with pytest.raises(UsageError, match=r"checkpoint-2: a checkpoint of another format \(3\); delete the folder"):
        go("original")


def test_a_stage_resumed_on_another_number_of_processes_is_refused(trained, monkeypatch):
    """The global batch and each sample's position depend on the process count: a 16-GPU stage
    resumed on 8 would train another LoRA."""
    folder = trained["done"]
    before = file_tree(folder)
    monkeypatch.setattr(differential, "train", _no_training)

    class TwoProcesses:
        num_processes, is_main_process = 2, True

    with pytest.raises(UsageError, match=r"holds a stage trained with other settings \(processes: 1 -> 2\)"):
        train_round_lora(_dit(), _cache(), SETTINGS, str(folder), accelerator=TwoProcesses(), progress=False)
    assert file_tree(folder) == before
