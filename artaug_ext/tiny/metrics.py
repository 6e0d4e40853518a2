"""Tiny random-weight checkpoints of DiffSynth's image metrics, laid out like `DiffSynth-Studio/ImageMetrics`.

The real metric weights are gigabytes on ModelScope; tests and offline runs need the same
loading and scoring path without them. `ensure_tiny_metrics` writes

    {root}/artaug-ext/tiny-image-metrics/
        Aesthetic/                          model.safetensors + preprocessor_config.json
        PickScore/                          model.safetensors + CLIPProcessor files
        CLIP-ViT-H-14-laion2B-s32B-b79K/    model.safetensors + CLIPProcessor files
        HPSv2/                              model.safetensors (OpenCLIP keys) + CLIPProcessor files
        ImageReward/                        model.safetensors (ImageReward's BLIP keys) + BertTokenizer files
        artaug_tiny_metrics.json            what was built (written last: marks completion)

each weight file in the key layout of its real counterpart, so DiffSynth's `*Metric.from_pretrained`
loads it through its hashing loader and its own state-dict converter once `artaug_ext.registry.register()`
has added the tiny files' hashes to `diffsynth.configs.MODEL_CONFIGS`. Tokenizers are built offline
(the CLIP BPE of `tokenizers.py`, a WordPiece vocabulary from `vocab.WORDS`) and saved with the
transformers classes' `save_pretrained`. Building is deterministic from the seeds and atomic.

The folder can be given as `model_dir` to `artaug_ext.interact.scorers.make_scorer`: the hub layer
finds the metric subfolders directly in it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from ..files import sha256_file
from . import metric_models as mm
from .tokenizers import build_clip_tokenizer
from .vocab import WORDS

logger = logging.getLogger(__name__)

# Our metric name -> subfolder of `DiffSynth-Studio/ImageMetrics` that DiffSynth's from_pretrained defaults use.
METRIC_FOLDERS = {
    "aesthetic": "Aesthetic",
    "pickscore": "PickScore",
    "clip": "CLIP-ViT-H-14-laion2B-s32B-b79K",
    "hpsv2": "HPSv2",
    "imagereward": "ImageReward",
}
WEIGHTS_FILE = "model.safetensors"
MODEL_ID = "artaug-ext/tiny-image-metrics"
MARKER = "artaug_tiny_metrics.json"
FORMAT_VERSION = 1
MARK = "tiny-image-metrics"  # value of "_artaug_ext" in our MODEL_CONFIGS entries

_CONVERTERS = "diffsynth.utils.state_dict_converters.image_metrics."

IMAGE_SIZE = 32  # every tiny vision tower and processor works at 32x32 pixels (patch 8: 16 patches)
CLIP_TEXT_VOCAB = 2048  # tiny CLIP text tables: above the offline CLIP BPE's vocabulary (checked when built)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0-4; [PAD]=0 is BLIP's pad id
BERT_VOCAB = 1022  # WordPiece vocabulary, padded with [unusedN] like BERT's, to this size
# ImageRewardMetric adds [DEC] (the BLIP text bos token) and [ENC] after the vocabulary, as for BERT-base's 30522 + 2.
BERT_TEXT_VOCAB = BERT_VOCAB + 2
BERT_MAX_LENGTH = 64  # the tiny BLIP text encoder's position table (ImageRewardMetric tokenizes to 35)

_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
               image_size=IMAGE_SIZE, patch_size=8)
_CLIP_KWARGS = dict(
    projection_dim=16,
    text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
              max_position_embeddings=77, vocab_size=CLIP_TEXT_VOCAB),
    vision=_VISION,
)


@dataclass(frozen=True)
class TinyMetricSpec:
    """One metric's tiny checkpoint: the DiffSynth model it stands in for, its file layout, sizes and seed."""

    name: str
    model_name: str  # what the metric's from_pretrained asks `model_pool.fetch_model` for
    model_class: type[torch.nn.Module]
    converter: str  # DiffSynth's converter in diffsynth.utils.state_dict_converters.image_metrics
    file_state_dict: Callable[[torch.nn.Module], dict[str, torch.Tensor]]
    processor: str  # "image" (CLIPImageProcessor), "clip" (CLIPProcessor) or "bert" (BertTokenizer)
    kwargs: dict
    seed: int

    @property
    def folder(self) -> str:
        return METRIC_FOLDERS[self.name]

    @property
    def model_class_path(self) -> str:
        return f"{self.model_class.__module__}.{self.model_class.__qualname__}"

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model with deterministic random weights from `seed` (shapes only on `meta`)."""
        with torch.device(device):
            if str(device) != "meta":
                torch.manual_seed(self.seed)
            return self.model_class(**self.kwargs)


# PickScore and CLIP share one architecture, so (as for the real ViT-H/14 files) their tiny files have
# the same header hash and one registry entry; different seeds give them different weights.
TINY_METRICS: dict[str, TinyMetricSpec] = {
    "aesthetic": TinyMetricSpec(
        "aesthetic", "image_metrics_aesthetic", mm.TinyAestheticModel, "ImageMetricsAestheticStateDictConverter",
        mm.aesthetic_file_state_dict, "image", dict(**_VISION, projection_dim=16), seed=11),
    "pickscore": TinyMetricSpec(
        "pickscore", "image_metrics_clip_hf", mm.TinyImageMetricsCLIPModel, "ImageMetricsCLIPStateDictConverter",
        mm.clip_hf_file_state_dict, "clip", _CLIP_KWARGS, seed=12),
    "clip": TinyMetricSpec(
        "clip", "image_metrics_clip_hf", mm.TinyImageMetricsCLIPModel, "ImageMetricsCLIPStateDictConverter",
        mm.clip_hf_file_state_dict, "clip", _CLIP_KWARGS, seed=13),
    "hpsv2": TinyMetricSpec(
        "hpsv2", "image_metrics_hpsv2", mm.TinyImageMetricsCLIPModel, "ImageMetricsOpenCLIPStateDictConverter",
        mm.open_clip_file_state_dict, "clip", _CLIP_KWARGS, seed=14),
    "imagereward": TinyMetricSpec(
        "imagereward", "image_metrics_image_reward", mm.TinyImageRewardModel,
        "ImageMetricsImageRewardStateDictConverter", mm.image_reward_file_state_dict, "bert",
        dict(image_size=IMAGE_SIZE, projection_dim=16,
             vision={k: v for k, v in _VISION.items() if k != "image_size"},
             text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                       max_position_embeddings=BERT_MAX_LENGTH, vocab_size=BERT_TEXT_VOCAB, bos_token_id=BERT_VOCAB,
                       sep_token_id=BERT_SPECIALS.index("[SEP]"))),
        seed=15),
}


# ---------------------------------------------------------------------------- registry
# `artaug_ext.registry` builds DiffSynth registry entries from these (it computes the hashes);
# this module hands it shapes and class paths only.

def metric_model_specs() -> list[dict]:
    """Per tiny checkpoint: the tensor shapes of its file (built on `meta`), DiffSynth's model
    name, our model class and converter, and the constructor keyword arguments."""
    return [{"name": spec.name, "shapes": {k: list(v.shape) for k, v in spec.file_state_dict(spec.build("meta")).items()},
             "model_name": spec.model_name, "model_class": spec.model_class_path,
             "state_dict_converter": _CONVERTERS + spec.converter, "extra_kwargs": json.loads(json.dumps(spec.kwargs))}
            for spec in TINY_METRICS.values()]


# ---------------------------------------------------------------------------- tokenizers and processors

def bert_vocab() -> list[str]:
    """WordPiece tokens for the tiny ImageReward text encoder, in id order (BERT_VOCAB of them).

    BERT's special tokens first, then `vocab.WORDS`, every lower-case printable character alone
    and every letter and digit as a `##` continuation (so any English text tokenizes without
    [UNK]), then [unusedN] up to BERT_VOCAB.
    """
    tokens = list(BERT_SPECIALS)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    candidates = [w.lower() for w in WORDS] + list(chars) + ["##" + c for c in string.ascii_lowercase + string.digits]
    for token in candidates:
        if token not in tokens:
            tokens.append(token)
    if len(tokens) > BERT_VOCAB:
        raise ValueError(f"the tiny WordPiece vocabulary has {len(tokens)} tokens, more than BERT_VOCAB={BERT_VOCAB}; "
                         "raise BERT_VOCAB in artaug_ext/tiny/metrics.py")
    tokens += [f"[unused{i}]" for i in range(BERT_VOCAB - len(tokens))]
    return tokens


def _image_processor():
    from transformers import CLIPImageProcessor

    # CLIPImageProcessor's defaults are OpenAI CLIP's (bicubic, CLIP mean/std); only the size is tiny.
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _processors(scratch: str) -> dict[str, object]:
    """{processor kind: object with save_pretrained}, all built offline."""
    from transformers import BertTokenizer, CLIPProcessor, CLIPTokenizer

    clip_vocab = build_clip_tokenizer(scratch)
    if clip_vocab > CLIP_TEXT_VOCAB:
        raise ValueError(f"the offline CLIP tokenizer has {clip_vocab} tokens, more than CLIP_TEXT_VOCAB={CLIP_TEXT_VOCAB}; "
                         "raise CLIP_TEXT_VOCAB in artaug_ext/tiny/metrics.py")
    return {
        "image": _image_processor(),
        "clip": CLIPProcessor(image_processor=_image_processor(), tokenizer=CLIPTokenizer.from_pretrained(scratch)),
        "bert": BertTokenizer(vocab={t: i for i, t in enumerate(bert_vocab())}, do_lower_case=True,
                              model_max_length=BERT_MAX_LENGTH),
    }


# ---------------------------------------------------------------------------- files

def _spec_fingerprint() -> dict:
    return {name: {"folder": s.folder, "model_name": s.model_name, "model_class": s.model_class_path,
                   "kwargs": s.kwargs, "seed": s.seed} for name, s in TINY_METRICS.items()}


def _expected_files() -> list[str]:
    return [f"{s.folder}/{WEIGHTS_FILE}" for s in TINY_METRICS.values()]


def is_complete(folder: str) -> bool:
    """True if `folder` holds a finished build of the current TINY_METRICS table."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    if info.get("format_version") != FORMAT_VERSION or info.get("metrics") != json.loads(json.dumps(_spec_fingerprint())):
        return False
    return all(os.path.isfile(os.path.join(folder, rel)) for rel in list(info.get("files", {})) + _expected_files())


