"""Materialise a tiny FLUX model as files laid out like the FLUX.1-dev repository.

The files are what DiffSynth would download for FLUX.1-dev, only small:

    {root}/artaug-ext/tiny-random/
        flux1-dev.safetensors          DiT, BFL keys
        ae.safetensors                 VAE encoder + decoder, BFL keys
        text_encoder/model.safetensors CLIP text encoder, Hugging Face keys
        text_encoder_2/model.safetensors  T5 encoder, Hugging Face keys
        tokenizer/  tokenizer_2/       CLIP BPE and T5 Unigram tokenizers
        artaug_tiny.json               what was built (written last: marks completion)

so they load through DiffSynth's hashing loader and converters, the same path as the real
model. Building is deterministic from the spec's seed and atomic (a temporary folder
renamed into place), so concurrent or interrupted runs never leave a half-written model.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from ..errors import RunLockedError
from ..files import FolderLock, sha256_file
from . import layout
from .models import (
    TinyFluxDiT,
    TinyFluxTextEncoderClip,
    TinyFluxTextEncoderT5,
    TinyFluxVAEDecoder,
    TinyFluxVAEEncoder,
)
from .spec import TinyFluxSpec
from .tokenizers import build_clip_tokenizer, build_t5_tokenizer
from .trained import TOKENIZER_DIRS, WEIGHT_FILES, copy_asset_tokenizers, load_asset_state_dicts

logger = logging.getLogger(__name__)

MARKER = "artaug_tiny.json"
FORMAT_VERSION = 1

# role -> path in the model folder: the weight files (one table, in trained.py) plus the tokenizer folders.
FILES = {**WEIGHT_FILES, **{d: d for d in TOKENIZER_DIRS}}


def build_modules(spec: TinyFluxSpec, device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """The spec's modules with deterministic random weights (or shapes only on `meta`)."""
    with torch.device(device):
        if str(device) != "meta":
            torch.manual_seed(spec.seed)
        return {
            "dit": TinyFluxDiT(**spec.dit),
            "text_encoder": TinyFluxTextEncoderClip(**spec.clip),
            "text_encoder_2": TinyFluxTextEncoderT5(**spec.t5),
            "vae_encoder": TinyFluxVAEEncoder(**spec.vae),
            "vae_decoder": TinyFluxVAEDecoder(**spec.vae),
        }


def file_state_dicts(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """{file role: state dict with the FLUX.1-dev repository's key names}."""
    return {
        "dit": layout.dit_file_state_dict(modules["dit"]),
        "vae": layout.vae_file_state_dict(modules["vae_encoder"], modules["vae_decoder"]),
        "text_encoder": layout.clip_file_state_dict(modules["text_encoder"]),
        "text_encoder_2": layout.t5_file_state_dict(modules["text_encoder_2"]),
    }


def model_folder(spec: TinyFluxSpec, root: str) -> str:
    return os.path.join(root, spec.model_id)


def is_complete(folder: str) -> bool:
    """The marker is there and every file it lists has the sha256 it recorded (the files are
    small, so a truncated or overwritten file is found here rather than inside DiffSynth)."""
    marker = os.path.join(folder, MARKER)
    if not os.path.isfile(marker):
        return False
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    if info.get("format_version") != FORMAT_VERSION or not all(
            os.path.exists(os.path.join(folder, rel)) for rel in FILES.values()):
        return False
    for role, digest in info.get("files", {}).items():
        path = os.path.join(folder, FILES[role])
        if not os.path.isfile(path) or sha256_file(path) != digest:
            logger.warning("%s does not match what was built (truncated or changed): rebuilding the model", path)
            return False
    return True


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_model_files(spec: TinyFluxSpec, folder: str, state_dicts: dict[str, dict[str, torch.Tensor]],
                      extra_info: dict | None = None) -> None:
    """Write weights (fp32 unless given otherwise), tokenizers and the completion marker into `folder`."""
    for role, state in state_dicts.items():
        path = os.path.join(folder, FILES[role])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path, metadata={"format": "pt"})
    if spec.weights_from and copy_asset_tokenizers(spec.weights_from, folder):
        # A trained model keeps the exact tokenizers its text embeddings were trained with.
        clip_vocab = len(_read_json(os.path.join(folder, FILES["tokenizer"], "vocab.json")))
        t5_vocab = len(_read_json(os.path.join(folder, FILES["tokenizer_2"], "tokenizer.json"))["model"]["vocab"])
    else:
        clip_vocab = build_clip_tokenizer(os.path.join(folder, FILES["tokenizer"]))
        t5_vocab = build_t5_tokenizer(os.path.join(folder, FILES["tokenizer_2"]))
    if clip_vocab > spec.clip["vocab_size"] or t5_vocab > spec.t5["vocab_size"]:
        raise ValueError(f"tokenizer vocabularies ({clip_vocab}, {t5_vocab}) exceed the text encoders' tables")
    info = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "seed": spec.seed,
        "description": spec.description,
        "files": {role: sha256_file(os.path.join(folder, FILES[role])) for role in state_dicts},
        **(extra_info or {}),
    }
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def ensure_tiny_model(spec: TinyFluxSpec, root: str) -> str:
    """Return the folder of `spec`'s files under `root`, building them first if needed (also
    when a file in it is corrupt). Builders take a lock beside the folder, so concurrent
    builders wait for one another, and temporary folders left by a killed build are removed."""
    folder = model_folder(spec, root)
    parent = os.path.dirname(folder)
    lock = FolderLock(parent, f".{spec.name}.build.lock", what="tiny model build folder")
    if is_complete(folder) and _matches_assets(spec, folder):
        if glob.glob(os.path.join(parent, f".{spec.name}.tmp-*")) and os.access(parent, os.W_OK):
            try:
                with lock:  # not waiting: a live build holds it, and its folder is not stale
                    _remove_stale_builds(spec, parent)
            except RunLockedError:
                pass
        return folder
    os.makedirs(parent, exist_ok=True)
    with lock.acquire(wait=True):
        if is_complete(folder) and _matches_assets(spec, folder):  # built while we waited
            return folder
        _remove_stale_builds(spec, parent)
        logger.info("Building the tiny model %r in %s (once)", spec.name, folder)
        tmp = tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=parent)
        try:
            if spec.weights_from:
                states = load_asset_state_dicts(spec.weights_from)  # trained weights shipped in the package
            else:
                states = file_state_dicts(build_modules(spec))
            write_model_files(spec, tmp, states)
            if os.path.exists(folder):
                # An incomplete or corrupt folder (an interrupted older build, stale trained weights): replace it.
                shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _remove_stale_builds(spec: TinyFluxSpec, parent: str) -> None:
    """Temporary folders of killed builds (call with the build lock held: every live builder
    holds it while its temporary folder exists, so the ones found now are stale)."""
    for stale in glob.glob(os.path.join(parent, f".{spec.name}.tmp-*")):
        logger.info("removing %s, left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _matches_assets(spec: TinyFluxSpec, folder: str) -> bool:
    """A trained model's folder is current only if it was built from the installed assets."""
    if not spec.weights_from:
        return True
    from .trained import asset_dir

    built = _read_json(os.path.join(folder, MARKER)).get("files", {})
    assets = asset_dir(spec.weights_from)
    return all(built.get(role) == sha256_file(os.path.join(assets, rel)) for role, rel in WEIGHT_FILES.items())


def model_file_paths(folder: str) -> dict[str, str]:
    return {role: os.path.join(folder, rel) for role, rel in FILES.items()}
