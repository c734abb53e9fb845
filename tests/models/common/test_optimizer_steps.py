"""Under gradient accumulation, what acts per optimizer step (checkpoints, evaluation
during training, the diffusion EMA) acts once per step, not once per batch."""

from __future__ import annotations

import lightning as L
import torch

from models.common.optimizer_steps import OptimizerStepCallback
from models.diffusion.model import DiffusionConfig, LatentDiffusion, UNetConfig, build_unet

# 3 batches an epoch, 2 accumulated per step: Lightning steps on batch 2 and on the
# epoch's last (batch 3), so 4 steps take 6 batches over 2 epochs.
BATCHES_PER_EPOCH, ACCUMULATE, MAX_STEPS = 3, 2, 4


def _trainer(callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_steps=MAX_STEPS,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=list(callbacks),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


class _Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(BATCHES_PER_EPOCH, 2), batch_size=1)


class _Record(OptimizerStepCallback):
    def __init__(self):
        self.steps, self.batches = [], 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)

    def after_optimizer_step(self, trainer, module) -> None:
        self.steps.append(trainer.global_step)


def test_a_callback_acts_once_per_optimizer_step_including_an_epochs_last_batch():
    record = _Record()
    _trainer([record]).fit(_Linear())
    assert record.batches == 6
    assert record.steps == [1, 2, 3, 4]


def test_the_diffusion_ema_follows_optimizer_steps_not_batches():
    torch.manual_seed(0)
    overrides = {"block_out_channels": [8, 8, 8], "norm_num_groups": 4, "attention_head_dim": 2}
    unet = build_unet(UNetConfig(overrides=overrides), 16, 16, (4, 8, 8))
    module = LatentDiffusion(unet, DiffusionConfig(max_steps=MAX_STEPS, warmup_steps=1))
    batch = {
        "latents": torch.randn(2, 4, 8, 8),
        "states": torch.randn(2, 4, 16),
        "pooled": torch.randn(2, 16),
    }
    loader = torch.utils.data.DataLoader([batch] * BATCHES_PER_EPOCH, batch_size=None)
    _trainer().fit(module, train_dataloaders=loader)
    assert module.ema.optimization_step == MAX_STEPS
