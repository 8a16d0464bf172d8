"""`crescent train --config app/configs/NAME.yaml [--section.key value ...]`: LightningCLI-style training.

YAML sections mirror constructor arguments: `model:` (app.module.CrescentModule), `data:`
(app.datamodule.CrescentDataModule), `trainer:` (lightning Trainer) and `run:` (where the run lives, checkpoint and
export cadence, MLflow). A run directory that already holds a checkpoint is resumed automatically: same data
position, same optimizer state, same MLflow run.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from app.run import RunOptions, train_from_cli


def main(argv: list[str]) -> int:
    from lightning.pytorch.cli import LightningCLI

    import app.strategies  # noqa: F401  (registers muon_ddp / muon_fsdp by name)
    from app.datamodule import CrescentDataModule
    from app.module import CrescentModule

    class CrescentCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(RunOptions, "run")
            parser.link_arguments("model.schedule", "data.schedule")

        def instantiate_trainer(self, **kwargs):
            run = RunOptions(**self.config["run"])
            trainer_init = self._get(self.config_init, "trainer", default={})
            bar = trainer_init.get("enable_progress_bar")
            callbacks, logger = run.build(progress_bar=bar is not False)
            configured = _as_list(trainer_init.get("callbacks"))
            # The YAML's own loggers (TensorBoard, CSV, ...) sit beside the outage-safe MLflow logger, which comes
            # first (`trainer.logger`). Callbacks go in at construction so that Lightning uses our progress bar.
            loggers = [logger, *(lg for lg in _as_list(trainer_init.get("logger")) if not isinstance(lg, bool))]
            kwargs.pop("logger", None)
            kwargs.pop("callbacks", None)
            return super().instantiate_trainer(**kwargs, logger=loggers, callbacks=[*configured, *callbacks],
                                               enable_progress_bar=run.progress_bar and bar is not False)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # argv is sys.argv[2:] (after `crescent train`); Lightning's DDP launcher re-runs sys.argv, so it stays as is.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # Manual optimization checkpoints after the optimizer step on purpose (the resumable state is post-step).
    warnings.filterwarnings("ignore", message=".*Using ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    try:
        cli = CrescentCLI(CrescentModule, CrescentDataModule, run=False, args=argv,
                          save_config_callback=None, auto_configure_optimizers=False,
                          parser_kwargs={"prog": "crescent train", "default_env": False},
                          trainer_defaults={"max_epochs": -1, "logger": False, "enable_checkpointing": True,
                                            "num_sanity_val_steps": 0})
    except ValueError as err:  # bad config values: name the key, stop before training
        print(f"crescent train: error: {err}", file=sys.stderr)
        return 2
    return train_from_cli(cli, Path.cwd())


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
