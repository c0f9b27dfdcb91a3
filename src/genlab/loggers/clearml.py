"""Lightning logger that records runs as ClearML tasks, online or as offline sessions."""

from __future__ import annotations

import atexit
import logging
import os
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

if TYPE_CHECKING:
    from clearml import Task
    from PIL import Image

log = logging.getLogger(__name__)

# Framework switches understood by ``Task.init(auto_connect_frameworks=...)``.
_CLEARML_FRAMEWORKS = (
    "catboost",
    "fastai",
    "gradio",
    "hydra",
    "joblib",
    "lightgbm",
    "matplotlib",
    "megengine",
    "pytorch",
    "scikit",
    "tensorboard",
    "tensorflow",
    "tfdefines",
    "xgboost",
)
_TRUE = {"1", "true", "yes", "on", "y"}


def clearml_server_configured() -> bool:
    """Whether a ClearML server is configured (``CLEARML_API_HOST`` or a clearml.conf file).

    Looks where the ClearML SDK looks: ``CLEARML_CONFIG_FILE`` (or ``TRAINS_CONFIG_FILE``)
    if it names an existing file, otherwise ``~/clearml.conf`` and ``~/trains.conf``.
    """
    if os.environ.get("CLEARML_API_HOST") or os.environ.get("TRAINS_API_HOST"):
        return True
    override = os.environ.get("CLEARML_CONFIG_FILE") or os.environ.get("TRAINS_CONFIG_FILE")
    if override and Path(os.path.expandvars(os.path.expanduser(override))).is_file():
        return True
    home = Path.home()
    return any((home / name).is_file() for name in ("clearml.conf", "trains.conf"))


def split_metric_name(name: str) -> tuple[str, str]:
    """Split ``"train/loss_g"`` into ClearML's ``("train", "loss_g")``; ``"loss"`` gives ``("loss", "loss")``."""
    title, sep, series = name.partition("/")
    if not sep or not title or not series:
        return name, name
    return title, series


