"""The DVC pipeline's parameters come from the Hydra config tree only (no second source that drifts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from genlab.pipeline import class_of, compose_params, load_params
from tests.conftest import REPO_ROOT


def test_committed_params_match_the_hydra_composition(tmp_path: Path) -> None:
    fresh = compose_params(tmp_path / "params.yaml", config_dir=REPO_ROOT / "conf")
    committed = (REPO_ROOT / "params.yaml").read_text(encoding="utf-8")
    assert fresh.read_text(encoding="utf-8") == committed, (
        "params.yaml is out of date with conf/pipeline.yaml: run `genlab-data params`"
    )


def test_override_reaches_params_like_dvc_exp_run_set_param(tmp_path: Path) -> None:
    out = compose_params(
        tmp_path / "params.yaml",
        ["model.optimizer.lr=1e-4", "trainer.max_epochs=3"],
        config_dir=REPO_ROOT / "conf",
    )
    params = load_params(out)
    assert params.model.optimizer.lr == pytest.approx(1e-4)
    assert params.trainer.max_epochs == 3
    # interpolations are resolved into plain values, so each stage reads the same numbers
    assert params.prepare.voxel_size == params.model.voxel_size == params.data.voxel_size


def test_params_hold_no_machine_paths() -> None:
    text = (REPO_ROOT / "params.yaml").read_text(encoding="utf-8")
    assert str(REPO_ROOT) not in text
    assert not re.search(r"(^|\s)/(home|tmp|work|root|Users)/", text)


def test_every_dvc_yaml_variable_is_a_param() -> None:
    params = OmegaConf.load(REPO_ROOT / "params.yaml")
    dvc_yaml = (REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8")
    names = set(re.findall(r"\$\{([^}]+)\}", dvc_yaml))
    assert names, "dvc.yaml uses no parameters"
    for name in names:
        assert OmegaConf.select(params, name) is not None, f"dvc.yaml uses ${{{name}}}"
    stages = yaml.safe_load(dvc_yaml)["stages"]
    assert list(stages) == ["prepare", "train", "evaluate"]
    for stage in stages.values():
        for group in stage.get("params", []):
            assert OmegaConf.select(params, group) is not None, group


def test_prepare_depends_on_the_tracked_data_version() -> None:
    link = REPO_ROOT / "data" / "raw.version"
    assert link.is_symlink() and link.readlink() == Path("../data.dvc")
    tracked = yaml.safe_load((REPO_ROOT / "data.dvc").read_text(encoding="utf-8"))
    assert tracked["outs"][0]["path"] == "data/raw"
    assert tracked["outs"][0]["md5"].endswith(".dir")


@pytest.mark.parametrize(
    ("object_id", "expected"),
    [("sphere_0003", "sphere"), ("night_stand_12", "night_stand"), ("chair", "object")],
)
def test_class_of_object_ids(object_id: str, expected: str) -> None:
    assert class_of(object_id) == expected
