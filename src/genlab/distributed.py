"""Multi-process training under Hydra: one run directory per job, sweeps that survive DDP.

Lightning's DDP launcher (``trainer=ddp trainer.devices=N`` without a cluster manager) starts
ranks 1..N-1 by re-running the command line with ``hydra.run.dir`` set to the job's directory,
so a single run keeps one run directory. In a multirun that command line would start the whole
sweep again in every extra process (a second sweep directory, other hyperparameters on other
ranks), and after the first job the launch variables it leaves in the environment would make the
next job wait for processes that have already exited. :func:`job_processes` fixes both around
the fit/test calls of one job.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision.deepspeed import DeepSpeedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy
from omegaconf import DictConfig, OmegaConf, read_write

from genlab.callbacks.checkpoint_io import remove_path, replace_folder, staging_folder

log = logging.getLogger(__name__)

# what Lightning's script launcher puts into the launching process's environment (OMP_NUM_THREADS:
# the per-process thread count of CPU DDP)
LAUNCH_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "OMP_NUM_THREADS",
)
# command-line flags of a Hydra app that choose the config (kept when a job is re-run)
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def check_strategy(trainer_cfg: DictConfig | Mapping) -> None:
    """Build ``trainer.strategy`` on its own, so a missing backend stops the run before any work.

    ``trainer=deepspeed`` without the deepspeed package fails here, before the data is checked
    and the (possibly large) model is loaded. String strategies (``ddp``, ``auto``) are left to
    the trainer.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    node = trainer_cfg.get("strategy")
    if not isinstance(node, Mapping) or "_target_" not in node:
        return
    try:
        instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise RuntimeError(
            f"trainer.strategy ({node['_target_']}) cannot be built: {cause}"
        ) from err


def launches_processes(trainer: pl.Trainer) -> bool:
    """Whether ``fit`` will start the other ranks itself by re-running the command line."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return isinstance(launcher, _SubprocessScriptLauncher) and not (
        launcher.cluster_environment.creates_processes_externally
    )


def _hydra_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def config_flags(argv: list[str]) -> list[str]:
    """The ``--config-path/-name/-dir`` flags (with their values) of a Hydra command line."""
    kept: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag = arg.split("=", 1)[0]
        if flag in _CONFIG_FLAGS:
            if "=" in arg or i + 1 == len(argv):
                kept.append(arg)
            else:
                kept += [arg, argv[i + 1]]
                i += 1
        i += 1
    return kept


def job_command_line(argv: list[str], task: list[str], hydra_overrides: list[str]) -> list[str]:
    """``argv`` rewritten to run one job of a sweep on its own: its overrides, in run mode."""
    hydra_kept = [o for o in hydra_overrides if not o.startswith("hydra.mode=")]
    return [argv[0], *config_flags(argv[1:]), *task, *hydra_kept, "hydra.mode=RUN"]


def _relaunch_this_job(trainer: pl.Trainer) -> Callable[[], None]:
    """Make Lightning's re-run of the command line start this job, not the sweep; returns an undo."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    launcher = OmegaConf.select(hc, "launcher._target_")
    if launcher != _BASIC_LAUNCHER:
        raise RuntimeError(
            f"{trainer.num_devices} DDP processes per job are started by re-running the command "
            f"line, which jobs of {launcher} cannot do. Run the sweep with "
            "the default launcher (jobs one after another), one process per job "
            "(trainer.devices=1), or hydra/launcher=slurm, whose tasks_per_node "
            "(= trainer.devices) starts the processes itself."
        )
    old_argv = sys.argv[:]
    old_dir = OmegaConf.to_container(hc.run, resolve=False)["dir"]
    sys.argv = job_command_line(old_argv, list(hc.overrides.task), list(hc.overrides.hydra))
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir  # Lightning passes this as the extra ranks' run dir
    log.info("DDP processes of this job re-run: %s", " ".join(sys.argv[1:]))

    def undo() -> None:
        sys.argv = old_argv
        with read_write(hc.run):
            hc.run.dir = old_dir

    return undo


