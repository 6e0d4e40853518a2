"""A run folder checks what it resumes from (issue 20): a finished micro run is damaged (cut,
garbage, deleted, moved, a file-size limit) and the next command rebuilds the output bitwise, or
stops with one line that names the file and a fix that works when followed."""

import errno
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, child_env, micro_recipe

from artaug_ext.errors import FileFormatError, OutOfSpaceError
from artaug_ext.recipe.config import load_recipe
from artaug_ext.recipe.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = "\n[eval]\nlimit = 2\nseeds = 1\n"
LORAS = ["final/lora.safetensors", "final/lora_diffsynth.safetensors", "rounds/round-01/lora.safetensors",
         "rounds/round-02/lora.safetensors"]
R2 = "rounds/round-02"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted micro run with its held-out check; each test damages a copy."""
    tmp = tmp_path_factory.mktemp("finished")
    recipe = micro_recipe(tmp / "micro.toml", EVAL)
    run_recipe(load_recipe(str(recipe)), str(tmp / "run"), device="cpu", progress=False)
    return tmp / "run", recipe


def _copy(finished, tmp_path, name="run"):
    src, recipe = finished
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst, recipe


def _rerun(folder, recipe):
    return run_recipe(load_recipe(str(recipe)), str(folder), device="cpu", progress=False)


def _same(a, b, rels):
    for rel in rels:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(bytes(range(256)) * 16)


def _unfinished(folder):
    """Round 2 not finished: its pair dataset is, nothing after it."""
    for name in ("round.json", "lora.safetensors", "train.json"):
        os.remove(folder / R2 / name)
    for name in ("stage1", "stage2", "cache", "report"):
        shutil.rmtree(folder / R2 / name, ignore_errors=True)
    shutil.rmtree(folder / "final")


@pytest.mark.parametrize("rel,damage", [("final/lora.safetensors", _half),
                                        ("final/lora_diffsynth.safetensors", _garbage),
                                        ("final/model_card.json", _half),
                                        ("rounds/round-01/lora.safetensors", _garbage),
                                        ("rounds/round-01/round.json", _garbage)])
def test_a_damaged_output_is_made_again_bitwise_with_a_warning(finished, tmp_path, rel, damage, caplog):
    """Old code: final/ was trusted once model_card.json existed (exit 0, the broken file kept),
    a damaged round LoRA or round.json stopped the run with advice that did not work."""
    folder, recipe = _copy(finished, tmp_path)
    damage(folder / rel)
    summary = _rerun(folder, recipe)
    _same(folder, finished[0], LORAS + ["final/model_card.json"] * rel.startswith("final"))
    assert str(folder / rel) in caplog.text and "again" in caplog.text
    assert summary["eval"]["result"]["timing"]["generated_images"] == 0  # the same LoRA: its images are kept


def test_a_valid_but_other_round_lora_is_not_merged(finished, tmp_path, caplog):
    """A whole safetensors file that is not the one written (its sha256 is recorded in round.json)."""
    folder, recipe = _copy(finished, tmp_path)
    shutil.copyfile(folder / "rounds/round-01/lora.safetensors", folder / R2 / "lora.safetensors")
    _rerun(folder, recipe)
    _same(folder, finished[0], LORAS)
    assert "its sha256 differs from the one recorded" in caplog.text


def test_a_damaged_manifest_of_a_finished_round_is_merged_again_never_dropped(finished, tmp_path, caplog):
    """Old code: cut to half, it lost its last line as 'a torn last line' and the report lost pairs."""
    folder, recipe = _copy(finished, tmp_path)
    manifest = folder / "rounds/round-01/interact/manifest.jsonl"
    _half(manifest)
    _rerun(folder, recipe)
    _same(folder, finished[0], ["rounds/round-01/interact/manifest.jsonl"])
    assert "merging it again" in caplog.text and "torn" not in caplog.text

    # the shard it is merged from damaged too (line 2): one line naming the shard's line; the fix works
    _garbage(manifest)
    shard = folder / "rounds/round-01/interact/shards/manifest-rank00000-of-00001.jsonl"
    lines = shard.read_bytes().split(b"\n")
    shard.write_bytes(b"\n".join([lines[0], b"{not json"] + lines[2:]))
    with pytest.raises(FileFormatError, match=r"manifest-rank00000-of-00001.jsonl:2: line 2 of this manifest shard "
                                              r"is not a JSON record .* Fix: delete that line"):
        _rerun(folder, recipe)
    shard.write_bytes(b"\n".join([lines[0]] + lines[2:]))  # the fix: delete that line
    _rerun(folder, recipe)
    _same(folder, finished[0], LORAS + ["rounds/round-01/interact/manifest.jsonl"])


def test_jsonl_damage_is_a_torn_last_line_only_where_the_file_is_appended(tmp_path):
    from artaug_ext.files import read_jsonl

    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    assert read_jsonl(str(path)) == [{"a": 1}, {"a": 2}]  # appended: an interrupted append
    with pytest.raises(FileFormatError, match=r"m.jsonl:3: line 3 of this manifest is cut off"):
        read_jsonl(str(path), appended=False)  # written whole: damage
    path.write_bytes(b'{"a": 1}\n{"a"\n{"a": 3}\n')
    with pytest.raises(FileFormatError, match=r"m.jsonl:2: line 2 "):
        read_jsonl(str(path))
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n')
    with pytest.raises(FileFormatError, match=r"m.jsonl:2: .*byte 0 is not UTF-8 text"):
        read_jsonl(str(path))


@pytest.mark.parametrize("rel,damage", [(f"{R2}/interact/images/00001-00.original.png", _half),
                                        (f"{R2}/interact/images/00002-00.enhanced.png", os.remove)])
def test_a_pair_image_of_an_unfinished_round_is_made_again_from_its_seed(finished, tmp_path, rel, damage, caplog):
    """Old code: the item stayed done ('3 of 3 items already done') and the cache stopped on the image."""
    folder, recipe = _copy(finished, tmp_path)
    _unfinished(folder)
    damage(folder / rel)
    _rerun(folder, recipe)
    _same(folder, finished[0], LORAS + [rel, f"{R2}/interact/manifest.jsonl"])
    assert f"{folder / rel}: missing or not a readable image" in caplog.text


def test_a_damaged_run_json_is_named_and_the_fix_works(finished, tmp_path, caplog):
    folder, recipe = _copy(finished, tmp_path)
    _garbage(folder / "run.json")
    _rerun(folder, recipe)  # the folder's recipe.toml is the recipe given: written again
    assert "run.json: this run record is not valid JSON" in caplog.text
    _same(folder, finished[0], ["run.json"])

    other = tmp_path / "same-recipe-another-file.toml"
    other.write_text(recipe.read_text() + "\n# another file\n")
    _half(folder / "run.json")
    with pytest.raises(FileFormatError, match=r"run.json: this run record is not valid JSON .* Fix: delete "
                                              r".*run.json: the next `artaug run` .* writes it again and resumes$"):
        _rerun(folder, other)
    os.remove(folder / "run.json")
    _rerun(folder, other)
    _same(folder, finished[0], LORAS)


def test_read_json_names_the_file_on_bytes_that_are_not_utf8(tmp_path):
    from artaug_ext.files import read_json

    path = tmp_path / "card.json"
    path.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(FileFormatError, match=r"card.json: this model card is not valid JSON \(byte 0 is not UTF-8 "
                                              r"text\)\. Fix: make it again"):
        read_json(str(path), "model card", "make it again")


def test_a_full_disk_is_one_line_naming_the_file_and_nothing_written_is_damaged(tmp_path, monkeypatch):
    from artaug_ext import files

    path = tmp_path / "record.json"
    files.atomic_write_json(str(path), {"old": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OutOfSpaceError, match=r"record.json: could not be written: the disk is full or a file-size "
                                              r"limit was hit \(No space left on device\)"):
        files.atomic_write_json(str(path), {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["record.json"]


def test_a_file_size_limit_while_a_checkpoint_is_written_then_the_rerun_resumes(finished, tmp_path):
    """RLIMIT_FSIZE in the child (Python ignores SIGXFSZ, so the write gets EFBIG): old code gave two
    chained torch tracebacks without the file's name."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # a checkpoint's state.pt is ~380 kB

    args = [sys.executable, "-m", "artaug_ext.cli", "run", str(finished[1]), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--threads", "1", "--no-progress"]
    hit = subprocess.run(args, env=child_env(), capture_output=True, text=True, cwd=REPO, preexec_fn=limit, timeout=600)
    assert hit.returncode == 2, hit.stderr[-2000:]
    last = hit.stderr.strip().splitlines()[-1]
    assert "Traceback" not in hit.stderr
    assert last.startswith("artaug: error: ") and "stage1/checkpoint-1: could not be written: the disk is full or a " \
        "file-size limit was hit" in last and "run the same command again" in last, last
    done = subprocess.run(args, env=child_env(), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _same(tmp_path / "run", finished[0], LORAS)


def test_a_moved_run_folder_reruns_and_keeps_its_held_out_images(finished, tmp_path):
    """Old code: final/eval/eval.json held absolute LoRA paths; the copy was refused ('use a new --out')."""
    folder, recipe = _copy(finished, tmp_path, "elsewhere/deeper")
    summary = _rerun(folder, recipe)
    assert summary["eval"]["result"]["timing"]["generated_images"] == 0
    assert str(finished[0]) not in (folder / "final/eval/eval.json").read_text()
    old = json.loads((finished[0] / "final/eval/results.json").read_text())
    assert summary["eval"]["result"]["means"] == old["means"]


def test_eval_of_a_run_in_progress_names_the_process_that_holds_it(tmp_path, capsys):
    from artaug_ext.cli import main
    from artaug_ext.files import FolderLock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    for name in (".artaug-run-lock-rank00000-of-00001", ".artaug-run-lock"):  # the lock's name before and after
        lock = FolderLock(str(folder), name).acquire()
        try:
            assert main(["eval", "--run", str(folder), "--out", str(tmp_path / "ev")]) == 2
        finally:
            lock.release()
        err = capsys.readouterr().err.strip()
        assert f"the run has no finished round yet; it is in progress (process {os.getpid()} holds its lock)" in err
    assert main(["eval", "--run", str(folder), "--out", str(tmp_path / "ev")]) == 2
    assert "the run has no finished round with a LoRA; finish it" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path), "--out", str(tmp_path / "ev")]) == 2
    assert "not an `artaug run` folder (it has no run.json)" in capsys.readouterr().err


