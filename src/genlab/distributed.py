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
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, read_write

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
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

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


def refuse_scorer_under_sharding(strategy: object, scorer: object, key: str) -> None:
    """Stop a run whose scorer network would be sharded but is run by rank 0 alone.

    Scorers (CLIP, DINO) score samples at the end of validation on rank 0, outside any step;
    under FSDP / ZeRO-3 their weights would be shards there. Until they are kept whole on
    every rank, such a run stops at setup, naming the key to switch off.
    """
    if scorer is not None and shards_weights(strategy):
        raise ValueError(
            f"{key} is not supported with {type(strategy).__name__} sharding the weights: the "
            f"scorer runs on rank 0 alone after validation and would see only its shard. Set "
            f"{key}=null, or train with trainer=ddp"
        )
