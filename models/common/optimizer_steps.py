"""Acting once per optimizer step, not once per batch, under gradient accumulation.

With `Trainer(accumulate_grad_batches=k)` Lightning runs `on_train_batch_end` after every
batch but steps the optimizer on every k-th one (and on an epoch's last). Lightning has no
public "did this batch step" query (its own is the private `fit_loop._should_accumulate()`).
`trainer.global_step` is public and counts optimizer steps, and Lightning updates it before
`on_train_batch_end`: a batch stepped when it differs from its value at the batch's start.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


def stepped(trainer: L.Trainer, step_at_batch_start: int) -> bool:
    """Whether the training batch that started at `step_at_batch_start` (the trainer's
    global_step in `on_train_batch_start`) stepped the optimizer."""
    return trainer.global_step != step_at_batch_start


class OptimizerStepCallback(Callback):
    """A callback whose `after_optimizer_step` runs at the end of each training batch that
    stepped the optimizer; batches that only accumulated gradients are passed over."""

    _step_at_batch_start = -1

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if stepped(trainer, self._step_at_batch_start):
            self.after_optimizer_step(trainer, module)

    def after_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Runs after a batch that stepped; `trainer.global_step` counts that step."""