def write_metric_files(folder: str) -> None:
    """Write every tiny metric's weights and processor into `folder`, then the completion marker."""
    scratch = os.path.join(folder, ".clip-tokenizer")
    processors = _processors(scratch)
    for spec in TINY_METRICS.values():
        sub = os.path.join(folder, spec.folder)
        os.makedirs(sub, exist_ok=True)
        state = spec.file_state_dict(spec.build())
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(sub, WEIGHTS_FILE),
                  metadata={"format": "pt"})
        processors[spec.processor].save_pretrained(sub)
    shutil.rmtree(scratch)
    files = sorted(os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/")
                   for d, _, names in os.walk(folder) for n in names)
    info = {"format_version": FORMAT_VERSION, "metrics": _spec_fingerprint(),
            "files": {rel: sha256_file(os.path.join(folder, rel)) for rel in files}}
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def metrics_folder(root: str) -> str:
    return os.path.join(root, MODEL_ID)


def ensure_tiny_metrics(root: str) -> str:
    """Return `{root}/artaug-ext/tiny-image-metrics`, building it first if it is missing, incomplete or stale."""
    folder = metrics_folder(root)
    if is_complete(folder):
        return folder
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    logger.info("Building the tiny image metrics in %s (once)", folder)
    tmp = tempfile.mkdtemp(prefix=".tiny-image-metrics.tmp-", dir=parent)
    try:
        write_metric_files(tmp)
        if os.path.exists(folder):
            if is_complete(folder):  # another process finished first
                return folder
            shutil.rmtree(folder, ignore_errors=True)  # an interrupted or older build
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):  # lost a race to a broken writer: surface it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
