"""Scale-out through the real entry point: DDP on CPU (gloo), sweeps, launchers, LR scaling.

The end-to-end tests run ``python train.py`` as subprocesses, as a user would, with the tiny
voxel VAE-GAN; together they take about three minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from genlab.callbacks.scaling import ScalingReport, lr_scale, scale_config_lr
from genlab.callbacks.sweep import SweepSummary
from genlab.distributed import (
    SCORER_SEES_A_SHARD,
    DeepSpeedAutocastPrecision,
    DeepSpeedAutocastStrategy,
    call_with_full_weights,
    check_strategy,
    config_flags,
    export_trained_weights,
    gathered_state_dict,
    gradient_norm,
    job_command_line,
    refuse_frozen_saved_weights,
    refuse_test_after_zero3,
    refuse_under_sharding,
    shards_weights,
)
from genlab.models.base import GenerativeModule, plain_name
from tests.helpers import TINY_VOXEL, compose_config

REPO = Path(__file__).resolve().parents[2]
# 30 training shapes: an epoch is 2 batches of 8 per rank with 2 ranks, 4 with one
TINY = [o for o in TINY_VOXEL if not o.startswith("trainer.max_epochs")]
FAST = [*TINY, "trainer.max_epochs=1", "callbacks.samples.every_n_epochs=0"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu"]
TWO = [*DDP, "trainer.devices=2"]
DIGEST = "+callbacks.digest._target_=tests.integration.test_scale_out.WeightsDigest"


class WeightsDigest(pl.Callback):
    """Test-only: each rank writes ``weights_rank<N>.json`` into the run dir at the end of fit.

    sha256 of the parameters (at the start and at the end of training), of the buffers
    (BatchNorm running statistics), and a digest of every training sample the rank saw.
    """

    def __init__(self) -> None:
        self.start = ""
        self.samples: list[str] = []

    @staticmethod
    def digest(tensors: Any) -> str:
        h = hashlib.sha256()
        for name, t in tensors:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.digest(pl_module.named_parameters())

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if "object_id" in batch:  # objects with ids (objaverse, captioned meshes)
            self.samples += [str(i) for i in batch["object_id"]]
            return
        # otherwise the largest tensor of each sample (voxels, photos, views) identifies it
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 1]
        for sample in max(tensors, key=lambda t: t[0].numel()):
            self.samples.append(hashlib.sha1(sample.cpu().numpy().tobytes()).hexdigest())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(trainer.default_root_dir) / f"weights_rank{trainer.global_rank}.json"
        out.write_text(
            json.dumps(
                {
                    "world_size": trainer.world_size,
                    "start": self.start,
                    "params": self.digest(pl_module.named_parameters()),
                    "buffers": self.digest(pl_module.named_buffers()),
                    "samples": self.samples,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                }
            )
        )


def run_train(tmp_path: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PROJECT_ROOT": str(tmp_path),
        "GENLAB_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HYDRA_FULL_ERROR": "1",
    }
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def hydra_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(".hydra"))


def rank_reports(run: Path) -> list[dict]:
    return [json.loads((run / f"weights_rank{r}.json").read_text()) for r in (0, 1)]


CLASSES = ["box", "cone", "cylinder", "sphere", "torus"]


# ---- end to end -----------------------------------------------------------------------------
def test_ddp_two_cpu_processes_train_one_model_in_one_run_dir(tmp_path: Path) -> None:
    run_train(
        tmp_path,
        *TINY,
        "trainer.max_epochs=2",
        "callbacks.samples.every_n_epochs=0",
        *TWO,
        DIGEST,
        "task_name=ddp",
    )
    runs = list((tmp_path / "logs" / "ddp" / "runs").iterdir())
    assert len(runs) == 1, runs  # the second process joined the first one's run directory
    run = runs[0]
    assert hydra_dirs(tmp_path) == [run]  # one .hydra/, no outputs/ of the re-run process
    assert [p for p in tmp_path.rglob("checkpoints") if p.is_dir()] == [run / "checkpoints"]

    rank0, rank1 = rank_reports(run)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["start"] == rank1["start"]
    assert rank0["params"] == rank1["params"]  # gradients averaged: the same weights on both
    assert rank0["params"] != rank0["start"]  # and training did move them
    # each rank saw its own half of the 30 training shapes in each of the 2 epochs
    for report in (rank0, rank1):
        assert len(report["samples"]) == 2 * 15
    epoch0 = [set(r["samples"][:15]) for r in (rank0, rank1)]
    assert not epoch0[0] & epoch0[1] and len(epoch0[0] | epoch0[1]) == 30

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["scaling/world_size"] == 2
    assert metrics["scaling/per_device_batch_size"] == 8
    assert metrics["scaling/effective_batch_size"] == 16
    assert metrics["scaling/lr"] == pytest.approx(1e-3)  # scale_lr=none: unchanged
    assert {p.name for p in (run / "checkpoints").iterdir()} == {
        "epoch_000.ckpt",
        "epoch_001.ckpt",
        "last.ckpt",
    }
    assert (run / "model.safetensors").is_file() and (run / "ddp.log").is_file()
    # the conditioning report scores the test shapes of both ranks: every class is present
    with (run / "conditioning.csv").open() as fh:
        header = next(csv.reader(fh))
    assert sorted(c for c in header if c in CLASSES) == sorted(CLASSES), header


def _otuken3d_args(tmp_path: Path) -> list[str]:
    from tests.integration.test_otuken3d_train import TINY_OTUKEN3D

    return [
        o for o in TINY_OTUKEN3D if not o.startswith(("trainer.max_epochs", "callbacks.samples"))
    ]


def _shape_e_args(tmp_path: Path) -> list[str]:
    from genlab.data.synthetic_export import export_objaverse_layout
    from genlab.models.shape_e.encode import build_encoder, encode_folder
    from tests.integration.test_shape_e_train import train_overrides

    root = export_objaverse_layout(
        tmp_path / "objects", classes=("sphere", "box"), num_per_class=4, voxel_size=16,
        num_views=2, image_size=32, num_points=512,
    )  # fmt: skip
    encode_folder(root, build_encoder("shape_e_encoder_tiny", [], None), num_points=512)
    overrides = train_overrides(root, "shape_e_tiny", "data.val_fraction=0.25")
    return [o for o in overrides if not o.startswith(("trainer.max_epochs", "data.val_fraction"))]


def _lora_sd_args(tmp_path: Path) -> list[str]:
    import numpy as np
    from PIL import Image

    from tests.integration.test_lora_sd_train import overrides

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    args = overrides("lora_sd_tiny", photos, tmp_path / "tok", "data.val_fraction=0.2")
    drop = ("trainer.max_epochs", "callbacks.samples", "data.val_fraction=0.25")
    return [o for o in args if not o.startswith(drop)]


def _mv_diffusion_args(tmp_path: Path) -> list[str]:
    from genlab.data.synthetic_export import export_objaverse_layout

    data = export_objaverse_layout(
        tmp_path / "data", classes=("sphere", "box"), num_per_class=3, voxel_size=16,
        num_views=4, image_size=32, num_points=64,
    )  # fmt: skip
    return [
        "model=mv_diffusion_tiny", "data=mvds", f"data.root={data}", "data.image_size=32",
        "data.num_views=4", "data.batch_size=2", "data.val_fraction=0.2",
        "model.num_inference_steps=2", "model.lpips=false", "test=false", "logger=csv",
    ]  # fmt: skip


PREVIEWS = "callbacks.samples.every_n_epochs=1"


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FSDP needs a CUDA GPU (Lightning refuses it on the CPU)"
)
@pytest.mark.parametrize(
    ("method", "args", "extra", "sampled"),
    [
        # validation samples drawn in validation_step, and SamplePreviews at the end of fit
        # (with norm clipping, which Lightning refuses under FSDP: the module clips instead)
        ("lora_sd", _lora_sd_args, ["trainer.gradient_clip_val=1.0"], {"step_", "epoch_"}),
        ("otuken3d", _otuken3d_args, [PREVIEWS], {"epoch_"}),
        # validation renders and previews; its CLIP scorer is refused under sharding
        ("shape_e", _shape_e_args, [PREVIEWS, "model.clip_scorer=null"], {"step_", "epoch_"}),
    ],
)
def test_each_method_samples_and_checkpoints_under_fsdp(
    method: str, args: Any, extra: list[str], sampled: set[str], tmp_path: Path
) -> None:
    """trainer=fsdp (bf16-mixed) on one GPU: training steps, sampling through the wrapped model
    (previews and validation samples written), a full checkpoint of finite float32 weights."""
    from safetensors.torch import load_file

    drop = ("callbacks.samples=null", "trainer.accelerator=cpu")
    overrides = [o for o in args(tmp_path) if o not in drop]
    run_train(
        tmp_path, *overrides, "trainer=fsdp", "trainer.accelerator=gpu", "trainer.devices=1",
        "trainer.max_epochs=1", *extra, f"task_name={method}", timeout=600,
    )  # fmt: skip
    (run,) = list((tmp_path / "logs" / method / "runs").iterdir())
    written = {p.parent.name for p in [*run.rglob("grid.png"), *run.rglob("renders.png")]}
    assert {name[: name.index("_") + 1] for name in written} == sampled, written
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = [t for t in state["state_dict"].values() if t.is_floating_point()]
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights)
    assert {t.dtype for t in weights} == {torch.float32}
    # the checkpoint holds what the method saves (not a frozen base), as the gathered export does
    exported = load_file(str(run / "model.safetensors"))
    assert state["state_dict"].keys() == exported.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value, state["state_dict"][key], rtol=0, atol=0)
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["val/loss"])


def _deepspeed_missing() -> str | None:
    import importlib.util

    if not torch.cuda.is_available():
        return "DeepSpeed needs a CUDA GPU (Lightning refuses it on the CPU)"
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    return None


@pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))
@pytest.mark.parametrize(
    ("method", "args", "stage", "extra", "sampled"),
    [
        # ZeRO-2 with clipping (DeepSpeed clips), then ZeRO-3 (parameters partitioned) + resume
        ("lora_sd", _lora_sd_args, 2, ["trainer.gradient_clip_val=1.0"], {"step_", "epoch_"}),
        ("lora_sd", _lora_sd_args, 3, [], {"step_", "epoch_"}),
        # 16-mixed: float16 autocast, the loss scaled by DeepSpeed's GradScaler
        ("lora_sd", _lora_sd_args, 2, ["trainer.precision=16-mixed"], {"step_", "epoch_"}),
        # its experiment tests the best checkpoint after fit: under ZeRO-2, through DeepSpeed's
        # inference engine; ZeRO-3 refuses that (see cli)
        ("otuken3d", _otuken3d_args, 2, [PREVIEWS], {"epoch_"}),
        ("otuken3d", _otuken3d_args, 3, [PREVIEWS, "test=false"], {"epoch_"}),
        ("shape_e", _shape_e_args, 3, [PREVIEWS, "model.clip_scorer=null"], {"step_", "epoch_"}),
    ],
)
def test_each_method_samples_checkpoints_and_exports_under_deepspeed(
    method: str, args: Any, stage: int, extra: list[str], sampled: set[str], tmp_path: Path
) -> None:
    """trainer=deepspeed (bf16-mixed as DeepSpeed's torch autocast) on one GPU: samples drawn
    through the engine, a checkpoint folder whose float32 weights equal the exported
    model.safetensors (the optimiser's master weights); under ZeRO-3 a second run resumes from
    that folder."""
    from safetensors.torch import load_file

    from genlab.distributed import is_deepspeed_checkpoint
    from genlab.models.base import _deepspeed_fp32_weights

    drop = ("callbacks.samples=null", "trainer.accelerator=cpu")
    overrides = [o for o in args(tmp_path) if o not in drop]
    common = [
        *overrides, "trainer=deepspeed", "trainer.accelerator=gpu", "trainer.devices=1",
        f"trainer.strategy.stage={stage}", *extra, f"task_name={method}",
    ]  # fmt: skip
    run_train(tmp_path, *common, "trainer.max_epochs=1", timeout=600)
    (run,) = list((tmp_path / "logs" / method / "runs").iterdir())
    written = {p.parent.name for p in [*run.rglob("grid.png"), *run.rglob("renders.png")]}
    assert {name[: name.index("_") + 1] for name in written} == sampled, written
    folder = run / "checkpoints" / "last.ckpt"
    assert is_deepspeed_checkpoint(folder)
    # each folder was written beside its place and moved there whole
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    master = _deepspeed_fp32_weights(folder)
    exported = load_file(str(run / "model.safetensors"))
    assert master.keys() == exported.keys() and exported
    for key, value in exported.items():  # DeepSpeed's reader gives buffers as float too
        if value.is_floating_point():
            assert value.dtype == torch.float32 and bool(torch.isfinite(value).all()), key
        torch.testing.assert_close(value.float(), master[key].float(), rtol=0, atol=0)
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["val/loss"])
    if method == "otuken3d" and "test=false" not in extra:  # the best checkpoint was tested
        assert 0 <= metrics["test/iou"] <= 1 and math.isfinite(metrics["test/chamfer"])
    if method == "lora_sd":  # the adapters' up projections start at zero: training moved them
        up = [value for key, value in exported.items() if "lora_B" in key]
        assert up and all(bool(value.abs().sum() > 0) for value in up)
    if stage == 3 and method == "lora_sd":
        run_train(tmp_path, *common, "trainer.max_epochs=2", f"ckpt_path={folder}", timeout=600)
        (resumed,) = [r for r in (tmp_path / "logs" / method / "runs").iterdir() if r != run]
        # the client state (Lightning's loops) beside rank 0's ZeRO-3 model states
        states = "checkpoint/zero_pp_rank_0_mp_rank_00_model_states.pt"
        first = torch.load(folder / states, weights_only=False)
        second = torch.load(resumed / "checkpoints" / "last.ckpt" / states, weights_only=False)
        assert (first["epoch"], second["epoch"]) == (0, 1)
        assert second["global_step"] == 2 * first["global_step"] > 0


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("otuken3d", _otuken3d_args),
        ("shape_e", _shape_e_args),
        ("lora_sd", _lora_sd_args),
        ("mv_diffusion", _mv_diffusion_args),
    ],
)
def test_each_method_trains_under_ddp_with_identical_weights(
    method: str, args: Any, tmp_path: Path
) -> None:
    """otuken3d (progressive growth, FD/Chamfer metrics), the Shap-E prior (non-finite-step vote,
    sampled validation), DreamBooth LoRA and multi-view diffusion in 2 CPU processes: one run
    dir, the same weights on both ranks, each rank its own samples."""
    run_train(
        tmp_path, *args(tmp_path), "trainer.max_epochs=2", *TWO, DIGEST, f"task_name={method}",
        "callbacks.samples=null",
    )  # fmt: skip
    (run,) = list((tmp_path / "logs" / method / "runs").iterdir())
    assert hydra_dirs(tmp_path) == [run]
    rank0, rank1 = rank_reports(run)
    assert rank0["world_size"] == 2 and rank0["start"] == rank1["start"]
    assert rank0["params"] == rank1["params"] != rank0["start"]
    firsts = [set(r["samples"][: len(r["samples"]) // 2]) for r in (rank0, rank1)]
    # each rank trained on its own samples in the first epoch (DistributedSampler repeats
    # one to even out an odd count)
    assert min(map(len, firsts)) >= 2 and len(firsts[0] & firsts[1]) <= 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["scaling/world_size"] == 2 and math.isfinite(metrics["val/loss"])


def test_multirun_of_ddp_jobs_with_linear_lr_scaling(tmp_path: Path) -> None:
    run_train(
        tmp_path,
        "-m",
        *FAST,
        *TWO,
        DIGEST,
        "scale_lr=linear",
        "model.optimizer.lr=1e-3,3e-4",
        "task_name=ddp_sweep",
    )
    root = tmp_path / "logs" / "ddp_sweep"
    assert [p.name for p in root.iterdir()] == ["multiruns"]  # no runs/ of re-run processes
    sweeps = list((root / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    assert hydra_dirs(tmp_path) == jobs
    for job, lr in zip(jobs, (1e-3, 3e-4), strict=True):
        rank0, rank1 = rank_reports(job)
        # both ranks trained this job (not the sweep again) with the doubled learning rate
        assert rank0["params"] == rank1["params"] != rank0["start"]
        assert rank0["lr"] == rank1["lr"] == pytest.approx(2 * lr)
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["scaling/lr_scale"] == 2 and metrics["scaling/effective_batch_size"] == 16
        assert metrics["lr-Adam"] == pytest.approx(2 * lr)
        assert (job / "checkpoints" / "last.ckpt").is_file()
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["model"]["optimizer"]["lr"] == pytest.approx(lr)  # as asked; scaled at run


def test_optuna_sweep_in_parallel_writes_best_params_and_best_config(tmp_path: Path) -> None:
    """2 Optuna trials at once in 2 joblib worker processes (a parallel CPU sweep)."""
    run_train(
        tmp_path,
        "-m",
        *FAST,
        "hparams_search=voxel_vaegan_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=joblib_pool",
        "hydra.launcher.n_jobs=2",
        # a metric that differs between 1-epoch trials (val/iou is still 0 that early)
        "optimized_metric=val/loss_recon",
        "hydra.sweeper.direction=minimize",
        "task_name=optuna",
    )
    sweeps = list((tmp_path / "logs" / "optuna" / "multiruns").iterdir())
    assert len(sweeps) == 1
    sweep = sweeps[0]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = {
        job: json.loads((sweep / job / "metrics.json").read_text())["val/loss_recon"]
        for job in ("0", "1")
    }
    assert results["best_value"] == pytest.approx(min(values.values()))
    searched = {
        "model.optimizer.lr",
        "model.disc_lr_ratio",
        "model.lambda_adv",
        "model.kl_weight",
        "model.dice_weight",
    }  # model.generator.latent_dim is fixed by the command line
    assert set(results["best_params"]) == searched
    with (sweep / "sweep_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert [float(r["val/loss_recon"]) for r in rows] == pytest.approx([values["0"], values["1"]])
    best_job = min(values, key=values.get)
    best = yaml.safe_load((sweep / "best_config.yaml").read_text())
    assert best["model"]["optimizer"]["lr"] == pytest.approx(
        results["best_params"]["model.optimizer.lr"]
    )
    assert (
        (sweep / "best_config.yaml").read_text().startswith(f"# best job of the sweep: {best_job}")
    )


def test_submitit_local_launches_a_job(tmp_path: Path) -> None:
    run_train(tmp_path, "-m", *FAST, "hydra/launcher=submitit_local_jobs", "task_name=submitit")
    sweep = next((tmp_path / "logs" / "submitit" / "multiruns").iterdir())
    assert (sweep / ".submitit").is_dir()  # the job went through submitit
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".submitit", "0"]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert 0 <= metrics["val/iou"] <= 1 and (sweep / "0" / "checkpoints" / "last.ckpt").is_file()


# ---- pieces ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule, world, accumulate, factor",
    [
        ("none", 8, 2, 1.0),
        (None, 8, 1, 1.0),
        ("linear", 4, 1, 4.0),
        ("linear", 4, 2, 8.0),
        ("sqrt", 4, 1, 2.0),
        ("SQRT", 2, 8, 4.0),
    ],
)
def test_lr_scale_rules(rule: str | None, world: int, accumulate: int, factor: float) -> None:
    assert lr_scale(rule, world, accumulate) == pytest.approx(factor)


def test_unknown_lr_rule_is_refused_when_the_callback_is_built() -> None:
    with pytest.raises(ValueError, match=r"scale_lr='cubic'.*none, linear, sqrt"):
        ScalingReport(scale_lr="cubic")


def test_scale_config_lr_uses_the_trainer_world_size(tmp_path: Path) -> None:
    cfg = compose_config("train", [*FAST, *DDP, "trainer.devices=4", "scale_lr=sqrt"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert scale_config_lr(cfg, trainer) == pytest.approx(2.0)
    assert cfg.model.optimizer.lr == pytest.approx(2e-3)
    model = instantiate(cfg.model)
    assert model.configure_optimizers()[0].param_groups[0]["lr"] == pytest.approx(2e-3)


def test_trainer_configs_for_scale_out(tmp_path: Path) -> None:
    cfg = compose_config("train", [*TWO, "trainer.num_nodes=1"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.world_size == 2
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"

    fsdp = compose_config("train", ["trainer=fsdp"], tmp_path)
    assert fsdp.trainer.strategy.sharding_strategy == "FULL_SHARD"
    strategy = instantiate(fsdp.trainer.strategy)  # builds without a GPU; training needs one
    assert type(strategy).__name__ == "FSDPStrategy"
    with pytest.raises(InstantiationException, match="requires a GPU accelerator"):
        instantiate(fsdp.trainer, accelerator="cpu", logger=False)

    deepspeed = compose_config("train", ["trainer=deepspeed"], tmp_path)
    assert deepspeed.trainer.strategy.stage == 2 and deepspeed.trainer.plugins is None
    assert deepspeed.trainer.strategy.exclude_frozen_parameters is True
    plugin = instantiate(deepspeed.trainer.strategy.precision_plugin)  # steps under autocast
    assert (
        type(plugin).__name__ == "DeepSpeedAutocastPrecision" and plugin.precision == "bf16-mixed"
    )
    try:
        import deepspeed as _  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"DeepSpeedStrategy.*pip install -U deepspeed"):
            check_strategy(deepspeed.trainer)
    check_strategy(cfg.trainer)  # DDP builds


def test_deepspeed_checkpoints_keep_every_saved_weight_and_folders_are_accepted(
    tmp_path: Path,
) -> None:
    """trainer=deepspeed leaves frozen parameters out of its checkpoint folders: a model that
    saves a frozen one stops before training; the folders are taken as ckpt_path and read (with
    deepspeed installed) or refused naming the package."""
    from genlab.cli import resolve_ckpt_path
    from genlab.models.base import load_weights

    excluding = SimpleNamespace(exclude_frozen_parameters=True)
    refuse_frozen_saved_weights(excluding, _TwoLayers())  # its frozen layer is not saved
    model = _TwoLayers()
    model.a.bias.requires_grad_(False)  # frozen, but saved like an EMA copy
    with pytest.raises(
        ValueError,
        match=r"1 weight\(s\) this model saves .*'a.bias'.*exclude_frozen_parameters=false",
    ):
        refuse_frozen_saved_weights(excluding, model)
    refuse_frozen_saved_weights(SimpleNamespace(exclude_frozen_parameters=False), model)
    # testing the best checkpoint after fit is refused before training under ZeRO-3
    with pytest.raises(ValueError, match=r"test=true cannot run with DeepSpeed ZeRO-3"):
        refuse_test_after_zero3(SimpleNamespace(zero_stage_3=True), True)
    refuse_test_after_zero3(SimpleNamespace(zero_stage_3=True), False)
    refuse_test_after_zero3(SimpleNamespace(zero_stage_3=False), True)

    folder = tmp_path / "logs" / "job" / "runs" / "1" / "checkpoints" / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        resolve_ckpt_path(str(folder), tmp_path / "logs", "job")
    (folder / "latest").write_text("checkpoint")
    assert resolve_ckpt_path(str(folder), tmp_path / "logs", "job") == str(folder)
    assert resolve_ckpt_path("last", tmp_path / "logs", "job") == str(folder)
    try:
        import deepspeed as _  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match=r"last.ckpt is a DeepSpeed checkpoint"):
            load_weights(_TwoLayers(), folder)


def _deepspeed_strategy(precision: str, config: dict) -> DeepSpeedAutocastStrategy:
    """The strategy with the attributes Lightning's ``__init__`` gives it (``__init__`` itself
    needs the deepspeed package), in one process."""
    strategy = DeepSpeedAutocastStrategy.__new__(DeepSpeedAutocastStrategy)
    strategy._precision_plugin = DeepSpeedAutocastPrecision(precision)
    strategy.config, strategy._lightning_module, strategy.cluster_environment = config, None, None
    strategy.loss_scale, strategy.loss_scale_window, strategy.min_loss_scale = 0, 1000, 1
    strategy.initial_scale_power, strategy.hysteresis = 16, 2
    strategy.exclude_frozen_parameters = True
    return strategy


@pytest.mark.parametrize(
    ("precision", "own", "expected"),
    [
        ("bf16-mixed", {}, {"torch_autocast": "bfloat16", "bf16": False, "fp16": False}),
        ("16-mixed", {}, {"torch_autocast": "float16", "bf16": False, "fp16": False}),
        ("32-true", {}, {}),
        # a config that chooses its own precision is left as it is
        ("16-mixed", {"fp16": {"enabled": True}}, {"fp16": True}),
    ],
)
def test_deepspeed_mixed_precision_is_torch_autocast(
    precision: str, own: dict, expected: dict
) -> None:
    strategy = _deepspeed_strategy(precision, {"zero_optimization": {"stage": 2}, **own})
    strategy._format_config()
    config = strategy.config
    chosen = {
        key: config[key]["dtype"] if key == "torch_autocast" else config[key]["enabled"]
        for key in ("torch_autocast", "bf16", "fp16")
        if key in config
    }
    assert chosen == expected
    batch = {"points": torch.randn(2, 3, dtype=torch.float64), "ids": torch.arange(2)}
    converted = strategy.precision_plugin.convert_input(batch)
    kept = precision.endswith("-mixed")  # autocast casts per operation, not the batch
    assert (converted["points"].dtype == torch.float64) == kept
    assert converted["ids"].dtype == torch.int64


def test_deepspeed_float16_refuses_clipping_the_loss_scaled_gradients() -> None:
    """At setup, before the first step: trainer.gradient_clip_val (or the config's own
    gradient_clipping) with 16-mixed autocast stops the run, naming what to change."""

    def set_up(precision: str, clip: float | None, config: dict | None = None) -> dict:
        strategy = _deepspeed_strategy(
            precision, {"train_micro_batch_size_per_gpu": 1, **(config or {})}
        )
        trainer = SimpleNamespace(gradient_clip_val=clip, accumulate_grad_batches=1)
        strategy._lightning_module = SimpleNamespace(trainer=trainer)
        strategy._format_config()
        return strategy.config

    with pytest.raises(ValueError, match=r"clipping \(1.0\) cannot run with .*16-mixed.*"
                       r"gradient_clip_val=null.*bf16-mixed"):  # fmt: skip
        set_up("16-mixed", 1.0)
    with pytest.raises(ValueError, match=r"clipping \(0.5\)"):  # a config's own clipping
        set_up("16-mixed", None, {"gradient_clipping": 0.5})
    assert set_up("16-mixed", None)["gradient_clipping"] == 0.0
    assert set_up("16-mixed", 0.0)["torch_autocast"]["dtype"] == "float16"
    assert set_up("bf16-mixed", 1.0)["gradient_clipping"] == 1.0
    # a config with its own fp16 section is DeepSpeed's fp16 mode, which unscales first
    assert set_up("16-mixed", 1.0, {"fp16": {"enabled": True}})["gradient_clipping"] == 1.0


class _FolderWriter:
    """Writes a checkpoint folder as DeepSpeed's engine does (a tag folder and ``latest``),
    failing after its first file when told to."""

    def __init__(self) -> None:
        self.fail = False

    def save_checkpoint(self, save_dir: str, client_state: dict, tag: str, **_: Any) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, folder / "mp_rank_00_model_states.pt")
        if self.fail:
            raise OSError("disk full")
        torch.save({"step": client_state["global_step"]}, folder / "optim_states.pt")
        (Path(save_dir) / "latest").write_text(tag)


def test_deepspeed_checkpoint_folders_replace_the_previous_one_whole(tmp_path: Path) -> None:
    """A save writes beside the target and puts the finished folder in place: a save that fails
    half-way leaves the previous folder as it was, and the next save clears what it left."""
    from genlab.distributed import is_deepspeed_checkpoint

    strategy = _deepspeed_strategy("bf16-mixed", {})
    strategy.model = engine = _FolderWriter()  # type: ignore[assignment]  # deepspeed_engine
    target = tmp_path / "checkpoints" / "last.ckpt"
    states = target / "checkpoint" / "mp_rank_00_model_states.pt"

    strategy.save_checkpoint({"global_step": 1, "state_dict": {}}, target)
    assert is_deepspeed_checkpoint(target) and torch.load(states)["global_step"] == 1
    assert "state_dict" not in torch.load(states)  # the engine saves the weights itself
    (target / "checkpoint" / "stale.pt").write_text("from an older save")

    engine.fail = True
    with pytest.raises(OSError, match="disk full"):
        strategy.save_checkpoint({"global_step": 2}, target)
    assert torch.load(states)["global_step"] == 1  # untouched
    assert torch.load(target / "checkpoint" / "optim_states.pt")["step"] == 1
    assert (tmp_path / "checkpoints" / ".last.ckpt.partial").is_dir()  # the failed write

    engine.fail = False
    strategy.save_checkpoint({"global_step": 3}, target)
    assert torch.load(states)["global_step"] == 3
    assert torch.load(target / "checkpoint" / "optim_states.pt")["step"] == 3
    assert not (target / "checkpoint" / "stale.pt").exists()  # replaced, not merged
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_launcher_configs_follow_the_trainer(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.helpers import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            ["hydra/launcher=slurm", *DDP, "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4
    assert launcher["nodes"] == 2
    for key in ("partition", "timeout_min", "mem_gb", "cpus_per_task", "setup"):
        assert key in launcher


def test_a_sweep_job_is_re_run_alone_in_run_mode() -> None:
    argv = ["train.py", "-m", "--config-name", "params", "-cd=/x", "lr=1,2", "hydra.verbose=true"]
    assert config_flags(argv[1:]) == ["--config-name", "params", "-cd=/x"]
    assert job_command_line(
        argv, ["lr=2", "trainer=ddp"], ["hydra.mode=MULTIRUN", "hydra.verbose=true"]
    ) == [
        "train.py",
        "--config-name",
        "params",
        "-cd=/x",
        "lr=2",
        "trainer=ddp",
        "hydra.verbose=true",
        "hydra.mode=RUN",
    ]


def test_ddp_job_of_a_sweep_is_re_run_alone_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from genlab.distributed import job_processes

    job = [*TWO, "model.optimizer.lr=3e-4"]
    cfg = compose_config("train", job, tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    compose_config("train", [*job, "hydra.mode=MULTIRUN"], tmp_path)  # HydraConfig: a sweep job
    sweep_argv = ["train.py", "-m", "-cn", "train", "model.optimizer.lr=1e-3,3e-4", *TWO]
    monkeypatch.setattr(sys, "argv", list(sweep_argv))
    for key in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)

    def run_dir() -> str:
        return OmegaConf.to_container(HydraConfig.get().run, resolve=False)["dir"]

    before = run_dir()
    with job_processes(trainer):
        # what Lightning's launcher re-runs: this job's overrides in run mode, in its directory
        assert sys.argv == ["train.py", "-cn", "train", *job, "hydra.mode=RUN"]
        assert run_dir() == str(tmp_path / "run")
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE="2", MASTER_PORT="12910")  # as Lightning does
    assert sys.argv == sweep_argv and run_dir() == before
    assert not {"LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)

    compose_config("train", [*job, "hydra.mode=MULTIRUN", "hydra/launcher=joblib_pool"], tmp_path)
    with (
        pytest.raises(RuntimeError, match="re-running the command line.*JoblibLauncher"),
        job_processes(trainer),
    ):
        pass


def test_sweep_summary_picks_the_best_job_by_direction(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    for job, value in (("0", 0.4), ("1", 0.7), ("2", None)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- lr={job}\n")
        (tmp_path / job / ".hydra" / "config.yaml").write_text(f"lr: {job}\n")
        if value is not None:
            (tmp_path / job / "metrics.json").write_text(json.dumps({"val/iou": value}))
    cfg = OmegaConf.create(
        {
            "optimized_metric": "val/iou",
            "model": {"main_metric_mode": "max"},
            "hydra": {"sweep": {"dir": str(tmp_path)}},
        }
    )
    SweepSummary().on_multirun_end(cfg)
    assert (tmp_path / "best_config.yaml").read_text().endswith("lr: 1\n")
    rows = list(csv.reader((tmp_path / "sweep_results.csv").open()))
    assert rows == [
        ["job", "val/iou", "overrides"],
        ["0", "0.4", "lr=0"],
        ["1", "0.7", "lr=1"],
        ["2", "", "lr=2"],
    ]
    cfg.hydra.sweeper = {"direction": "minimize"}
    SweepSummary().on_multirun_end(cfg)
    assert (tmp_path / "best_config.yaml").read_text().endswith("lr: 0\n")


class _Wrapper(torch.nn.Module):
    """Stands for a sharding wrapper: records that calls went through its forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.entered = module, 0

    def forward(self, *args: Any) -> Any:
        self.entered += 1
        return self.module(*args)


class _Sampler(pl.LightningModule):
    def sample(self, prompts: list[str], n: int) -> list[str]:
        return [f"{p}:{n}" for p in prompts]


def test_sampling_goes_through_the_wrapper_only_when_weights_are_sharded() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    sharded = [FSDPStrategy(), FSDPStrategy(sharding_strategy="SHARD_GRAD_OP")]
    whole = [FSDPStrategy(sharding_strategy="NO_SHARD"), DDPStrategy()]
    assert [shards_weights(s) for s in sharded + whole] == [True, True, False, False]
    for strategy, through_wrapper in ((sharded[0], 1), (whole[1], 0)):
        module = _Sampler()
        strategy.model = wrapper = _Wrapper(module)
        trainer = SimpleNamespace(strategy=strategy)
        assert call_with_full_weights(trainer, module, "sample", ["a", "b"], 2) == ["a:2", "b:2"]
        assert wrapper.entered == through_wrapper
        assert module.forward.__func__ is pl.LightningModule.forward  # the patch is undone
    # a scorer run by rank 0 after validation would see only its shard: refused at setup
    key, why = "model.metrics=null", SCORER_SEES_A_SHARD
    with pytest.raises(
        ValueError,
        match=r"model.metrics is not supported with FSDPStrategy.*Set model.metrics=null, or",
    ):
        refuse_under_sharding(sharded[0], True, key, why)
    refuse_under_sharding(sharded[0], False, key, why)
    refuse_under_sharding(whole[1], True, key, why)


def _voxel_model() -> pl.LightningModule:
    from functools import partial

    from genlab.models.voxel_vaegan import VoxelVAEGAN
    from genlab.models.voxel_vaegan.networks import ConditionalVAE, Discriminator
    from genlab.nn.text import HashedBagOfWordsEncoder

    torch.manual_seed(0)
    return VoxelVAEGAN(
        generator=ConditionalVAE(16, 16, 32, 8, 3, 3, occupancy_prior=0.3),
        discriminator=Discriminator(16, 32, 8, 3),
        text_encoder=HashedBagOfWordsEncoder(32),
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        voxel_size=16,
    )


def _preview_trainer(strategy: Any, rank: int) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        strategy=strategy, is_global_zero=rank == 0, sanity_checking=False, fast_dev_run=False,
        loggers=[], global_step=0, datamodule=None,
    )  # fmt: skip


