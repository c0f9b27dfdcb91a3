"""Entry points behind ``train.py`` and ``inference.py``: build everything from the config and run it."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from genlab.callbacks.scaling import scale_config_lr
from genlab.distributed import (
    check_strategy,
    export_trained_weights,
    is_deepspeed_checkpoint,
    job_processes,
    refuse_frozen_saved_weights,
    refuse_test_after_zero3,
)

log = logging.getLogger(__name__)


# ---- shared helpers -------------------------------------------------------------------------
def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group mapping (callbacks, loggers)."""
    if not group:
        return []
    if not isinstance(group, Mapping):
        raise TypeError(f"expected a mapping of configs, got {type(group).__name__}")
    return [
        instantiate(node)
        for node in group.values()
        if isinstance(node, Mapping) and "_target_" in node
    ]


@rank_zero_only
def apply_extras(cfg: DictConfig) -> None:
    """Print the composed config, silence warnings and enforce tags when the config asks for it."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("enforce_tags") and not cfg.get("tags"):
        raise ValueError("tags are required: add `tags=[...]` to the command line")
    if extras.get("print_config"):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))


def resolve_ckpt_path(
    ckpt_path: str | None,
    log_dir: str | Path,
    task_name: str,
    current_run: str | Path | None = None,
) -> str | None:
    """``last`` -> the newest ``last.ckpt`` among earlier runs of ``task_name`` (a file, or a
    folder under ``trainer=deepspeed``); a path must exist."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        root = Path(log_dir) / task_name
        current = Path(current_run).resolve() if current_run else None
        found = [
            p
            for p in root.glob("**/checkpoints/last*.ckpt")
            if current is None or current not in p.resolve().parents
        ]
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoints/last.ckpt under {root} to resume from"
            )
        newest = max(found, key=lambda p: p.stat().st_mtime)
        log.info("resuming from %s", newest)
        return str(newest)
    path = Path(str(ckpt_path)).expanduser()
    if not (path.is_file() or is_deepspeed_checkpoint(path)):
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: no such checkpoint file (or DeepSpeed checkpoint folder)"
        )
    return str(path)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in sorted(metrics.items()) if getattr(v, "numel", lambda: 1)() == 1
    }


@rank_zero_only
def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def check_data(datamodule: pl.LightningDataModule, output_dir: Path) -> None:
    """Validate the data before training: report in the run dir; stop, or list what is skipped.

    The datamodule's ``validate()`` returns a :class:`~genlab.data.validation.ValidationReport`;
    with ``on_bad_file=error`` any problem stops the run, with ``skip`` the bad files (which the
    datamodule leaves out) are written to ``skipped_files.csv``.
    """
    from genlab.data.validation import write_skip_list

    validate = getattr(datamodule, "validate", None)
    if validate is None:
        log.info("%s has no validate(): data not checked", type(datamodule).__name__)
        return
    report = validate()  # every rank loads its data here; rank 0 reports
    if rank_zero_only.rank == 0:
        log.info("data check:\n%s", report.summary())
        report.write_json(output_dir / "data_report.json")
    if report.ok:
        return
    if getattr(datamodule, "on_bad_file", "error") != "skip":
        report.raise_if_bad()
    if rank_zero_only.rank == 0:
        path = write_skip_list(report.problems, output_dir / "skipped_files.csv")
        log.warning("%d bad file(s) left out, listed in %s", len(report.problems), path)


# ---- train ----------------------------------------------------------------------------------
def train(cfg: DictConfig) -> dict[str, float]:
    """seed -> datamodule -> callbacks -> loggers -> trainer -> model -> fit -> test -> metrics.json.

    The model is built after the trainer because its learning rate may follow the number of
    processes (``scale_lr``).
    """
    apply_extras(cfg)
    check_strategy(cfg.trainer)  # a missing backend (DeepSpeed) stops here, before any work
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    if cfg.get("validate_data", True):
        check_data(datamodule, output_dir)
    callbacks = instantiate_all(cfg.get("callbacks"))
    loggers = instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    scale_config_lr(cfg, trainer)
    model: pl.LightningModule = instantiate(cfg.model)
    refuse_frozen_saved_weights(trainer.strategy, model)
    refuse_test_after_zero3(trainer.strategy, bool(cfg.get("test", False)))

    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = resolve_ckpt_path(
        cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name, output_dir
    )
    metrics: dict[str, float] = {}
    with job_processes(trainer):  # DDP ranks of this job (and only this job) in one run dir
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            metrics |= scalar_metrics(trainer.callback_metrics)
        if cfg.get("test", False):
            best = (
                trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            )
            if not cfg.get("train", True):
                best = ckpt_path or ""
            if not best:
                log.warning("no best checkpoint: testing the weights in memory")
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics |= scalar_metrics(trainer.callback_metrics)
        if cfg.get("train", True):  # every rank: sharded weights are gathered for the export
            export_trained_weights(
                trainer, model, lambda: instantiate(cfg.model), output_dir / "model.safetensors"
            )
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        log.info("metrics: %s", json.dumps(metrics, indent=1))
        log.info("run directory: %s", output_dir)
    for lg in loggers:  # fit and test share one experiment per logger; close it once, here
        getattr(lg, "close", lambda lg=lg: lg.finalize("success"))()
    return metrics


def optimized_value(cfg: DictConfig, metrics: Mapping[str, float]) -> float | None:
    """The value a sweeper optimises (``optimized_metric``), with a clear error when it is missing."""
    name = cfg.get("optimized_metric")
    if not name or rank_zero_only.rank != 0:  # the sweeper reads rank 0's value only
        return None
    if name not in metrics:
        message = f"optimized_metric '{name}' was not logged; logged metrics: {sorted(metrics)}"
        if _in_sweep():
            raise KeyError(message)
        log.warning("%s (no sweep is running, so this run goes on)", message)
        return None
    return metrics[name]


def _in_sweep() -> bool:
    """Whether this job is part of a Hydra multirun (a sweeper waits for its value)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# ---- inference ------------------------------------------------------------------------------
def inference(cfg: DictConfig) -> Any:
    """Run the task named by ``task=`` (generate, analyze_text, ...) with the composed config."""
    apply_extras(cfg)
    task = instantiate(cfg.task)
    return task(cfg)


# ---- console scripts (same as train.py / inference.py) --------------------------------------
def _config_dir() -> str:
    return str(Path(os.environ.get("GENLAB_CONFIG_DIR", Path.cwd() / "conf")).resolve())


def train_main() -> None:
    hydra.main(version_base="1.3", config_path=_config_dir(), config_name="train")(
        lambda cfg: optimized_value(cfg, train(cfg))
    )()


def inference_main() -> None:
    hydra.main(version_base="1.3", config_path=_config_dir(), config_name="inference")(inference)()
