"""How fast `artaug` answers: --help, --version, an argument error, the offline
missing-model error and the refusal of a run folder another process holds (one process, and a
2-rank launch as torchrun or a scheduler starts it: until its last rank has exited), each a
fresh interpreter, against `python -c pass` measured in the same run.

    python benchmarks/bench_startup.py [--runs 5] [--source DIR]

--source times another checkout of the project (its artaug_ext is put first on PYTHONPATH),
e.g. an older commit: `git worktree add /tmp/old <commit>` then `--source /tmp/old`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def timed(cmd: list[str], env: dict, runs: int) -> tuple[float, int]:
    samples, rc = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        rc = subprocess.run(cmd, env=env, capture_output=True).returncode
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), rc


def timed_launch(cmd: list[str], env: dict, runs: int, world: int = 2) -> tuple[float, int]:
    """`cmd` as a `world`-rank launch (RANK, WORLD_SIZE, MASTER_ADDR/PORT), until every rank exits."""
    import socket

    samples, rc = [], 0
    for _ in range(runs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t = time.perf_counter()
        procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in range(world)]
        rc = max(p.wait() for p in procs)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), rc


HOLD = """import sys, time
from artaug_ext.files import FolderLock
from artaug_ext.recipe.layout import RUN_LOCK
FolderLock(sys.argv[1], RUN_LOCK).acquire()
print("held", flush=True)
time.sleep(3600)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--source", default=None, help="a source tree to time instead of the installed artaug_ext")
    args = p.parse_args()
    env = dict(os.environ)
    if args.source:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(args.source)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    empty = tempfile.mkdtemp()
    os.chdir(empty)  # `python -m` puts the working directory first: a checkout there would hide --source
    offline = dict(env, ARTAUG_HOME=empty, MODELSCOPE_CACHE=os.path.join(empty, "ms"), ARTAUG_OFFLINE="1")
    cli = [sys.executable, "-m", "artaug_ext.cli"]
    cases = [
        ("python -c pass", [sys.executable, "-c", "pass"], env),
        ("artaug --help", cli + ["--help"], env),
        ("artaug --version", cli + ["--version"], env),
        ("argument error (--height 100)", cli + ["generate", "--prompt", "x", "--height", "100"], env),
        ("offline missing-model error", cli + ["generate", "--model", "flux-dev", "--prompt", "x", "--out",
                                               os.path.join(empty, "x.png")], offline),
    ]
    from artaug_ext.cli.demo import demo_recipe_path

    held = os.path.join(empty, "held-run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, held], env=env, stdout=subprocess.PIPE)
    holder.stdout.readline()  # the lock is held from here on
    refused = cli + ["run", demo_recipe_path(), "--out", held, "--device", "cpu"]
    cases += [("folder in use (1 process)", refused, env), ("folder in use (2-rank launch)", refused, env)]
    base = None
    print(f"{'command':<34}{'median s':>10}{'minus python':>14}{'exit':>6}   ({args.runs} runs each)")
    try:
        for name, cmd, e in cases:
            t, rc = (timed_launch if "launch" in name else timed)(cmd, e, args.runs)
            base = t if base is None else base
            print(f"{name:<34}{t:>10.2f}{t - base:>14.2f}{rc:>6}")
    finally:
        holder.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
