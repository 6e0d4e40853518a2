"""Concurrency and leftovers: a run folder is locked by its first process, and a killed
build of the tiny model leaves nothing behind."""

import os
import signal
import subprocess
import sys
import time

from helpers import REPO, child_env, start_paused


def test_second_interact_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue star\n")
    args = ["interact", "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--model", "tiny-random",
            "--steps", "1", "--size", "32", "--no-progress", "--threads", "1"]
    first = start_paused(args, "item:1", tmp_path / "paused")
    try:
        second = subprocess.run([sys.executable, "-m", "artaug_ext.cli", *args], env=child_env(), capture_output=True,
                                text=True, timeout=300, cwd=REPO)
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"is in use by process {first.pid}" in err[0], second.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    # the kill released the lock: the same command now runs (and resumes what the first left)
    third = subprocess.run([sys.executable, "-m", "artaug_ext.cli", *args], env=child_env(), capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert third.returncode == 0, third.stderr
    assert "2 items" in third.stdout


_BUILD_THEN_HANG = """
import os, sys, time
from artaug_ext.tiny import build
from artaug_ext.tiny.spec import get_spec
real = build.write_model_files
def write_then_hang(spec, folder, states, extra_info=None):
    real(spec, folder, states, extra_info)
    open(sys.argv[2], "w").close()
    time.sleep(600)
build.write_model_files = write_then_hang
build.ensure_tiny_model(get_spec("tiny-random"), sys.argv[1])
"""


def test_killed_first_build_leaves_no_temporary_folder(tmp_path):
    from artaug_ext.tiny.build import ensure_tiny_model, is_complete
    from artaug_ext.tiny.spec import get_spec

    root, marker = tmp_path / "root", tmp_path / "written"
    proc = subprocess.Popen([sys.executable, "-c", _BUILD_THEN_HANG, str(root), str(marker)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 180
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the build never reached its hang"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    parent = root / "artaug-ext"
    assert [n for n in os.listdir(parent) if n.startswith(".tiny-random.tmp-")], "the kill should leave one"
    folder = ensure_tiny_model(get_spec("tiny-random"), str(root))
    assert is_complete(folder)
    assert not [n for n in os.listdir(parent) if n.startswith(".tiny-random.tmp-")]
    # a stale one next to a complete model is removed on the next use too
    os.makedirs(parent / ".tiny-random.tmp-stale")
    ensure_tiny_model(get_spec("tiny-random"), str(root))
    assert not (parent / ".tiny-random.tmp-stale").exists()
