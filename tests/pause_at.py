"""Run `artaug ...` in this process, paused forever at a chosen point, for kill -9 tests.

PAUSE_AT="event:n" pauses at the n-th `event` after writing the file PAUSE_MARKER (its second
line: the pid), so the test knows when to SIGKILL the process; with PAUSE_RANK=r, only the
process of RANK r pauses (a launch whose every rank runs this file, as torchrun starts them). The faults are injected here, from outside the
product: the product's own writers are wrapped (monkeypatched) in this process only.

Events:
  item      before the n-th item's original image is generated (`artaug interact`)
  png       inside the n-th PNG write, with half of the temporary file written
  manifest  inside the n-th manifest append, with half of the line written
  cache     after the n-th pair written into a latent cache (`artaug run`)
  step      after the n-th optimizer step's loss line, before its checkpoint (`artaug run`, main process)
  train     before the n-th training step's forward and backward, on any rank (`artaug run`)
"""

import os
import sys
import time

COUNTS: dict[str, int] = {}


def hit(event: str) -> bool:
    name, _, count = os.environ.get("PAUSE_AT", "").partition(":")
    if name != event or os.environ.get("PAUSE_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
        return False
    COUNTS[event] = COUNTS.get(event, 0) + 1
    return COUNTS[event] == int(count or 1)


def pause() -> None:
    with open(os.environ["PAUSE_MARKER"], "w") as f:
        f.write(f"{os.environ['PAUSE_AT']}\n{os.getpid()}\n")
    while True:
        time.sleep(1)


def install() -> None:
    from artaug_ext import files
    from artaug_ext.interact import loop as interact_loop

    real_write, real_append = files.atomic_write_bytes, files.append_line

    def write(path, data, shared=False):
        if path.endswith(".png") and hit("png"):
            tmp = f"{path}.{os.getpid()}.tmp" if shared else path + ".tmp"
            with open(tmp, "wb") as f:  # what a kill inside the real write leaves: half a temporary file
                f.write(data[: len(data) // 2])
            pause()
        return real_write(path, data, shared)

    def append(path, record):
        if hit("manifest"):
            line = files.json_line(record)
            with open(path, "ab") as f:  # half a line, as a kill inside the append leaves it
                f.write(line[: len(line) // 2])
            pause()
        return real_append(path, record)

    real_original = interact_loop.InteractRun.generate_original

    def original(self, prompt_index, image_index):
        if hit("item"):
            pause()
        return real_original(self, prompt_index, image_index)

    for module in (files, interact_loop):
        if hasattr(module, "atomic_write_bytes"):
            module.atomic_write_bytes = write
        if hasattr(module, "append_line"):
            module.append_line = append
    interact_loop.InteractRun.generate_original = original
    from artaug_ext.train import cache, loop

    real_save = cache.save_safetensors

    def save_cache_item(tensors, path, metadata=None):
        out = real_save(tensors, path, metadata)
        if hit("cache"):
            pause()
        return out

    cache.save_safetensors = save_cache_item
    real_log = loop.append_line

    def log_step(path, record):
        out = real_log(path, record)
        if hit("step"):
            pause()
        return out

    loop.append_line = log_step
    real_step_loss = loop._step_loss

    def step_loss(*args, **kwargs):
        if hit("train"):
            pause()
        return real_step_loss(*args, **kwargs)

    loop._step_loss = step_loss


if __name__ == "__main__":
    install()
    from artaug_ext.cli import main

    sys.exit(main(sys.argv[1:]))