PREVIEW_PROMPTS = ["a cube", "a ball"]


def _run_on_two_gloo_ranks(worker: Any, *args: Any) -> None:
    """``worker(rank, *args)`` in 2 spawned processes joined in a gloo process group."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_rank, args=(port, worker, args), nprocs=2)


def _gloo_rank(rank: int, port: int, worker: Any, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _fully_sharded(module: torch.nn.Module, units: set[type]) -> Any:
    """``module`` fully sharded by torch FSDP on the CPU, and a Lightning FSDPStrategy holding it."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    wrapper = FullyShardedDataParallel(
        module,
        auto_wrap_policy=ModuleWrapPolicy(units),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    strategy = FSDPStrategy()
    strategy.model = wrapper
    return strategy


def _sharded_previews(rank: int, out_dir: str) -> None:
    """One of 2 gloo ranks: the VAE-GAN fully sharded by torch FSDP on the CPU, previews written."""
    from genlab.callbacks.samples import SamplePreviews

    model = _voxel_model()
    strategy = _fully_sharded(model, {torch.nn.Conv3d, torch.nn.ConvTranspose3d})
    # each rank holds a shard: the plain call that rank 0 alone used to make cannot run
    with pytest.raises(RuntimeError):
        model.sample(PREVIEW_PROMPTS, 1, torch.Generator().manual_seed(1))
    previews = SamplePreviews(out_dir, PREVIEW_PROMPTS, num_per_prompt=2, seed=5)
    grid = previews.write(_preview_trainer(strategy, rank), model, 1)
    assert (grid is not None) == (rank == 0)


