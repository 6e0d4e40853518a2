"""The trained tiny model's weights, shipped inside the package.

`artaug_ext/assets/<name>/` holds the files of a trained tiny model in FLUX.1-dev's layout
(fp16 safetensors with BFL / Hugging Face keys, plus the two tokenizer folders the text
encoders were trained with), so materialising the model is a copy and it loads through
DiffSynth's hashing loader like any FLUX.1-dev checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

WEIGHT_FILES = {
    "dit": "flux1-dev.safetensors",
    "vae": "ae.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")


def asset_dir(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", name)


def has_assets(name: str) -> bool:
    folder = asset_dir(name)
    return all(os.path.isfile(os.path.join(folder, rel)) for rel in WEIGHT_FILES.values())


def load_asset_state_dicts(name: str) -> dict[str, dict[str, torch.Tensor]]:
    """{file role: state dict in the file's own keys and dtype} of the shipped model `name`."""
    folder = asset_dir(name)
    if not has_assets(name):
        raise FileNotFoundError(
            f"the trained tiny model {name!r} is not in {folder}; reinstall artaug-ext or train it with "
            "recipes/train_tiny.py"
        )
    return {role: load_file(os.path.join(folder, rel)) for role, rel in WEIGHT_FILES.items()}


def copy_asset_tokenizers(name: str, folder: str) -> bool:
    """Copy the shipped tokenizers into a model folder (so ids match training); False if none ship."""
    src = asset_dir(name)
    if not all(os.path.isdir(os.path.join(src, d)) for d in TOKENIZER_DIRS):
        return False
    for d in TOKENIZER_DIRS:
        shutil.copytree(os.path.join(src, d), os.path.join(folder, d), dirs_exist_ok=True)
    return True


def export_model_files(file_state_dicts: dict[str, dict[str, torch.Tensor]], tokenizer_src: str, out: str,
                       dtype: torch.dtype = torch.float16) -> None:
    """Write a trained model as package assets: weights in `dtype`, tokenizers copied.

    Written into a temporary folder renamed into place, so a reader never sees half a model.
    """
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for role, state in file_state_dicts.items():
        path = os.path.join(tmp, WEIGHT_FILES[role])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, path,
                  metadata={"format": "pt"})
    for d in TOKENIZER_DIRS:
        shutil.copytree(os.path.join(tokenizer_src, d), os.path.join(tmp, d))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
