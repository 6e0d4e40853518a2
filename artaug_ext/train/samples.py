"""Sample images of a LoRA in training ([train] sample_every): what a stage's model draws for
fixed prompts and a fixed seed every N steps, so that a run's report shows each stage learning.

A stage's images go into its own folder, `samples/step-000050-00.png` (the step, the prompt's
index), and `samples/samples.json` lists them (step, prompt, seed, file) in step order.
Generation is seeded, so a stage killed and resumed makes the images after its last checkpoint
again, byte for byte, and the list is rewritten from the step being sampled on: no step is
listed twice and none is lost. Readable without torch (the run report reads it).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from ..files import atomic_write_bytes, atomic_write_json, read_json

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"  # in a stage folder
SAMPLES_FILE = "samples.json"
SAMPLES_FORMAT = 1


def sample_name(step: int, index: int) -> str:
    """The file of prompt `index`'s image at `step`."""
    return f"step-{step:06d}-{index:02d}.png"


def read_samples(stage_folder: str) -> list[dict]:
    """The sample images a stage made so far ({step, prompt, seed, file}, in step order; file
    relative to the stage's samples/ folder); [] when it made none."""
    path = os.path.join(stage_folder, SAMPLES_DIR, SAMPLES_FILE)
    if not os.path.isfile(path):
        return []
    fix = (f"delete {os.path.dirname(path)}: training the stage again (delete its folder) makes its sample images "
           "again")
    return read_json(path, "sample image list", fix)["samples"]


@dataclass
class StageSampler:
    """`sampler(stage_folder, step)` generates one image per prompt, each from `seed`, through
    `pipe` as its DiT is at that moment (a training stage's adapters injected: the LoRA in
    training, on top of whatever is merged under it), at the given generation settings, and
    writes them into the stage's samples/ folder. The DiT is put in eval mode for the images
    and back in the mode it was in; generation runs without gradients and draws its noise from
    its own seeded generators, so it changes nothing that training computes."""

    pipe: object  # DiffSynth's FluxImagePipeline whose `.dit` is being trained
    prompts: list[str]
    seed: int
    steps: int | None = None  # None: the model's defaults
    height: int | None = None
    width: int | None = None
    guidance: float = 3.5

    def __call__(self, stage_folder: str, step: int) -> None:
        from ..interact.images import png_bytes
        from ..pipeline import generate_batch

        t0 = time.perf_counter()
        dit = self.pipe.dit
        was_training = dit.training
        dit.eval()
        try:
            images = generate_batch(self.pipe, list(self.prompts), [self.seed] * len(self.prompts), steps=self.steps,
                                    height=self.height, width=self.width, embedded_guidance=self.guidance)
        finally:
            dit.train(was_training)
        folder = os.path.join(stage_folder, SAMPLES_DIR)
        made = []
        for index, (prompt, image) in enumerate(zip(self.prompts, images, strict=True)):
            name = sample_name(step, index)
            atomic_write_bytes(os.path.join(folder, name), png_bytes(image))
            made.append({"step": step, "prompt": prompt, "seed": self.seed, "file": name})
        # a resumed stage samples again from its last checkpoint on: what a killed run listed from here is replaced
        earlier = [r for r in read_samples(stage_folder) if r["step"] < step]
        atomic_write_json(os.path.join(folder, SAMPLES_FILE), {"format": SAMPLES_FORMAT, "samples": earlier + made})
        logger.info("%s: %d sample image(s) at step %d (%.1fs)", stage_folder, len(made), step,
                    time.perf_counter() - t0)