def test_previews_of_a_fully_sharded_model_match_the_whole_model(tmp_path: Path) -> None:
    """FSDP full-shard in 2 CPU processes (gloo): both ranks sample together through the wrapper
    and rank 0 writes exactly the meshes the unsharded model gives for the same seed."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from genlab.callbacks.samples import SamplePreviews

    _run_on_two_gloo_ranks(_sharded_previews, str(tmp_path / "fsdp"))

    whole = SingleDeviceStrategy(torch.device("cpu"))
    SamplePreviews(tmp_path / "whole", PREVIEW_PROMPTS, num_per_prompt=2, seed=5).write(
        _preview_trainer(whole, 0), _voxel_model(), 1
    )
    sharded = sorted(p.relative_to(tmp_path / "fsdp") for p in (tmp_path / "fsdp").rglob("*.obj"))
    reference = sorted(
        p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.obj")
    )
    assert len(reference) == 4 and sharded == reference
    for rel in reference:
        assert (tmp_path / "fsdp" / rel).read_bytes() == (tmp_path / "whole" / rel).read_bytes()


class _Scale(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(size) + 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class _TwoLayers(GenerativeModule):
    """Two trained layers after a frozen one (kept out of checkpoints, like a text encoder). Only
    the Linear layers become FSDP units: the frozen one is in the root unit, beside the module's
    other weights, as a frozen base or text encoder is."""

    frozen_modules = ("frozen",)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = _Scale(6).requires_grad_(False)
        self.a, self.b = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(self.frozen(x))))


def _clip_batch() -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(1))


def _sharded_step(rank: int, out_dir: str) -> None:
    """One of 2 gloo ranks, the module fully sharded: backward, the clipping hook, an SGD step,
    then the weights as a checkpoint and the export see them, and a strict reload."""
    from lightning.fabric.strategies.model_parallel import _load_raw_module_state
    from torch.distributed.fsdp import FullyShardedDataParallel

    out = Path(out_dir)
    module = _TwoLayers()
    strategy = _fully_sharded(module, {torch.nn.Linear})
    module._trainer = trainer = SimpleNamespace(strategy=strategy, is_global_zero=rank == 0)
    strategy.model(_clip_batch()).square().sum().backward()
    norms = {"local": gradient_norm(module, None), "whole": gradient_norm(module, strategy)}
    module.configure_gradient_clipping(None, 0.05, "norm")
    with FullyShardedDataParallel.summon_full_params(strategy.model, with_grads=True):
        grads = {
            plain_name(n): p.grad.clone() for n, p in module.named_parameters() if p.requires_grad
        }
    torch.optim.SGD(strategy.model.parameters(), lr=1.0).step()

    # what Lightning's last.ckpt holds: the strategy's (full) state dict, then the module's hook
    checkpoint = {"state_dict": strategy.lightning_module_state_dict()}
    module.on_save_checkpoint(checkpoint)
    checkpoint = checkpoint["state_dict"]
    export_trained_weights(trainer, module, _TwoLayers, out / "model.safetensors")
    if rank == 0:
        torch.save(checkpoint, out / "checkpoint.pt")
    torch.distributed.barrier()
    with torch.no_grad():  # forget the trained weights, then resume from the checkpoint
        for param in strategy.model.parameters():
            param.zero_()
    state = torch.load(out / "checkpoint.pt")
    _load_raw_module_state(state, strategy.model, world_size=2, strict=True)
    reloaded = gathered_state_dict(trainer, module)
    if rank == 0:
        run = {"grads": grads, "checkpoint": checkpoint, "reloaded": reloaded, "norms": norms}
        torch.save(run, out / "run.pt")


@pytest.fixture(scope="module")
def sharded_step(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_step")
    _run_on_two_gloo_ranks(_sharded_step, str(out))
    return out


def _whole_step() -> _TwoLayers:
    """The same step in one unsharded process (both ranks saw the same batch: same mean)."""
    whole = _TwoLayers()
    whole(_clip_batch()).square().sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.05)
    assert norm > 0.05  # clipping did something
    return whole


def test_gradient_clipping_by_norm_under_fsdp_uses_the_norm_over_all_shards(
    sharded_step: Path,
) -> None:
    """Lightning refuses norm clipping under FSDP; the modules' hook clips through the root
    wrapper, so 2 fully sharded CPU ranks end with the gradients one unsharded process clips to."""
    sharded = torch.load(sharded_step / "run.pt")["grads"]
    whole = {n: p.grad for n, p in _whole_step().named_parameters() if p.requires_grad}
    assert sharded.keys() == whole.keys() == {"a.weight", "a.bias", "b.weight", "b.bias"}
    for name, grad in whole.items():
        torch.testing.assert_close(sharded[name], grad, rtol=1e-5, atol=1e-7)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in sharded.values()]))
    assert total.item() == pytest.approx(0.05, rel=1e-4)


def test_gradient_norm_under_fsdp_is_the_whole_models(sharded_step: Path) -> None:
    """otuken3d logs train/grad_norm through gradient_norm: under FSDP, the norm over every
    rank's shards (before clipping), not the norm of rank 0's own shard."""
    norms = torch.load(sharded_step / "run.pt")["norms"]
    whole = _TwoLayers()
    whole(_clip_batch()).square().sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(whole.parameters(), math.inf)
    assert gradient_norm(whole, None) == pytest.approx(expected.item(), rel=1e-6)
    assert norms["whole"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert norms["local"].item() < 0.99 * expected.item()  # rank 0's shard alone
    # DeepSpeed holds the gradients in its own buffers: no norm rather than a part of it
    assert gradient_norm(whole, _deepspeed_strategy("bf16-mixed", {})) is None


def test_sharded_weights_are_checkpointed_exported_and_reloaded_whole(sharded_step: Path) -> None:
    """FSDP full-shard in 2 CPU processes: Lightning's full checkpoint holds the trained weights
    only (not the frozen layer) and whole; the export (gathered, written from a whole copy) has
    the same tensors; a strict reload into the sharded model brings them back exactly."""
    from safetensors.torch import load_file

    whole = _whole_step()
    torch.optim.SGD(whole.parameters(), lr=1.0).step()
    expected = whole.state_dict()
    assert set(expected) == {"a.weight", "a.bias", "b.weight", "b.bias"}

    run = torch.load(sharded_step / "run.pt")
    exported = load_file(str(sharded_step / "model.safetensors"))
    for got in (run["checkpoint"], exported, run["reloaded"]):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    # the step moved the weights: a checkpoint of the initial ones could not pass
    assert not torch.allclose(expected["a.weight"], _TwoLayers().a.weight)
