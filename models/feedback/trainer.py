"""The Lightning trainer both feedback models fine-tune with: a fixed number of steps on
the CPU, no checkpoints (a fine-tune of minutes is rerun, not resumed)."""

from __future__ import annotations

import lightning as L


def fine_tune_trainer(max_steps: int, logger: L.pytorch.loggers.Logger | None) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger or False,
        enable_checkpointing=False,
        log_every_n_steps=25,
        enable_model_summary=False,
    )
