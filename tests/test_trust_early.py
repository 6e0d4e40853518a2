"""Errors before the work: every bad option is found in the argument checks, before a model
is loaded, with one line naming the option and the fix.

The CLI runs in-process here (`artaug_ext.cli.main`); `load_pipeline` is replaced by a
function that fails the test, so a check that comes too late is caught. A folder that is
not writable is simulated with a patched `os.access` (the tests may run as root, for whom
every folder is writable)."""

import os

import pytest

from artaug_ext import pipeline
from artaug_ext.cli import main


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad argument was reported")

    monkeypatch.setattr(pipeline, "load_pipeline", refuse)


@pytest.fixture
def read_only(monkeypatch):
    """Make os.access say W_OK is denied under the given folders."""
    denied = []
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and any(os.path.abspath(path).startswith(d) for d in denied):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return lambda folder: denied.append(os.path.abspath(str(folder)))


def one_line_error(capsys, args, expected):
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, (args, err)
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, (args, err)
    for part in expected if isinstance(expected, (list, tuple)) else [expected]:
        assert part in lines[0], (args, lines[0])
    return lines[0]


def test_out_that_is_a_folder_or_in_a_read_only_folder(tmp_path, capsys, read_only):
    gen = ["generate", "--prompt", "x", "--model", "tiny-random"]
    one_line_error(capsys, gen + ["--out", str(tmp_path)], ["--out", "is a folder", "out.png"])
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro)
    one_line_error(capsys, gen + ["--out", str(ro / "a.png")], ["--out", "is not writable", "choose another place"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    one_line_error(capsys, ["interact", "--prompts", str(prompts), "--out", str(a_file), "--model", "tiny-random"],
                   ["--out", "is a file", "give a folder"])
    one_line_error(capsys, ["interact", "--prompts", str(prompts), "--out", str(ro / "run"), "--model", "tiny-random"],
                   ["--out", "not writable"])
    run_dir = tmp_path / "run"
    (run_dir / "shards").mkdir(parents=True)
    one_line_error(capsys, ["interact-export", str(run_dir), "--out", str(a_file)], ["--out", "is a file"])


def test_devices(capsys):
    import torch

    gen = ["generate", "--prompt", "x", "--model", "tiny-random", "--out", os.devnull + "x.png"]
    one_line_error(capsys, gen + ["--device", "bogus"], ["--device 'bogus'", "use cpu, cuda or cuda:N"])
    one_line_error(capsys, gen + ["--device", "cuda:x"], "not a device")
    if not torch.cuda.is_available():
        one_line_error(capsys, gen + ["--device", "cuda"], ["--device cuda", "no CUDA GPU", "--device cpu"])
        one_line_error(capsys, gen + ["--device", "cuda:1"], "no CUDA GPU")


def test_model_dir_that_is_a_file_or_cannot_take_a_first_build(tmp_path, capsys, read_only):
    out = str(tmp_path / "a.png")
    a_file = tmp_path / "models.bin"
    a_file.write_bytes(b"x")
    gen = ["generate", "--prompt", "x", "--model", "tiny-random", "--out", out]
    one_line_error(capsys, gen + ["--model-dir", str(a_file)], ["--model-dir", "is a file"])
    empty = tmp_path / "shared-cache"
    empty.mkdir()
    read_only(empty)
    one_line_error(capsys, gen + ["--model-dir", str(empty)],
                   ["not writable", "first build of the embedded tiny-random model", "--model-dir"])
    one_line_error(capsys, ["generate", "--prompt", "x", "--model", "flux-dev", "--out", out, "--model-dir", str(empty)],
                   ["not writable", "downloading black-forest-labs/FLUX.1-dev"])


def test_read_only_model_root_that_holds_the_model_is_fine(tmp_path, read_only, monkeypatch):
    from artaug_ext.cli.args import check_model_dir
    from artaug_ext.tiny.build import ensure_tiny_model
    from artaug_ext.tiny.spec import get_spec

    ensure_tiny_model(get_spec("tiny-random"), str(tmp_path / "root"))
    read_only(tmp_path / "root")
    check_model_dir("tiny-random", str(tmp_path / "root"))  # no error: nothing to write


def test_image_sizes_beyond_the_pixel_limit(tmp_path, capsys):
    gen = ["generate", "--prompt", "x", "--model", "tiny-random", "--out", str(tmp_path / "a.png")]
    line = one_line_error(capsys, gen + ["--height", "100000"],
                          ["256x100000 is 25.6 MP, above the limit of 4.2 MP", "GiB", "--max-pixels"])
    assert "at least 37 GiB" in line  # 3 x 128 channels x 25.6 MP x 4 bytes
    one_line_error(capsys, gen + ["--height", "99984", "--width", "99984"], ["99984x99984 is 9996.8 MP", "above the limit"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    one_line_error(capsys, ["interact", "--prompts", str(prompts), "--out", str(tmp_path / "r"), "--model",
                            "tiny-random", "--size", "4096x4096"], ["--size 4096x4096", "above the limit"])
    # the override reaches the check: 512x512 under a 100k-pixel limit is refused, above it not
    one_line_error(capsys, gen + ["--height", "512", "--width", "512", "--max-pixels", "100000"], "above the limit")


def test_missing_lora_file_and_prompts_are_found_first(tmp_path, capsys):
    one_line_error(capsys, ["generate", "--prompt", "x", "--model", "tiny-random", "--out", str(tmp_path / "a.png"),
                            "--lora", str(tmp_path / "nope.safetensors")], ["--lora", "nope.safetensors", "no such file"])
    one_line_error(capsys, ["interact", "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")],
                   ["--prompts", "no such file"])


def test_download_of_an_unknown_short_name_lists_the_known_ones(capsys):
    line = one_line_error(capsys, ["download", "flux-pro"], ["unknown model 'flux-pro'", "flux-dev", "artaug"])
    assert "tiny" not in line  # embedded models have nothing to download
    one_line_error(capsys, ["download", "tiny"], "embedded in artaug-ext")
