"""The hub layer, offline: local resolution, caches, integrity checks, fast offline errors."""

import os
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from artaug_ext import hub
from artaug_ext.errors import UsageError


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("ARTAUG_HOME", str(tmp_path / "root"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "mscache"))
    monkeypatch.delenv("DIFFSYNTH_MODEL_BASE_PATH", raising=False)
    monkeypatch.delenv("DIFFSYNTH_DOWNLOAD_SOURCE", raising=False)
    return tmp_path / "root"


def _lora(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"lora_unet_img_in.lora_down.weight": torch.ones(4, 8)}, path)


def test_model_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("ARTAUG_HOME", raising=False)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "ds"))
    assert hub.model_root() == str(tmp_path / "ds")
    monkeypatch.setenv("ARTAUG_HOME", str(tmp_path / "ah"))
    assert hub.model_root() == str(tmp_path / "ah")
    assert hub.model_root(str(tmp_path / "explicit")) == str(tmp_path / "explicit")
    monkeypatch.delenv("ARTAUG_HOME")
    monkeypatch.delenv("DIFFSYNTH_MODEL_BASE_PATH")
    assert hub.model_root().endswith(os.path.join(".cache", "artaug"))


def test_resolves_files_in_diffsynth_layout(root):
    path = root / "DiffSynth-Studio" / "ArtAug-lora-FLUX.1dev-v1" / "merged_lora.safetensors"
    _lora(str(path))
    files = hub.resolve_model_files("artaug")
    assert files == {"lora": [str(path)]}
    # by either hub's id too
    assert hub.hub_lookup("ECNU-CILab/ArtAug-lora-FLUX.1dev-v1").name == "artaug"


def test_finds_modelscope_cache(root, tmp_path):
    path = tmp_path / "mscache" / "models" / "DiffSynth-Studio" / "ArtAug-lora-FLUX.1dev-v1" / "merged_lora.safetensors"
    _lora(str(path))
    assert hub.resolve_model_files("artaug")["lora"] == [str(path)]


def test_explicit_model_dir_holding_files_directly(root, tmp_path):
    _lora(str(tmp_path / "mine" / "merged_lora.safetensors"))
    assert hub.resolve_model_files("artaug", str(tmp_path / "mine"))["lora"][0].endswith("merged_lora.safetensors")


def test_offline_error_is_fast_and_names_id_files_and_fixes(root):
    t = time.perf_counter()
    with pytest.raises(hub.MissingModelError) as e:
        hub.resolve_model_files("flux-dev")
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert "black-forest-labs/FLUX.1-dev" in msg and "flux1-dev.safetensors" in msg and "tokenizer_2/" in msg
    assert "artaug download black-forest-labs/FLUX.1-dev" in msg and "--model-dir" in msg


def test_skip_download_env_answers_at_once(root, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    called = []
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: called.append(1) or True)
    with pytest.raises(hub.MissingModelError, match="switched off"):
        hub.resolve_model_files("artaug")
    assert not called


def test_download_uses_modelscope_with_patterns(root, monkeypatch):
    calls = []

    def fake_download(model_id, local_dir, allow_file_pattern, revision):
        calls.append((model_id, allow_file_pattern, revision))
        _lora(os.path.join(local_dir, "merged_lora.safetensors"))

    import modelscope

    monkeypatch.setattr(modelscope, "snapshot_download", fake_download)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: True)
    files = hub.download("artaug", revision="v1")
    assert calls == [("DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1", ["merged_lora.safetensors"], "v1")]
    assert files["merged_lora.safetensors"][0].startswith(str(root))
    # second call: local, no download
    hub.resolve_model_files("artaug")
    assert len(calls) == 1


def test_huggingface_source_uses_hf_id(root, monkeypatch):
    calls = []

    def fake_hf(repo_id, local_dir, allow_patterns, revision):
        calls.append(repo_id)
        _lora(os.path.join(local_dir, "merged_lora.safetensors"))

    import huggingface_hub

    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "huggingface")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hf)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: True)
    files = hub.resolve_model_files("artaug")
    assert calls == ["ECNU-CILab/ArtAug-lora-FLUX.1dev-v1"]
    assert "DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1" in files["lora"][0]  # one root, one place


def test_failed_download_reports_the_fix(root, monkeypatch):
    import modelscope

    def boom(*a, **k):
        raise ConnectionError("reset by peer")

    monkeypatch.setattr(modelscope, "snapshot_download", boom)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: True)
    with pytest.raises(hub.MissingModelError, match="download failed: ConnectionError"):
        hub.resolve_model_files("artaug")


@pytest.mark.parametrize("damage", ["truncate", "header", "short"])
def test_corrupt_safetensors_detected(root, damage):
    path = root / "DiffSynth-Studio" / "ArtAug-lora-FLUX.1dev-v1" / "merged_lora.safetensors"
    _lora(str(path))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-10])
    elif damage == "header":
        path.write_bytes(struct.pack("<Q", 20) + b"{not json at all....." + data[28:])
    else:
        path.write_bytes(b"abc")
    with pytest.raises(hub.CorruptModelFileError) as e:
        hub.resolve_model_files("artaug")
    assert str(path) in str(e.value) and "artaug download" in str(e.value)


def test_check_safetensors_accepts_valid(tmp_path):
    p = str(tmp_path / "ok.safetensors")
    save_file({"x": torch.zeros(7, 3), "y": torch.ones(2)}, p, metadata={"k": "v"})
    hub.check_safetensors(p)


def test_unknown_catalogue_name():
    with pytest.raises(UsageError, match="unknown model 'flux-pro'; known: .*flux-dev"):
        hub.resolve_model_files("flux-pro")


def test_incomplete_sharded_download_is_reported(root):
    import json

    folder = root / "black-forest-labs" / "FLUX.1-dev" / "text_encoder_2"
    folder.mkdir(parents=True)
    save_file({"a": torch.zeros(2)}, str(folder / "model-00001-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(hub.MissingModelError, match="model-00002-of-00002.safetensors"):
        hub.resolve("black-forest-labs/FLUX.1-dev", ["text_encoder_2/*.safetensors"], local_files_only=True)