def test_a_lora_retrained_into_the_same_path_gets_its_own_eval_images(finished, tmp_path, pipe, caplog):
    """Issue 18: arms by content. Old code returned the old LoRA's images and table for the new one."""
    from artaug_ext.eval.prompts import read_prompt_set
    from artaug_ext.eval.run import Arm, EvalConfig, run_eval

    lora = tmp_path / "my.safetensors"
    shutil.copyfile(finished[0] / "rounds/round-01/lora.safetensors", lora)

    def evaluate(out):
        cfg = EvalConfig(model="tiny-random", prompts=read_prompt_set("tiny-heldout:2"), seeds=1, steps=2, width=64,
                         height=64, arms=[Arm("base"), Arm("my", [(str(lora), 1.0)])], n_boot=50)
        return run_eval(cfg, str(tmp_path / out), pipe=pipe, progress=False, report=False)

    evaluate("ev")
    shutil.copyfile(finished[0] / "final/lora.safetensors", lora)  # re-trained: the same path, other content
    again = evaluate("ev")
    fresh = evaluate("fresh")
    assert again["timing"]["generated_images"] == 2  # that arm's images, not the base's
    assert "eval arm my: its files are not those its images were made with" in caplog.text
    for name in ("00000-s00.png", "00001-s00.png"):
        assert (tmp_path / "ev/images/my" / name).read_bytes() == (tmp_path / "fresh/images/my" / name).read_bytes()
    assert again["means"] == fresh["means"]
    assert again["arms"][1]["loras"][0]["file"] == "my.safetensors" and "sha256" in again["arms"][1]["loras"][0]


def test_a_difference_is_never_cut_in_the_middle():
    from artaug_ext.files import first_difference

    short = first_difference({"a": "/x/run/final/lora.safetensors"}, {"a": "/y/run/final/lora.safetensors"})
    assert short == "a: /x/run/final/lora.safetensors -> /y/run/final/lora.safetensors"
    long = first_difference({"a": "p" * 300}, {"a": "q" * 300})
    assert long.startswith("a: a text of 300 characters (sha256 ") and long.count("->") == 1 and long.endswith(")")
