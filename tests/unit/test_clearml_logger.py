"""ClearMLLogger in offline mode: a tiny Lightning fit, then the offline session is inspected."""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import trimesh
from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from genlab.loggers import ClearMLLogger, log_image, log_mesh
from genlab.loggers.clearml import clearml_server_configured, flatten_params, split_metric_name

_CLEARML_ENV = (
    "CLEARML_API_HOST",
    "TRAINS_API_HOST",
    "CLEARML_CONFIG_FILE",
    "TRAINS_CONFIG_FILE",
    "CLEARML_OFFLINE_MODE",
    "TRAINS_OFFLINE_MODE",
    "CLEARML_TASK_ID",
)


class TinyModule(pl.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class MediaAtEnd(pl.Callback):
    """Logs an image, a mesh and an artifact through the generic helpers at the end of fit."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        image = Image.fromarray(np.full((16, 16, 3), (255, 0, 0), dtype=np.uint8))
        log_image(trainer.loggers, "samples/grid", image, trainer.global_step)
        mesh = trimesh.creation.box()
        log_mesh(
            trainer.loggers, "samples/mesh", mesh, self.out_dir / "box.obj", trainer.global_step
        )
        weights = self.out_dir / "weights.txt"
        weights.write_text("not really weights")
        trainer.logger.log_artifact("weights", weights)


def _clear_env(mp: pytest.MonkeyPatch) -> None:
    for var in _CLEARML_ENV:
        mp.delenv(var, raising=False)


@pytest.fixture(scope="module")
def clearml_home(tmp_path_factory: pytest.TempPathFactory):
    """Temporary HOME and ClearML cache dir (offline sessions go to $CLEARML_CACHE_DIR/offline)."""
    root = tmp_path_factory.mktemp("clearml")
    with pytest.MonkeyPatch.context() as mp:
        _clear_env(mp)
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("CLEARML_CACHE_DIR", str(root / "cache"))
        (root / "home").mkdir()
        yield root


def _read_session(session: Path) -> tuple[dict, list[dict], set[str]]:
    """task.json, all events of metrics.jsonl, and the file names of an offline session zip."""
    with zipfile.ZipFile(session) as zf:
        names = set(zf.namelist())
        task = json.loads(zf.read("task.json"))
        events: list[dict] = []
        if "metrics.jsonl" in names:
            for line in zf.read("metrics.jsonl").decode().splitlines():
                if line.strip():
                    batch = json.loads(line)
                    events.extend(batch if isinstance(batch, list) else [batch])
    return task, events, names


@contextlib.contextmanager
def _capture_logs(name: str) -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    target = logging.getLogger(name)
    old_level = target.level
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    try:
        yield records
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)


@pytest.fixture(scope="module")
def fitted(clearml_home: Path) -> SimpleNamespace:
    """One 3-step fit logged to an offline ClearML task (auto-detected offline mode).

    Before it, an earlier multirun job opens a task and never reaches ``finalize`` (as after a
    crash): the fit's logger must close that task and start its own.
    """
    with _capture_logs("genlab.loggers.clearml") as records:
        earlier, logger = _fit(clearml_home)
    task, events, names = _read_session(logger.offline_session)
    return SimpleNamespace(
        logger=logger,
        earlier=earlier,
        task=task,
        events=events,
        names=names,
        root=clearml_home,
        records=records,
    )


def _fit(root: Path) -> tuple[ClearMLLogger, ClearMLLogger]:
    earlier = ClearMLLogger(project_name="genlab-tests", task_name="job-0", detect_repository=False)
    earlier.log_metrics({"val/acc": 0.5}, step=0)
    logger = ClearMLLogger(
        project_name="genlab-tests", task_name="tiny-fit", tags=["unit"], detect_repository=False
    )
    cfg = OmegaConf.create({"model": {"lr": 0.05, "hidden": 8}, "data": {"batch_size": 4}})
    logger.log_hyperparams(cfg)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
    trainer = pl.Trainer(
        max_steps=3,
        logger=logger,
        callbacks=[MediaAtEnd(root)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=root / "run",
    )
    trainer.fit(TinyModule(), DataLoader(data, batch_size=4))
    return earlier, logger


@pytest.mark.slow
def test_offline_session_written_where_reported(fitted: SimpleNamespace) -> None:
    logger = fitted.logger
    assert logger.offline is True
    session = logger.offline_session
    assert session is not None and session.suffix == ".zip" and session.is_file()
    assert session.parent == fitted.root / "cache" / "offline"
    assert session.stem == logger.version
    assert {"task.json", "metrics.jsonl"} <= fitted.names
    assert fitted.task["id"] == logger.version
    assert fitted.task["name"] == "tiny-fit"
    assert fitted.task["project_name"] == "genlab-tests"
    hints = [r.getMessage() for r in fitted.records if "import-offline-session" in r.getMessage()]
    # one hint for the earlier job's task (closed when the fit's task started), one for the fit
    assert len(hints) == 2
    assert str(fitted.earlier.offline_session) in hints[0]
    assert str(session) in hints[1]
    assert f"Task.import_offline_session('{session}')" in hints[1]


@pytest.mark.slow
def test_scalars_keep_their_names(fitted: SimpleNamespace) -> None:
    scalars = [e for e in fitted.events if e["type"] == "training_stats_scalar"]
    losses = [e for e in scalars if e["metric"] == "train" and e["variant"] == "loss"]
    assert sorted(e["iter"] for e in losses) == [0, 1, 2]
    assert all(np.isfinite(e["value"]) for e in losses)
    # names go through untouched: "train/loss" -> title "train", series "loss"; "epoch" as is
    assert {(e["metric"], e["variant"]) for e in scalars} == {("train", "loss"), ("epoch", "epoch")}


@pytest.mark.slow
def test_config_and_hyperparams_connected(fitted: SimpleNamespace) -> None:
    from clearml.utilities.pyhocon import ConfigFactory

    config = fitted.task["configuration"]["config"]
    assert config["type"] == "dictionary"
    parsed = ConfigFactory.parse_string(config["value"])
    # the CLI-style DictConfig and Lightning's model hparams are merged into one config object
    assert parsed["model"]["lr"] == 0.05
    assert parsed["data"]["batch_size"] == 4
    assert parsed["hidden"] == 8
    params = fitted.task["hyperparams"]["hyperparams"]
    assert params["model.lr"]["value"] == "0.05"
    assert params["data.batch_size"]["value"] == "4"
    assert params["lr"]["value"] == "0.05"


@pytest.mark.slow
def test_image_mesh_and_artifact_recorded(fitted: SimpleNamespace) -> None:
    samples = {
        (e["metric"], e["variant"]): e for e in fitted.events if e["type"] == "training_debug_image"
    }
    image = samples[("samples", "grid")]
    assert image["iter"] == 3
    mesh = samples[("samples", "mesh")]
    assert mesh["url"].endswith(".obj")
    data_files = {n for n in fitted.names if n.startswith("data/")}
    assert any(n.endswith((".jpeg", ".jpg", ".png")) and "/samples/grid/" in n for n in data_files)
    assert any(n.endswith(".obj") and "/samples/mesh/" in n for n in data_files)
    artifacts = {a["key"]: a for a in fitted.task["execution"]["artifacts"]}
    assert "weights" in artifacts
    assert any(n.endswith("artifacts/weights/weights.txt") for n in data_files)


@pytest.mark.slow
def test_sequential_loggers_get_separate_tasks(fitted: SimpleNamespace) -> None:
    from clearml import Task

    earlier, logger = fitted.earlier, fitted.logger
    assert earlier.version != logger.version
    assert Task.current_task() is None  # the fit's task was closed by finalize()
    offline = fitted.root / "cache" / "offline"
    assert logger.offline_session == offline / f"{logger.version}.zip"
    earlier_zip = offline / f"{earlier.version}.zip"
    assert earlier_zip.is_file()  # closed (and zipped) when the next logger started its task
    task, events, _ = _read_session(earlier_zip)
    assert task["id"] == earlier.version and task["name"] == "job-0"
    scalars = [
        (e["metric"], e["variant"], e["value"])
        for e in events
        if e["type"] == "training_stats_scalar"
    ]
    assert scalars == [("val", "acc", 0.5)]
    assert not any(e["metric"] == "train" for e in events)  # nothing of the fit leaked in


class _FakeTask:
    id = "offline-fake"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def close(self) -> None:
        self.calls.append("close")

    def flush(self, wait_for_uploads: bool = False) -> None:
        self.calls.append(f"flush(wait={wait_for_uploads})")

    def mark_failed(self, **kwargs: object) -> None:
        self.calls.append("mark_failed")


def _logger_with_fake_task(tmp_path: Path, **kwargs: object) -> tuple[ClearMLLogger, _FakeTask]:
    folder = tmp_path / "offline" / "offline-fake"
    folder.mkdir(parents=True)
    folder.with_name("offline-fake.zip").write_bytes(b"")
    logger = ClearMLLogger(**kwargs)
    task = _FakeTask()
    logger._task, logger._task_id, logger._owns_task = task, task.id, True
    logger._is_offline, logger._offline_folder = True, folder
    return logger, task


def test_finalize_prints_and_logs_import_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    logger, task = _logger_with_fake_task(tmp_path)
    with caplog.at_level(logging.INFO, logger="genlab.loggers.clearml"):
        logger.finalize("success")
    assert task.calls == ["close"]
    session = tmp_path / "offline" / "offline-fake.zip"
    assert logger.offline_session == session
    printed = capsys.readouterr().out
    assert f"clearml-task --import-offline-session {session}" in printed
    assert f"Task.import_offline_session('{session}')" in printed
    assert any(str(session) in r.getMessage() for r in caplog.records)
    logger.finalize("success")  # already closed: nothing happens
    assert task.calls == ["close"]


def test_close_on_finalize_false_keeps_the_task_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger, task = _logger_with_fake_task(tmp_path, close_on_finalize=False)
    logger.finalize("success")  # end of fit: the same task goes on for test
    logger.finalize("failed")
    assert task.calls == ["flush(wait=True)", "mark_failed", "flush(wait=True)"]
    assert logger.experiment is task and logger.offline_session is None
    logger.close()
    assert task.calls[-1] == "close"
    assert "import-offline-session" in capsys.readouterr().out


def test_metric_name_split() -> None:
    assert split_metric_name("train/loss_g") == ("train", "loss_g")
    assert split_metric_name("val/fid/clip") == ("val", "fid/clip")
    assert split_metric_name("epoch") == ("epoch", "epoch")
    assert flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a.b": 1,
        "a.c": "[1, 2]",
        "d": None,
    }


def test_server_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not clearml_server_configured()
    assert ClearMLLogger()._resolve_offline() is True
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "missing.conf"))
    assert not clearml_server_configured()
    (tmp_path / "clearml.conf").write_text("api { api_server: http://localhost:8008 }\n")
    assert clearml_server_configured()
    assert ClearMLLogger()._resolve_offline() is False
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    assert ClearMLLogger()._resolve_offline() is True
    assert ClearMLLogger(offline=False)._resolve_offline() is False
    (tmp_path / "clearml.conf").unlink()
    monkeypatch.delenv("CLEARML_OFFLINE_MODE")
    monkeypatch.setenv("CLEARML_API_HOST", "http://localhost:8008")
    assert clearml_server_configured()


def test_non_zero_rank_gets_dummy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = ClearMLLogger(project_name="never-created")
    assert isinstance(logger.experiment, _DummyExperiment)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.log_hyperparams({"lr": 0.1})
    logger.finalize("success")
    assert logger.version is None
    assert logger._task is None
