"""A training's loss log (loss.jsonl: one line per optimizer step), readable without torch
(the run report and the run-folder layout read it)."""

from __future__ import annotations

import os

from ..files import read_jsonl

LOSS_LOG = "loss.jsonl"


def read_loss_log(output_dir: str) -> list[dict]:
    """The per-step records of a training's loss log (step, loss, lr, seconds)."""
    return read_jsonl(os.path.join(output_dir, LOSS_LOG), what="loss log")
