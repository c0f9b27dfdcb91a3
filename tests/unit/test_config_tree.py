"""Every config group composes, and what it names can be built; unknown keys fail with the key named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from genlab.cli import instantiate_all
from tests.helpers import CONF_DIR, TINY_VOXEL, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_defaults_compose_to_the_documented_default_job(tmp_path: Path) -> None:
    cfg = compose_config("train", [], tmp_path)
    assert cfg.model._target_ == "genlab.models.voxel_vaegan.VoxelVAEGAN"
    assert cfg.data.dataset._target_ == "genlab.data.synthetic_shapes.SyntheticShapes"
    assert cfg.data.voxel_size == cfg.model.voxel_size == cfg.model.generator.voxel_size == 32
    assert cfg.model.generator.cond_dim == cfg.model.text_encoder.embed_dim == 512
    assert cfg.callbacks.model_checkpoint.monitor == "val/iou"
    assert cfg.optimized_metric == "val/iou"
    assert cfg.model.optimizer._partial_ is True


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs_build(name: str, tmp_path: Path) -> None:
    if name == "fsdp":
        pytest.skip("FSDP needs a GPU accelerator; tests/integration/test_scale_out.py builds it")
    if name == "deepspeed":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    cfg = compose_config("train", [f"trainer={name}", "trainer.accelerator=cpu"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    if name == "gpu":
        assert cfg.trainer.precision == "bf16-mixed"
    if name == "ddp":
        assert type(trainer.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("name", [n for n in options("logger") if n not in ("wandb", "clearml")])
def test_logger_configs_build(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"logger={name}"], tmp_path)
    loggers = instantiate_all(cfg.get("logger"))
    expected = {"csv": ["CSVLogger"], "tensorboard": ["TensorBoardLogger"], "none": []}
    if name in expected:
        assert [type(lg).__name__ for lg in loggers] == expected[name]
    else:
        assert len(loggers) >= 2


def test_clearml_and_wandb_logger_configs_resolve(tmp_path: Path) -> None:
    cfg = compose_config("train", ["logger=[clearml,wandb]"], tmp_path)
    assert cfg.logger.clearml._target_ == "genlab.loggers.ClearMLLogger"
    assert cfg.logger.clearml.project_name == "genlab/train"
    assert cfg.logger.wandb.offline is True


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_configs_build(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"callbacks={name}"], tmp_path)
    callbacks = instantiate_all(cfg.get("callbacks"))
    if name == "default":
        names = {type(c).__name__ for c in callbacks}
        assert {
            "ModelCheckpoint",
            "LearningRateMonitor",
            "TQDMProgressBar",
            "SamplePreviews",
            "SystemMonitor",
            "RNGStateCallback",
            "LossCurves",
        } <= names


@pytest.mark.parametrize(
    "group", ["data", "model", "debug", "experiment", "paths", "hydra", "extras"]
)
def test_every_option_of_group_composes(group: str, tmp_path: Path) -> None:
    for name in options(group):
        extra = ["data.dataset.root=/nonexistent"] if name == "mesh_folder" else []
        cfg = compose_config("train", [f"{group}={name}", *extra], tmp_path)
        assert cfg.paths.output_dir == str(tmp_path / "run")


@pytest.mark.parametrize("text_encoder", options("model/text_encoder"))
def test_text_encoder_option_composes(text_encoder: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"model/text_encoder={text_encoder}"], tmp_path)
    assert cfg.model.text_encoder._target_.startswith("genlab.nn.text.")


def test_tiny_model_and_data_instantiate(tmp_path: Path) -> None:
    cfg = compose_config("train", TINY_VOXEL, tmp_path)
    model = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["voxels"].shape == (8, 1, 16, 16, 16)
    assert model.generator.latent_dim == 16


def test_inference_config_composes(tmp_path: Path) -> None:
    for task in options("task"):
        cfg = compose_config("inference", [f"task={task}", "prompts=[a chair,a table]"], tmp_path)
        assert cfg.task._partial_ is True
        assert list(cfg.prompts) == ["a chair", "a table"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.generator.hiden_channels=4", "model.generator.hiden_channels"),
        ("trainer.max_epoch=3", "trainer.max_epoch"),
    ],
)
def test_unknown_key_is_rejected_by_name(override: str, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        compose_config("train", [override], tmp_path)


def test_unknown_group_option_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="model"):
        compose_config("train", ["model=no_such_method"], tmp_path)


def test_scheduler_given_on_the_command_line_is_built(tmp_path: Path) -> None:
    override = "model.scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,_partial_:true,T_max:40}"
    cfg = compose_config("train", [*TINY_VOXEL, override], tmp_path)
    model = instantiate(cfg.model)
    (opt_g, opt_d), (sched_g, sched_d) = model.configure_optimizers()
    assert type(sched_g).__name__ == "CosineAnnealingLR" and sched_g.T_max == 40
    assert sched_d.optimizer is opt_d


# what each Optuna search is composed with (its file's usage line)
SEARCH_BASES = {
    "voxel_vaegan_optuna": [],
    "lora_sd_optuna": ["experiment=sks_toy_sd15"],
    "mv_diffusion_optuna": ["model=mv_diffusion", "data=mvds"],
    "shape_e_optuna": ["experiment=shape_e_objaverse"],
    "otuken3d_optuna": ["experiment=otuken3d"],
}


def _search_space(name: str) -> tuple[Any, dict[str, list]]:
    """The composed config of ``hparams_search=<name>`` and, per searched key, its extremes (the
    first and last choice, or the interval's ends) as Optuna's sweeper reads them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import CategoricalDistribution

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train", [*SEARCH_BASES[name], f"hparams_search={name}"], return_hydra_config=True
        )
    parser = OverridesParser.create()
    ends: dict[str, list] = {}
    for key, value in cfg.hydra.sweeper.params.items():
        (override,) = parser.parse_overrides([f"{key}={value}"])
        dist = create_optuna_distribution_from_override(override)
        if isinstance(dist, CategoricalDistribution):
            ends[key] = [dist.choices[0], dist.choices[-1]]
        else:
            ends[key] = [dist.low, dist.high]
    return cfg, ends


def test_every_method_has_an_optuna_search() -> None:
    methods = {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
    searches = set(options("hparams_search"))
    assert searches == set(SEARCH_BASES)
    covered = {s.removesuffix("_optuna") for s in searches}
    for method in ("voxel_vaegan", "lora_sd", "mv_diffusion", "shape_e", "otuken3d"):
        assert method in methods and method in covered


@pytest.mark.parametrize("name", sorted(SEARCH_BASES))
def test_optuna_search_spaces_name_existing_keys_and_compose_at_their_ends(
    name: str, tmp_path: Path
) -> None:
    """A searched key that does not exist, or a value its config refuses, would fail only when
    the trial runs: every key is in the composed config, and both ends of every range compose."""
    from omegaconf import OmegaConf

    cfg, ends = _search_space(name)
    assert cfg.optimized_metric.startswith("val/")
    assert cfg.hydra.sweeper.direction in ("minimize", "maximize")
    assert ends
    missing = object()
    for key in ends:
        assert OmegaConf.select(cfg, key, default=missing) is not missing, f"{name}: {key}"
    for end in (0, 1):
        trial = [f"{key}={values[end]}" for key, values in ends.items()]
        composed = compose_config("train", [*SEARCH_BASES[name], *trial], tmp_path)
        for key, values in ends.items():
            assert OmegaConf.select(composed, key) == values[end]