def _to_container(params: Any) -> dict[str, Any]:
    """Turn a dict, DictConfig, Namespace or dataclass-like object into a plain nested dict."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(params, DictConfig):
            try:
                params = OmegaConf.to_container(params, resolve=True)
            except Exception:  # unresolvable interpolations (e.g. ${hydra:...} outside a run)
                params = OmegaConf.to_container(params, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(params, Namespace):
        params = vars(params)
    if not isinstance(params, Mapping):
        raise TypeError(
            f"hyperparameters must be a mapping, DictConfig or Namespace, got {type(params)}"
        )
    return {str(k): _sanitize(v) for k, v in params.items()}


def _sanitize(value: Any) -> Any:
    """Recursively convert a value into JSON-like primitives (unknown objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            try:
                value = OmegaConf.to_container(value, resolve=True)
            except Exception:
                value = OmegaConf.to_container(value, resolve=False)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensors / arrays
        return _sanitize(value.item())
    return str(value)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``base`` recursively (in place) and return ``base``."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict into ``{"model.lr": 0.1, ...}``; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        elif isinstance(value, (list, tuple)):
            flat[name] = str(list(value))
        else:
            flat[name] = value
    return flat


def _image_for_clearml(image: Any) -> Image.Image | np.ndarray:
    """PIL images pass through; arrays/tensors become HWC (or HW) uint8 arrays."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
            array = np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return array


class ClearMLLogger(Logger):
    """Lightning logger backed by a ClearML task.

    The task is created lazily, on global rank 0 only; other ranks see a dummy experiment.
    Each logger instance creates its own task, so the jobs of a Hydra multirun never collapse
    into one: a task left open by an earlier logger in the same process is closed first.
    A task opened by other code (e.g. ``Task.init`` before training, or a clearml-agent run)
    is reused as is and never closed by the logger.

    Closing a task (``finalize``/``close``) takes seconds: ClearML's reporting subprocess
    polls every 5 s, and offline the session folder is zipped. Offline, the zip path and the
    import command are printed and logged.

    Args:
        project_name: ClearML project.
        task_name: Task name (ClearML derives one from the script when ``None``).
        tags: Task tags.
        offline: ``True``/``False`` forces offline/online mode; ``None`` picks offline when no
            server is configured (no ``CLEARML_API_HOST``, no clearml.conf) or when
            ``CLEARML_OFFLINE_MODE`` is set. Offline sessions are written under
            ``$CLEARML_CACHE_DIR/offline`` (default ``~/.clearml/cache/offline``).
        output_uri: Where ClearML uploads models/artifacts (``Task.init(output_uri=...)``).
        auto_connect_frameworks: Passed to ``Task.init``; ``False`` keeps ClearML from patching
            TensorBoard, matplotlib, torch.save, Hydra, ... (genlab logs explicitly).
        reuse_last_task_id: Passed to ``Task.init``; keep ``False`` for one task per run.
        detect_repository: Let ClearML record the git repository, diff and installed packages.
            This runs in a background thread that closing waits for (up to 5 minutes on large
            repositories), so turn it off for quick runs and tests.
        close_on_finalize: Close the task in ``finalize`` (Lightning calls it at the end of
            every ``fit``/``validate``/``test``). With ``False`` the task stays open across
            ``fit`` then ``test``, and is closed by :meth:`close`, by the next ClearMLLogger
            that starts a task, or at interpreter exit.
    """

    _open_loggers: ClassVar[dict[str, ClearMLLogger]] = {}
    _atexit_registered: ClassVar[bool] = False

    def __init__(
        self,
        project_name: str = "genlab",
        task_name: str | None = None,
        tags: list[str] | None = None,
        offline: bool | None = None,
        output_uri: str | None = None,
        auto_connect_frameworks: bool | dict = False,
        reuse_last_task_id: bool = False,
        detect_repository: bool = True,
        close_on_finalize: bool = True,
    ) -> None:
        super().__init__()
        self._project_name = project_name
        self._task_name = task_name
        self._tags = [str(t) for t in tags] if tags else None
        self._offline = offline
        self._output_uri = output_uri
        self._auto_connect_frameworks = auto_connect_frameworks
        self._reuse_last_task_id = reuse_last_task_id
        self._detect_repository = detect_repository
        self._close_on_finalize = close_on_finalize
        self._task: Task | None = None
        self._task_id: str | None = None
        self._owns_task = False
        self._is_offline: bool | None = None
        self._offline_folder: Path | None = None
        self._offline_session: Path | None = None
        self._config: dict[str, Any] = {}
        self._closed = False

    # ------------------------------------------------------------------ task lifecycle
    def _resolve_offline(self) -> bool:
        if self._offline is not None:
            return bool(self._offline)
        if os.environ.get("CLEARML_OFFLINE_MODE", "").strip().lower() in _TRUE:
            return True
        return not clearml_server_configured()

    def _frameworks_arg(self) -> bool | dict:
        frameworks = self._auto_connect_frameworks
        if isinstance(frameworks, Mapping):
            frameworks = dict(frameworks)
            if not self._detect_repository:
                frameworks["detect_repository"] = False
            return frameworks
        if self._detect_repository:
            return bool(frameworks)
        return {**dict.fromkeys(_CLEARML_FRAMEWORKS, bool(frameworks)), "detect_repository": False}

    def _create_task(self) -> Task:
        from clearml import Task
        from clearml.config import running_remotely

        current = Task.current_task()
        previous = ClearMLLogger._open_loggers.get(current.id) if current is not None else None
        if previous is not None:
            log.info("Closing ClearML task %s left open by an earlier run", current.id)
            previous.close()
            current = Task.current_task()

        if current is not None or running_remotely():
            # A task opened by user code or by clearml-agent: attach to it, leave it open.
            task = current if current is not None else Task.init()
            self._owns_task = False
            self._is_offline = Task.is_offline()
        else:
            self._is_offline = self._resolve_offline()
            Task.set_offline(self._is_offline)
            if self._detect_repository:
                # record installed packages with `pip freeze` rather than ClearML's import scan of
                # the whole repository folder, which walks a local .venv and can take minutes
                Task.force_requirements_env_freeze(force=True)
            task = Task.init(
                project_name=self._project_name,
                task_name=self._task_name,
                tags=self._tags,
                reuse_last_task_id=self._reuse_last_task_id,
                output_uri=self._output_uri,
                auto_connect_frameworks=self._frameworks_arg(),
                auto_connect_arg_parser=False,
                auto_resource_monitoring=False,
            )
            self._owns_task = True
            ClearMLLogger._open_loggers[task.id] = self
            if not ClearMLLogger._atexit_registered:
                # registered after ClearML's own exit hook, so it runs first (LIFO)
                atexit.register(ClearMLLogger._close_all)
                ClearMLLogger._atexit_registered = True
        self._task_id = task.id
        if self._is_offline:
            folder = task.get_offline_mode_folder()
            self._offline_folder = Path(folder) if folder else None
        if self._config:
            self._connect_config(task)
        return task

    @classmethod
    def _close_all(cls) -> None:
        for logger in list(cls._open_loggers.values()):
            try:
                logger.close()
            except Exception:
                log.debug("ClearMLLogger: closing at exit failed", exc_info=True)

    @property
    @rank_zero_experiment
    def experiment(self) -> Task:
        """The ClearML ``Task`` (created on first access; a dummy object on ranks > 0)."""
        if self._task is None:
            if self._closed:
                log.warning(
                    "ClearMLLogger used after its task %s was closed: starting a new task "
                    "(use close_on_finalize=False to keep one task across fit and test)",
                    self._task_id,
                )
                self._closed = False
            self._task = self._create_task()
        return self._task

    @property
    def name(self) -> str:
        """The ClearML project name."""
        return self._project_name

    @property
    def version(self) -> str | None:
        """The ClearML task id (``None`` on ranks > 0)."""
        if self._task_id is None and rank_zero_only.rank == 0:
            _ = self.experiment
        return self._task_id

    @property
    def save_dir(self) -> str | None:
        """``None``: ClearML keeps no run directory for the Trainer to write checkpoints into."""
        return None

    @property
    def offline(self) -> bool | None:
        """Whether the task runs offline (``None`` before the task exists)."""
        return self._is_offline

    @property
    def offline_folder(self) -> Path | None:
        """Folder of the offline session (``None`` when online or before the task exists)."""
        return self._offline_folder

    @property
    def offline_session(self) -> Path | None:
        """The offline session zip, once the task is closed (the folder if no zip was written)."""
        return self._offline_session

    # ------------------------------------------------------------------ logging
    def _connect_config(self, task: Task) -> None:
        task.connect_configuration(self._config, name="config")
        task.connect(flatten_params(self._config), name="hyperparams")

    @rank_zero_only
    def log_hyperparams(
        self, params: dict[str, Any] | Namespace | Any, *args: Any, **kwargs: Any
    ) -> None:
        """Connect the nested config (``"config"`` object) and its flattened scalars (``hyperparams``).

        Repeated calls (e.g. the CLI's Hydra config, then Lightning's model hparams) are merged.
        """
        if params is None:
            return
        _deep_merge(self._config, _to_container(params))
        task = self.experiment
        if not isinstance(task, _DummyExperiment):
            self._connect_config(task)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Report each metric as a scalar: ``"train/loss"`` -> title ``"train"``, series ``"loss"``."""
        reporter = self.experiment.get_logger()
        iteration = int(step) if step is not None else 0
        for key, value in metrics.items():
            try:
                number = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError):
                log.debug("ClearMLLogger: skipping non-scalar metric %r", key)
                continue
            title, series = split_metric_name(key)
            reporter.report_scalar(title=title, series=series, value=number, iteration=iteration)

    @rank_zero_only
    def log_image(
        self, key: str, image: Image.Image | np.ndarray | str | os.PathLike, step: int | None = None
    ) -> None:
        """Report an image (PIL image, HWC/HW uint8 or [0, 1] float array, or file path)."""
        title, series = split_metric_name(key)
        reporter = self.experiment.get_logger()
        iteration = int(step) if step is not None else 0
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(path)
            reporter.report_image(
                title=title, series=series, iteration=iteration, local_path=str(path)
            )
        else:
            reporter.report_image(
                title=title, series=series, iteration=iteration, image=_image_for_clearml(image)
            )

    @rank_zero_only
    def log_file(self, key: str, path: str | os.PathLike, step: int | None = None) -> None:
        """Report a media file (mesh OBJ/PLY/GLB, video, audio, html, ...) as a debug sample."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)
        title, series = split_metric_name(key)
        self.experiment.get_logger().report_media(
            title=title,
            series=series,
            iteration=int(step) if step is not None else 0,
            local_path=str(path),
        )

    @rank_zero_only
    def log_artifact(self, name: str, path: str | os.PathLike) -> None:
        """Upload a file or folder as a task artifact."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(path)
        self.experiment.upload_artifact(name=name, artifact_object=path)

    # ------------------------------------------------------------------ shutdown
    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush the task and, with ``close_on_finalize``, close it (see :meth:`close`)."""
        task = self._task
        if task is None:
            return
        if status == "failed" and self._owns_task:
            try:
                task.mark_failed(status_reason="training failed", force=True)
            except Exception:  # offline or refused by the server: the run is still recorded
                log.debug("ClearMLLogger: could not mark task %s failed", task.id, exc_info=True)
        if self._close_on_finalize and self._owns_task:
            self.close()
        else:
            task.flush(wait_for_uploads=True)

    @rank_zero_only
    def close(self) -> None:
        """Close the task now; offline, print and log where the session zip is and how to import it.

        ``Task.close`` flushes and waits for pending reports and uploads itself.
        """
        task = self._task
        if task is None or not self._owns_task:
            return
        folder = self._offline_folder
        try:
            task.close()
        finally:
            ClearMLLogger._open_loggers.pop(task.id, None)
            self._task = None
            self._closed = True
        if self._is_offline and folder is not None:
            zip_path = folder.with_name(folder.name + ".zip")
            self._offline_session = zip_path if zip_path.is_file() else folder
            message = (
                f"ClearML offline session of task {self._task_id} saved to {self._offline_session}; "
                f"import it into a ClearML server with `clearml-task --import-offline-session "
                f"{self._offline_session}` or `Task.import_offline_session('{self._offline_session}')`"
            )
            print(message, flush=True)
            log.info(message)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_task"] = None  # the ClearML Task cannot be pickled (ddp_spawn)
        return state