@contextmanager
def job_processes(trainer: pl.Trainer) -> Iterator[None]:
    """Around fit/test of one Hydra job whose trainer starts its own DDP processes.

    In a multirun the extra ranks re-run this job alone (its overrides, run mode, the job's
    directory, no second ``.hydra/``); jobs run by a parallel launcher (joblib, submitit_local)
    cannot re-run themselves and stop with a message. When the job ends, the launch variables
    are restored, the process group is destroyed and the thread count restored, so the next
    job of a sweep in this process starts its own processes. Does nothing for single-process
    trainers and for processes a cluster manager (SLURM, torchrun) started.
    """
    if not launches_processes(trainer):
        yield
        return
    saved_env = {key: os.environ.get(key) for key in LAUNCH_ENV}
    saved_threads = torch.get_num_threads()
    undo = _relaunch_this_job(trainer) if _hydra_multirun() else None
    try:
        yield
    finally:
        if undo is not None:
            undo()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(saved_threads)


def shards_weights(strategy: object) -> bool:
    """Whether each rank holds only a shard of the weights between steps.

    True for FSDP (any sharding but ``NO_SHARD``), DeepSpeed ZeRO stage 3 and Lightning's
    ``ModelParallelStrategy``; False for DDP and single-device runs, where every rank has the
    whole model.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy):
        return getattr(strategy.sharding_strategy, "name", "") != "NO_SHARD"
    if isinstance(strategy, DeepSpeedStrategy):
        return bool(strategy.zero_stage_3)
    return isinstance(strategy, ModelParallelStrategy)


def call_with_full_weights(
    trainer: pl.Trainer, module: pl.LightningModule, method: str, *args, **kwargs
):
    """``module.<method>(*args, **kwargs)``, run where the whole model's weights are usable.

    Under a sharding strategy (:func:`shards_weights`) the call goes through the strategy's
    wrapper ``forward``, as Lightning routes ``training_step``: each wrapped unit gathers its
    weights while it runs. It is then a collective: every rank must make the same call (the
    same prompts and seeds give the same samples everywhere). Otherwise it is a plain call.
    """
    strategy = trainer.strategy
    if shards_weights(strategy) and strategy.model is not module:
        # Lightning's own rerouting of *_step methods through the wrapper's forward, in the
        # precision context of a step (the gathered units compute in the mixed dtype)
        with strategy.precision_plugin.forward_context():
            return strategy._forward_redirection(strategy.model, module, method, *args, **kwargs)
    return getattr(module, method)(*args, **kwargs)


def gradient_norm(module: torch.nn.Module, strategy: object) -> torch.Tensor | None:
    """The 2-norm of all of ``module``'s gradients (None without any), over the whole model.

    Under FSDP each rank holds the gradients of its shard only, so a norm of the local
    gradients (Lightning's ``grad_norm``) is that rank's part. There the root wrapper's own
    ``clip_grad_norm_`` with an infinite bound takes the norm over every rank's shards and
    leaves the gradients as they are; it is a collective, so every rank calls this. Under
    DeepSpeed the engine moves the gradients into its own buffers during backward (ZeRO), and
    what may be left in ``.grad`` is not the whole: None there.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return None
    if isinstance(strategy, FSDPStrategy) and shards_weights(strategy):
        return strategy.model.clip_grad_norm_(math.inf).detach().float()
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in module.parameters()
             if p.grad is not None]  # fmt: skip
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def refuse_under_sharding(strategy: object, used: bool, switch_off: str, why: str) -> None:
    """Stop at setup a run that uses a part needing the whole weights where each rank holds a shard.

    Scorers (CLIP, DINO) score samples on rank 0 alone after validation, outside any step; EMA
    copies are updated from the live weights after each step. Under FSDP / ZeRO-3 both would
    see only shards there, so such a run stops, naming the override that switches it off
    (``switch_off``, e.g. ``model.metrics=null``).
    """
    if used and shards_weights(strategy):
        name = type(strategy).__name__
        other = "trainer=ddp" + (" or trainer.strategy.stage=2" if "DeepSpeed" in name else "")
        raise ValueError(
            f"{switch_off.split('=')[0]} is not supported with {name} sharding the weights: "
            f"{why}. Set {switch_off}, or train with {other}"
        )


SCORER_SEES_A_SHARD = (
    "the scorer runs on rank 0 alone after validation and would see only its shard"
)
EMA_SEES_A_SHARD = "the EMA copy is updated from the live weights after each step, where each rank holds only a shard"


