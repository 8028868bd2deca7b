"""The function Ray Train runs on each worker, in a module of its own: the driver hands it to TorchTrainer by reference,
and importing the training loop there would load timm (2.2-2.5 s on 2 cores) in a process that never trains."""

from __future__ import annotations


def train_loop_per_worker(loop_config: dict) -> None:
    from jobs.training.loop import Trainer

    Trainer.setup(loop_config).fit()
