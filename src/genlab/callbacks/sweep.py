"""Hydra callback: a table of a multirun's jobs and the full config of the best one."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _direction(config: DictConfig) -> str:
    """``max`` or ``min``: the sweeper's direction when it has one, else the model's metric mode."""
    sweeper = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if sweeper is not None:
        name = str(getattr(sweeper, "name", sweeper)).lower()
        return "max" if name.startswith("max") else "min"
    mode = OmegaConf.select(config, "model.main_metric_mode", default="max")
    return "min" if str(mode).lower().startswith("min") else "max"


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(
        jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


class SweepSummary(Callback):
    """After a multirun, write into its sweep directory:

    - ``sweep_results.csv``: one row per job (number, overrides, the ``optimized_metric`` value
      from its ``metrics.json``; empty when the job failed),
    - ``best_config.yaml``: the composed config of the best job (``.hydra/config.yaml``), headed
      by its job number, overrides and value (``python train.py <those overrides>`` trains it
      again).

    The direction is the sweeper's (Optuna's ``direction``) or, for grid sweeps, the model's
    ``main_metric_mode``.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        metric = config.get("optimized_metric")
        if not sweep_dir.is_dir() or not metric:
            return
        rows = []
        for job in _job_dirs(sweep_dir):
            overrides = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
            value = None
            metrics_file = job / "metrics.json"
            if metrics_file.is_file():
                value = json.loads(metrics_file.read_text()).get(metric)
            rows.append((job, overrides, value))
        if not rows:
            return
        with (sweep_dir / "sweep_results.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["job", metric, "overrides"])
            for job, overrides, value in rows:
                writer.writerow([job.name, "" if value is None else value, " ".join(overrides)])
        scored = [r for r in rows if r[2] is not None and math.isfinite(float(r[2]))]
        if not scored:
            log.warning("sweep: no job logged %s; see %s", metric, sweep_dir / "sweep_results.csv")
            return
        pick = max if _direction(config) == "max" else min
        job, overrides, value = pick(scored, key=lambda r: float(r[2]))
        header = (
            f"# best job of the sweep: {job.name} ({metric} = {value})\n"
            f"# overrides: {' '.join(overrides)}\n"
        )
        body = (job / ".hydra" / "config.yaml").read_text()
        (sweep_dir / "best_config.yaml").write_text(header + body)
        log.info(
            "sweep: best %s = %s in job %s (%s); %s",
            metric,
            value,
            job.name,
            " ".join(overrides),
            sweep_dir / "best_config.yaml",
        )
