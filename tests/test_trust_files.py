"""Every file error names the file (and line), says what is wrong and the fix."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from artaug_ext.cli import main
from artaug_ext.errors import FileFormatError
from artaug_ext.files import check_safetensors, read_jsonl
from artaug_ext.lora import load_lora, read_lora


def _good_lora(path):
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 128),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(384, 4)}, str(path))
    return path


class _NotATensor:
    pass


def _bad_files(tmp_path):
    good = _good_lora(tmp_path / "good.safetensors")
    data = good.read_bytes()
    files = {
        "truncated.safetensors": (data[: len(data) - 100], "truncated"),
        "empty.safetensors": (b"", "empty"),
        "random.safetensors": (os.urandom(4096), "not a safetensors file"),
        "text.safetensors": (b"just some text, not a LoRA at all\n" * 10, "not a safetensors file"),
        "trailing.safetensors": (data + b"\0" * 64, "bytes after the last tensor"),
        "random.pt": (os.urandom(512), "not a tensor-only torch file"),
        "object.ckpt": (pickle.dumps({"state": _NotATensor()}), "not a tensor-only torch file"),
    }
    for name, (content, _) in files.items():
        (tmp_path / name).write_bytes(content)
    return {name: what for name, (_, what) in files.items()}


def test_bad_lora_files_name_the_file_api(tmp_path):
    for name, what in _bad_files(tmp_path).items():
        path = str(tmp_path / name)
        with pytest.raises(FileFormatError) as e:
            read_lora(path)
        assert e.value.path == path and what in str(e.value) and "Fix:" in str(e.value), (name, str(e.value))
        assert "\n" not in str(e.value)


def test_bad_lora_files_through_the_cli_are_one_line(tmp_path, capsys, pipe, monkeypatch):
    from artaug_ext import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pipe)  # the module-scoped tiny-random pipe
    for name, what in _bad_files(tmp_path).items():
        rc = main(["generate", "--prompt", "x", "--model", "tiny-random", "--out", str(tmp_path / "o.png"),
                   "--lora", str(tmp_path / name), "--steps", "1", "--height", "32", "--width", "32"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, (name, err)
        assert str(tmp_path / name) in err and what in err, (name, err)
    assert not (tmp_path / "o.png").exists()


def test_safetensors_offsets_are_checked_tensor_by_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.zeros(2, 3)}, str(path))
    header = check_safetensors(str(path))
    assert header["a"]["data_offsets"] == [0, 16]

    def rewrite(edit):
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        h = json.loads(raw[8:8 + n])
        edit(h)
        new = json.dumps(h).encode()
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
        return str(bad)

    def wrong_shape(h):
        h["a"]["shape"] = [5]

    def overlap(h):
        h["b"]["data_offsets"] = [8, 32]

    def bad_dtype(h):
        h["a"]["dtype"] = "F17"

    for edit, what in ((wrong_shape, "do not hold a F32 tensor of shape [5]"), (overlap, "starts at byte 8"),
                       (bad_dtype, "unknown dtype")):
        with pytest.raises(FileFormatError, match="bad.safetensors") as e:
            check_safetensors(rewrite(edit))
        assert what in str(e.value), str(e.value)


def test_peft_folder_with_broken_config(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4,\n "lora_alpha": }')
    _good_lora(folder / "adapter_model.safetensors")
    with pytest.raises(FileFormatError, match=r"adapter_config.json:2: not valid JSON"):
        load_lora(torch.nn.Linear(2, 2), str(folder))


def test_corrupt_tiny_model_file_is_detected_and_rebuilt(tmp_path, caplog):
    import logging

    from artaug_ext.files import sha256_file
    from artaug_ext.pipeline import load_pipeline
    from artaug_ext.tiny.build import ensure_tiny_model, model_file_paths
    from artaug_ext.tiny.spec import get_spec

    root = str(tmp_path / "root")
    folder = ensure_tiny_model(get_spec("tiny-random"), root)
    dit = model_file_paths(folder)["dit"]
    good = sha256_file(dit)
    with open(dit, "r+b") as f:  # overwrite bytes inside a tensor: same size, other content
        f.seek(os.path.getsize(dit) - 64)
        f.write(os.urandom(64))
    with caplog.at_level(logging.WARNING):
        pipe = load_pipeline("tiny-random", model_dir=root, device="cpu", torch_dtype=torch.float32)
    assert "does not match what was built" in caplog.text and sha256_file(dit) == good
    assert pipe.dit is not None
    with open(dit, "r+b") as f:  # truncated
        f.truncate(1000)
    ensure_tiny_model(get_spec("tiny-random"), root)
    assert sha256_file(dit) == good


def test_prompt_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("a red circle\nun caf\xe9 bleu\n".encode("latin-1"))
    rc = main(["interact", "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--model", "tiny-random"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{prompts}:2: this prompt file is not UTF-8 text" in err and "save it as UTF-8" in err, err
    assert len(err.splitlines()) == 1


def test_corrupt_manifest_line_in_the_middle_names_the_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", \n{"id": "c"}\n')
    with pytest.raises(FileFormatError, match=r"manifest.jsonl:2: line 2 of this manifest is not a JSON record"):
        read_jsonl(str(path))
    path.write_text('{"id": "a"}\n{"id": "b"')  # a torn LAST line is an interrupted append, not corruption
    assert read_jsonl(str(path)) == [{"id": "a"}]


def test_corrupt_shard_manifest_stops_a_resume_with_the_line(tmp_path, pipe, monkeypatch):
    from artaug_ext.interact.config import InteractConfig
    from artaug_ext.interact.loop import run_interact

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = InteractConfig(prompts=["a red circle", "a blue star"], model="tiny-random", steps=1, height=32, width=32)
    run_dir = tmp_path / "run"
    run_interact(cfg, str(run_dir), pipe=pipe, progress=False)
    shard = next((run_dir / "shards").glob("manifest-*.jsonl"))
    lines = shard.read_bytes().split(b"\n")
    shard.write_bytes(b"\n".join([lines[0][:20]] + lines[1:]))
    with pytest.raises(FileFormatError, match=rf"{shard.name}:1: .*delete that line"):
        run_interact(cfg, str(run_dir), pipe=pipe, progress=False)
    shutil.rmtree(run_dir)
