"""SystemMonitor: system/* metrics in a CSVLogger fit, and describe_devices."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning.pytorch as pl
import psutil
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from genlab.callbacks.system_monitor import SystemMonitor, describe_devices

CPU_KEYS = ("system/cpu_percent", "system/ram_used_gb", "system/process_rss_gb")


class TinyModule(pl.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(
    root: Path, monitor: SystemMonitor, steps: int, manual: bool = False
) -> list[dict[str, str]]:
    logger = CSVLogger(root, name="csv", version=0)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,  # the monitor must not depend on Lightning's logging cadence
        accelerator="cpu",
        devices=1,
    )
    data = TensorDataset(torch.randn(4 * steps, 4), torch.randn(4 * steps, 1))
    trainer.fit(TinyModule(manual=manual), DataLoader(data, batch_size=4))
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _system_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r.get("system/cpu_percent")]


def test_logs_every_step_to_csv(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="genlab.callbacks.system_monitor"):
        rows = _fit(tmp_path, SystemMonitor(every_n_steps=1), steps=3)
    system = _system_rows(rows)
    assert [int(r["step"]) for r in system] == [0, 1, 2]
    cores = psutil.cpu_count(logical=True)
    for row in system:
        assert 0.0 <= float(row["system/cpu_percent"]) <= 100.0 * cores
        assert float(row["system/process_rss_gb"]) > 0.05
        total_gib = psutil.virtual_memory().total / 1024**3
        assert 0.0 < float(row["system/ram_used_gb"]) <= total_gib
        assert not any(k.startswith("system/gpu") and row[k] for k in row)
    device_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Devices:")]
    assert len(device_lines) == 1 and "CPU" in device_lines[0] and "GiB RAM" in device_lines[0]


def test_every_n_steps_with_manual_optimisation(tmp_path: Path) -> None:
    rows = _fit(tmp_path, SystemMonitor(every_n_steps=2), steps=5, manual=True)
    # global_step 1..5 -> a new multiple of 2 is entered at steps 1 (first), 2 and 4
    assert [int(r["step"]) for r in _system_rows(rows)] == [0, 1, 3]


def test_describe_devices_cpu_trainer() -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    text = describe_devices(trainer)
    assert text.startswith("Devices: CPU only")
    assert f"{psutil.cpu_count(logical=True)} logical" in text
    assert "precision=" in text
    assert describe_devices().startswith("Devices: CPU only")


def test_gpu_metrics_never_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a CUDA device but no working NVML, memory stats are logged and utilisation skipped."""
    monitor = SystemMonitor()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 2 * 1024**3)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3 * 1024**3)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 4 * 1024**3)

    def no_nvml(device=None):
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    metrics = monitor.collect(torch.device("cuda", 0))
    assert metrics["system/gpu_mem_allocated_gb"] == pytest.approx(2.0)
    assert metrics["system/gpu_mem_reserved_gb"] == pytest.approx(3.0)
    assert metrics["system/gpu_mem_peak_gb"] == pytest.approx(4.0)
    assert "system/gpu_util_percent" not in metrics
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: 37)
    assert "system/gpu_util_percent" not in monitor.collect(torch.device("cuda", 0))  # gave up
    assert "system/gpu_util_percent" in SystemMonitor().collect(torch.device("cuda", 0))
    assert set(CPU_KEYS) <= set(metrics)
