"""The tiny image-metric checkpoints load and score through DiffSynth's own metric path.

Each metric is loaded with DiffSynth's `*Metric.from_pretrained(ModelConfig(path=...))`: the
hashing loader finds our registry entry, DiffSynth's state-dict converter maps the file's real
key layout onto our small class, and the metric's processor and score run unchanged. Nothing
is downloaded (the conftest's socket guard refuses non-loopback connections).
"""

import math
import os

import numpy as np
import pytest
import torch
from diffsynth.configs import MODEL_CONFIGS
from diffsynth.core import ModelConfig
from diffsynth.core.loader import hash_model_file
from diffsynth.metrics import AestheticMetric, CLIPMetric, HPSv2Metric, ImageRewardMetric, PickScoreMetric
from diffsynth.models.model_loader import ModelPool
from PIL import Image

from artaug_ext.registry import keys_hash, register
from artaug_ext.tiny import metric_models as mm
from artaug_ext.tiny import metrics as tm

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle on a blue background"

# our name: (DiffSynth metric class, its from_pretrained argument for the processor folder, takes a prompt)
METRICS = {
    "aesthetic": (AestheticMetric, "processor_config", False),
    "pickscore": (PickScoreMetric, "processor_config", True),
    "clip": (CLIPMetric, "processor_config", True),
    "hpsv2": (HPSv2Metric, "processor_config", True),
    "imagereward": (ImageRewardMetric, "tokenizer_config", True),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
        built = tm.ensure_tiny_metrics(str(tmp_path_factory.mktemp("metrics-root")))
        register()
        yield built


@pytest.fixture(autouse=True)
def _skip_download(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")


@pytest.fixture
def fetched(monkeypatch):
    """Every model `ModelPool.fetch_model` hands to a metric, in order."""
    seen = []
    original = ModelPool.fetch_model

    def recording(self, model_name, index=None):
        model = original(self, model_name, index)
        seen.append((model_name, model))
        return model

    monkeypatch.setattr(ModelPool, "fetch_model", recording)
    return seen


def images() -> list[Image.Image]:
    """Three different noise pictures of odd sizes (the processors resize and crop them)."""
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((48, 40), (40, 64), (33, 33))]


def load(name: str, folder: str):
    cls, processor_arg, _ = METRICS[name]
    sub = os.path.join(folder, tm.METRIC_FOLDERS[name])
    return cls.from_pretrained(model_config=ModelConfig(path=os.path.join(sub, tm.WEIGHTS_FILE)),
                               **{processor_arg: ModelConfig(path=sub)}, device="cpu", torch_dtype=torch.float32)


def score(name: str, metric, pictures) -> list[float]:
    return metric.score(PROMPT, pictures) if METRICS[name][2] else metric.score(pictures)


def test_every_metric_has_a_spec_and_the_scorer_knows_it():
    from artaug_ext.interact.scorers import SCORERS, DiffSynthMetricScorer

    assert set(tm.TINY_METRICS) == set(tm.METRIC_FOLDERS) == set(METRICS) == set(DiffSynthMetricScorer._SPECS)
    assert set(SCORERS) == {"heuristic", "analyser", "separation", *DiffSynthMetricScorer._SPECS}


def test_registry_entries(folder):
    ours = [e for e in MODEL_CONFIGS if e.get("_artaug_ext") == tm.MARK]
    assert register() == 0  # idempotent: all present already
    assert [e for e in MODEL_CONFIGS if e.get("_artaug_ext") == tm.MARK] == ours
    # PickScore and CLIP share one architecture, hence one entry, as the real ViT-H/14 files do.
    assert sorted(e["model_name"] for e in ours) == [
        "image_metrics_aesthetic", "image_metrics_clip_hf", "image_metrics_hpsv2", "image_metrics_image_reward"]
    for name, spec in tm.TINY_METRICS.items():
        file_hash = hash_model_file(os.path.join(folder, spec.folder, tm.WEIGHTS_FILE))
        matches = [e for e in MODEL_CONFIGS if e["model_hash"] == file_hash]  # what DiffSynth's loader looks up
        assert [e["model_class"] for e in matches] == [spec.model_class_path], name
        assert matches[0]["model_name"] == spec.model_name
        assert matches[0]["state_dict_converter"].startswith("diffsynth.utils.state_dict_converters.image_metrics.")


def test_file_layouts_are_the_real_checkpoints_layouts():
    """Applied to DiffSynth's full-size models (on meta), our layouts give the real files' registered hashes."""
    from diffsynth.models.aesthetic import AestheticModel
    from diffsynth.models.clip import ImageMetricsCLIPModel
    from diffsynth.models.image_reward import ImageRewardModel

    real = {e["model_name"]: e["model_hash"] for e in MODEL_CONFIGS if not e.get("_artaug_ext")}
    shapes = lambda state: keys_hash({k: list(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        clip = ImageMetricsCLIPModel()
        assert shapes(mm.clip_hf_file_state_dict(clip)) == real["image_metrics_clip_hf"]
        assert shapes(mm.open_clip_file_state_dict(clip)) == real["image_metrics_hpsv2"]
        assert shapes(mm.aesthetic_file_state_dict(AestheticModel())) == real["image_metrics_aesthetic"]
        assert shapes(mm.image_reward_file_state_dict(ImageRewardModel())) == real["image_metrics_image_reward"]


@pytest.mark.parametrize("name", list(METRICS))
def test_metric_loads_our_class_and_scores(folder, fetched, name):
    spec = tm.TINY_METRICS[name]
    pictures = images()
    first = load(name, folder)
    assert [n for n, _ in fetched] == [spec.model_name]
    model = fetched[0][1]
    assert type(model) is spec.model_class
    # DiffSynth's converter put the file's tensors where the built model has them.
    built, loaded = spec.build().state_dict(), model.state_dict()
    assert set(loaded) == set(built)
    for key in built:
        if not key.startswith("blip.itm_head."):  # not in ImageReward files: DiffSynth's converter adds zeros
            assert torch.equal(loaded[key], built[key]), key

    scores = score(name, first, pictures)
    assert len(scores) == len(pictures)
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len(set(scores)) > 1, "the score does not depend on the image"
    assert score(name, load(name, folder), pictures) == scores  # a second load scores identically
    assert score(name, first, pictures[:1]) == pytest.approx(scores[:1], abs=1e-5)


def test_imagereward_special_tokens_fit_the_text_encoder(folder):
    metric = load("imagereward", folder)
    tokenizer, text = metric.model.tokenizer, metric.model.blip.config.text_config
    assert tokenizer.enc_token_id == tm.BERT_VOCAB + 1 < text.vocab_size
    assert tokenizer.bos_token_id == text.bos_token_id == tm.BERT_VOCAB
    assert tokenizer.pad_token_id == text.pad_token_id == 0


def test_pickscore_probabilities_match_a_hand_computation(folder):
    metric = load("pickscore", folder)
    pictures = images()[:2]
    clip, processor = metric.model.model, metric.model.processor
    inputs = processor(text=[PROMPT], images=pictures, padding=True, truncation=True, max_length=77,
                       return_tensors="pt")
    with torch.no_grad():
        out = clip(**inputs)  # CLIP's own forward: projected embeddings of both towers
    text, image = out.text_embeds.double(), out.image_embeds.double()
    cosine = (text / text.norm(dim=-1, keepdim=True)) @ (image / image.norm(dim=-1, keepdim=True)).T
    logits = clip.logit_scale.double().exp() * cosine[0]
    expected = torch.softmax(logits, dim=-1)
    assert metric.score(PROMPT, pictures) == pytest.approx(logits.tolist(), abs=1e-5)
    assert metric.probabilities(PROMPT, pictures) == pytest.approx(expected.tolist(), abs=1e-6)
    assert sum(metric.probabilities(PROMPT, pictures)) == pytest.approx(1.0, abs=1e-6)


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def test_build_is_deterministic_and_repairs_an_incomplete_folder(folder, tmp_path):
    again = tm.ensure_tiny_metrics(str(tmp_path))
    assert again == os.path.join(str(tmp_path), "artaug-ext", "tiny-image-metrics")
    reference = _files(folder)
    assert _files(again) == reference  # byte-identical
    assert not [p for p in os.listdir(os.path.dirname(again)) if p.startswith(".")]  # no temporary folders left

    marker = os.path.join(again, tm.MARKER)
    before = os.stat(marker).st_mtime_ns
    assert tm.ensure_tiny_metrics(str(tmp_path)) == again and os.stat(marker).st_mtime_ns == before  # not rebuilt

    os.remove(os.path.join(again, "HPSv2", tm.WEIGHTS_FILE))  # an interrupted copy
    assert not tm.is_complete(again)
    tm.ensure_tiny_metrics(str(tmp_path))
    assert _files(again) == reference


def test_scorer_reads_the_tiny_folder_as_its_model_dir(folder):
    from artaug_ext.interact.scorers import make_scorer

    pictures = images()[:2]
    scorer = make_scorer("aesthetic+pickscore+clip+hpsv2+imagereward", model_dir=folder, device="cpu")
    assert scorer.quality_keys == ("aesthetic", "pickscore", "hpsv2", "imagereward")
    assert scorer.alignment_keys == ("clip",)
    rows = scorer.score(pictures, PROMPT)
    assert len(rows) == 2
    for name in METRICS:
        direct = score(name, load(name, folder), pictures)
        assert [row[name] for row in rows] == pytest.approx(direct, abs=1e-6), name
