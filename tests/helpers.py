"""Shared test helpers: the tiny model's files and FLUX.1-dev-named copies of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_folder(name: str = "tiny-random") -> str:
    from artaug_ext.hub import model_root
    from artaug_ext.tiny.build import ensure_tiny_model
    from artaug_ext.tiny.spec import get_spec

    return ensure_tiny_model(get_spec(name), model_root())


def make_fake_flux_dev(root: str, name: str = "tiny-random") -> str:
    """Lay the tiny model's files out under FLUX.1-dev's real names (T5 in two shards, as released)."""
    src = tiny_folder(name)
    dst = os.path.join(root, "black-forest-labs", "FLUX.1-dev")
    os.makedirs(os.path.join(dst, "text_encoder_2"), exist_ok=True)
    for rel in ("flux1-dev.safetensors", "ae.safetensors", "text_encoder/model.safetensors"):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy(os.path.join(src, rel), os.path.join(dst, rel))
    for rel in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(src, rel), os.path.join(dst, rel), dirs_exist_ok=True)
    t5 = load_file(os.path.join(src, "text_encoder_2", "model.safetensors"))
    keys = sorted(t5)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        save_file({k: t5[k] for k in part}, os.path.join(dst, "text_encoder_2", f"model-0000{i + 1}-of-00002.safetensors"))
    return dst


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "artaug_ext.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


PAUSE_AT = os.path.join(REPO, "tests", "pause_at.py")


def child_env(**extra) -> dict:
    """The environment of a CLI child process: one thread, not part of a distributed launch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def start_paused(args: list[str], pause_at: str, marker, timeout: float = 240) -> subprocess.Popen:
    """Start `artaug ARGS` under tests/pause_at.py and wait until it pauses at `pause_at`
    ("event:n"); the caller kills it (or lets it hold its locks)."""
    import time

    if os.path.exists(marker):
        os.unlink(marker)
    proc = subprocess.Popen([sys.executable, PAUSE_AT, *args], env=child_env(PAUSE_AT=pause_at, PAUSE_MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + timeout
    while not os.path.exists(marker):
        if proc.poll() is not None:
            raise AssertionError(f"ended before pausing at {pause_at}: {proc.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"never paused at {pause_at}")
        time.sleep(0.05)
    return proc


def kill_when_paused(args: list[str], pause_at: str, marker) -> None:
    """Run `artaug ARGS` until it pauses at `pause_at`, then SIGKILL it."""
    import signal

    proc = start_paused(args, pause_at, marker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def ranks_in_turn():
    """A `Collective` for one process playing the ranks of WORLD_SIZE in turn (sharding tests):
    there is no other process to wait for or to hear from."""
    from artaug_ext.dist import Collective

    class RanksInTurn(Collective):
        def barrier(self) -> None:
            pass

        def broadcast(self, obj):
            return obj

        def gather(self, obj) -> list:
            return [obj] * self.info.world

        def check_shared_folder(self, folder: str, option: str = "--out") -> None:
            pass  # every rank is this process: one folder by construction

    return RanksInTurn()


# Training-grammar scenes of two objects: the heuristic critic's suggestions on them have
# local prompts of their own (one object's), so every micro run enhances and trains. (On a
# one-object prompt every local prompt is the global one, an identity, and is dropped.)
MICRO_PROMPTS = [
    "a large black square at the bottom and a small red circle at the top on a light purple background, normal light",
    "a large black circle in the top left and a small orange triangle in the top right on a light blue background, dim light",
    "a large red square on the right and a small green circle in the top left on a black background",
]

# The micro recipe: tiny-random at 64 px and 2 steps, every enhanced pair kept (margin -1).
MICRO = {
    "run": {"name": "micro", "model": "tiny-random", "rounds": 2, "seed": 3, "stop_mean_gain": -10.0},
    "data": {"prompts": MICRO_PROMPTS, "size": 64, "steps": 2},
    "critic": {"backend": "heuristic"},
    "filter": {"scorer": "heuristic", "margin": -1.0},
    "train": {"mode": "batched", "rank": 2, "lr": 1e-3, "steps_stage1": 3, "steps_stage2": 3, "batch_size": 2,
              "resolution": 32, "checkpoint_every": 1},
}


def micro_recipe(path, extra: str = "", **tables):
    """Write the micro recipe to `path` with the keys of `tables` ({"train": {"rank": 4}, ...})
    changed (a value None: the key left out), and `extra` TOML text appended; returns `path`."""
    import json

    merged = {name: dict(keys) for name, keys in MICRO.items()}
    for name, keys in tables.items():
        merged.setdefault(name, {}).update(keys)
    lines = []
    for name, keys in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items() if value is not None]
        lines.append("")
    path.write_text("\n".join(lines) + extra)
    return path


def run_recorded_before(tmp_path, keys: dict[str, tuple[str, ...]]):
    """A micro run folder (tmp_path/run) whose run.json an artaug-ext without the recipe keys
    `keys` ({table: (key, ...)}) wrote, and the micro recipe it was written for: (folder, recipe)."""
    import json

    from artaug_ext.recipe.config import load_recipe
    from artaug_ext.recipe.runner import _check_run_json

    recipe = load_recipe(str(micro_recipe(tmp_path / "micro.toml")))
    out = tmp_path / "run"
    out.mkdir()
    _check_run_json(str(out), recipe)  # writes the record
    record = json.loads((out / "run.json").read_text())
    for table, names in keys.items():
        for name in names:
            del record["recipe"][table][name]
    (out / "run.json").write_text(json.dumps(record))
    return out, recipe


def file_tree(folder) -> dict:
    """{relative path: bytes} of every file under `folder` (bitwise comparisons of run folders)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def start_ranks(args: list[str], world: int = 2, *, outs: list | None = None, paused: dict | None = None,
                env: dict | None = None) -> list[subprocess.Popen]:
    """`artaug ARGS` as a `world`-process launch without a launcher agent (what torchrun sets,
    rank by rank, as a scheduler such as Slurm starts them), gloo on CPU, one thread a rank.
    `outs`: a per-rank value for `--out`; `paused`: {rank: (pause_at, marker)} runs that rank
    under tests/pause_at.py (the caller waits for the marker and kills it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        rank_env = dict(child_env(**(env or {})), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        entry = ["-m", "artaug_ext.cli"]
        if paused and rank in paused:
            pause_at, marker = paused[rank]
            if os.path.exists(marker):
                os.unlink(marker)
            rank_env.update(PAUSE_AT=pause_at, PAUSE_MARKER=str(marker))
            entry = [PAUSE_AT]
        rank_args = list(args) + (["--out", str(outs[rank])] if outs else [])
        procs.append(subprocess.Popen([sys.executable, *entry, *rank_args], env=rank_env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each rank, in rank order."""
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results