def gathered_state_dict(
    trainer: pl.Trainer, module: pl.LightningModule
) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` (what its checkpoints hold) with whole float32 weights, on rank 0.

    Under FSDP (sharded) and DeepSpeed this is a collective that every rank must call: FSDP
    gathers the shards; DeepSpeed gives its optimiser's float32 master weights of every trained
    parameter (its module may hold bf16/fp16 copies, and under ZeRO-3 only partitions).
    Rank 0 gets the tensors on the CPU, the other ranks None. Elsewhere it is rank 0's plain
    state dict.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer.strategy
    rank0 = trainer.is_global_zero
    if isinstance(strategy, FSDPStrategy) and shards_weights(strategy):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, config):
            state = dict(strategy.model.state_dict())
        if not rank0:
            return None
        from genlab.models.base import drop_unsaved_keys

        drop_unsaved_keys(module, state)  # inside the wrapper the module's hook keeps them all
        return state
    if isinstance(strategy, DeepSpeedStrategy):
        # Lightning's teardown after fit moved the module to the CPU; its partitions and
        # float32 masters are gathered on the GPU
        module.to(strategy.root_device)
        return _deepspeed_state_dict(module, rank0, bool(strategy.zero_stage_3))
    return dict(module.state_dict()) if rank0 else None


def _deepspeed_state_dict(
    module: pl.LightningModule, rank0: bool, partitioned: bool
) -> dict[str, torch.Tensor] | None:
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_get_full_fp32_param

    from genlab.models.base import plain_name

    saved = _saved_keys(module)
    named = [(plain_name(n), p) for n, p in module.named_parameters()]
    gathered = [p for n, p in named if saved(n)]
    with GatheredParameters(gathered, modifier_rank=None) if partitioned else nullcontext():
        state = module.state_dict()
        state = {k: v.detach().cpu().clone() for k, v in state.items()} if rank0 else {}
    for name, param in named:  # the same order on every rank: each call is a collective
        if saved(name) and param.requires_grad:
            master = safe_get_full_fp32_param(param)
            if master is not None and rank0:
                state[name] = master.detach().cpu().clone()
    return state if rank0 else None


def _saved_keys(module: torch.nn.Module) -> Callable[[str], bool]:
    """The module's ``saved_keys`` predicate (every key for modules without one)."""
    return module.saved_keys() if hasattr(module, "saved_keys") else (lambda _: True)


def export_trained_weights(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    build: Callable[[], pl.LightningModule],
    path: Path,
) -> Path | None:
    """Rank 0 writes ``module.export_weights(path)`` (and the files each method adds beside it).

    Under FSDP sharding and DeepSpeed the live module may hold shards or low-precision copies,
    so the float32 weights are gathered first (every rank must call this) and rank 0 writes the
    export from a whole copy of the model that ``build`` makes on its CPU, loaded with them.
    Returns the path on rank 0, else None.
    """
    strategy = trainer.strategy
    if not (shards_weights(strategy) or isinstance(strategy, DeepSpeedStrategy)):
        return module.export_weights(path) if trainer.is_global_zero else None
    state = gathered_state_dict(trainer, module)
    if state is None:
        return None
    log.info("exporting the gathered weights through a whole copy of the model on the CPU")
    whole = build()
    whole.load_state_dict(state)
    return whole.export_weights(path)


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder written by DeepSpeed (``trainer=deepspeed``)."""
    path = Path(path)
    return path.is_dir() and (path / "latest").is_file()


def refuse_frozen_saved_weights(strategy: object, module: torch.nn.Module) -> None:
    """Stop before training when checkpoints would silently lose weights the module saves.

    DeepSpeed with ``exclude_frozen_parameters`` (``trainer=deepspeed`` sets it, so that a
    LoRA's checkpoints do not carry the frozen base) leaves every parameter without gradients
    out of its checkpoints, including frozen ones the module does save (an EMA copy).
    """
    if not getattr(strategy, "exclude_frozen_parameters", False):
        return
    from genlab.models.base import plain_name

    saved = _saved_keys(module)
    names = [plain_name(n) for n, p in module.named_parameters() if not p.requires_grad]
    lost = [n for n in names if saved(n)]
    if lost:
        raise ValueError(
            f"{len(lost)} weight(s) this model saves are frozen parameters (e.g. {lost[:3]}), "
            "which DeepSpeed leaves out of its checkpoints "
            "(trainer.strategy.exclude_frozen_parameters=true): set "
            "trainer.strategy.exclude_frozen_parameters=false (checkpoints then hold every "
            "frozen weight too), or switch off the part that owns them"
        )


# mixed precisions run as DeepSpeed's torch_autocast, with the autocast dtype
_AUTOCAST_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}
_OWN_PRECISION_KEYS = {"bf16", "fp16", "torch_autocast"}


class DeepSpeedAutocastStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, whose mixed precisions are torch autocast, and whose
    checkpoint folders replace the previous ones whole.

    Lightning maps ``bf16-mixed`` (``16-mixed``) to DeepSpeed's bf16 (fp16) mode: every weight
    in bf16 and no autocast (the engine even switches off an autocast around it), so each
    float32 tensor a model makes itself (noise, timestep embeddings, point clouds) meets bf16
    weights and the step fails. Here it is DeepSpeed's ``torch_autocast`` instead: float32
    weights, each operation cast as under the other strategies' mixed precision, gradients of
    linear and convolution layers communicated in the low precision; under ``16-mixed``
    DeepSpeed scales the loss with torch's ``GradScaler``. A ``config`` that sets ``bf16``,
    ``fp16`` or ``torch_autocast`` itself is left as it is.
    """

    def _format_config(self) -> None:
        dtype = _AUTOCAST_DTYPES.get(self.precision_plugin.precision)
        autocast = dtype is not None and not _OWN_PRECISION_KEYS & set(self.config or {})
        if autocast:
            self.config["torch_autocast"] = {"enabled": True, "dtype": dtype}
            # not DeepSpeed's own bf16 / fp16 mode on top
            self.config["bf16"] = {"enabled": False}
            self.config["fp16"] = {"enabled": False}
        super()._format_config()  # sets gradient_clipping from trainer.gradient_clip_val
        clip = self.config.get("gradient_clipping")
        if autocast and dtype == "float16" and clip:
            # DeepSpeed 0.19's ZeRO optimisers scale the loss with a GradScaler but clip before
            # the scaler unscales, against their own loss scale of 1
            raise ValueError(
                f"gradient clipping ({clip}) cannot run with trainer.precision=16-mixed under "
                "trainer=deepspeed: DeepSpeed clips the loss-scaled gradients of float16 "
                "autocast before unscaling them, so every step would be shrunk by the loss "
                "scale. Set trainer.gradient_clip_val=null, or use trainer.precision=bf16-mixed "
                "(GPUs from Ampere on), or trainer=ddp / trainer=fsdp"
            )

    def save_checkpoint(
        self, checkpoint: dict, filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """DeepSpeed writes its folder (one file per rank) beside the target, and rank 0 puts
        it in place once every rank has finished (:func:`replace_folder`): a crash while
        writing leaves the previous ``last.ckpt`` whole. Needs a file system shared by the
        ranks, as DeepSpeed's own resume does."""
        target = Path(self.broadcast(str(filepath)))
        staged = staging_folder(target)
        if self.is_global_zero:
            remove_path(staged)  # what a crashed write left
        self.barrier("deepspeed_checkpoint_staging")
        super().save_checkpoint(checkpoint, staged, storage_options)
        self.barrier("deepspeed_checkpoint_written")
        if self.is_global_zero:
            replace_folder(staged, target)
        self.barrier("deepspeed_checkpoint_in_place")


class DeepSpeedAutocastPrecision(DeepSpeedPrecision):
    """Lightning's DeepSpeed precision plugin, leaving the batch's floats as they are under
    ``bf16-mixed`` and ``16-mixed`` (:class:`DeepSpeedAutocastStrategy` autocasts per
    operation; Lightning's plugin casts the whole batch to the low precision first, so point
    clouds would lose precision)."""

    def convert_input(self, data: Any) -> Any:
        if self.precision in _AUTOCAST_DTYPES:
            return data
        return super().convert_input(data)


def refuse_test_after_zero3(strategy: object, testing: bool) -> None:
    """Stop before training a run that would test a ZeRO-3 checkpoint after fit.

    ``trainer.test`` loads the best checkpoint into DeepSpeed's inference engine, which cannot
    restore a ZeRO-3 folder (DeepSpeed 0.19: ``'DeepSpeedZeRoOffload' object has no attribute
    '_restore_from_bit16_weights'``); the run would fail after the whole training.
    """
    if testing and getattr(strategy, "zero_stage_3", False):
        raise ValueError(
            "test=true cannot run with DeepSpeed ZeRO-3 (trainer.strategy.stage=3): DeepSpeed's "
            "inference engine cannot load the ZeRO-3 checkpoint for testing. Set test=false "
            "(validation metrics are still logged), or use trainer.strategy.stage=2 or trainer=fsdp"
        )
