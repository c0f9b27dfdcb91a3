"""genlab.loggers.log_image / log_mesh dispatch to TensorBoard, wandb, ClearML and CSV loggers."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import trimesh
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from genlab.loggers import ClearMLLogger, log_image, log_mesh


@pytest.fixture
def image() -> Image.Image:
    array = np.zeros((12, 20, 3), dtype=np.uint8)
    array[..., 1] = 200
    return Image.fromarray(array)


@pytest.fixture
def mesh() -> trimesh.Trimesh:
    box = trimesh.creation.box()
    box.visual.vertex_colors = np.tile([255, 0, 0, 255], (len(box.vertices), 1)).astype(np.uint8)
    return box


def _accumulate(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_image_and_mesh(
    tmp_path: Path, image: Image.Image, mesh: trimesh.Trimesh
) -> None:
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    log_image([tb], "val/samples", image, step=7)
    mesh_path = tmp_path / "meshes" / "box.ply"
    log_mesh([tb], "val/mesh", mesh, mesh_path, step=7)
    tb.experiment.flush()

    assert mesh_path.is_file()  # written from the mesh because it did not exist
    acc = _accumulate(tb.log_dir)
    assert acc.Tags()["images"] == ["val/samples"]
    (event,) = acc.Images("val/samples")
    assert (event.step, event.width, event.height) == (7, 20, 12)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    assert decoded.shape[:2] == (12, 20) and decoded[..., 1].mean() > 150

    tensors = acc.Tags()["tensors"]
    assert {"val/mesh_VERTEX", "val/mesh_FACE", "val/mesh_COLOR"} <= set(tensors)
    (vertex_event,) = acc.Tensors("val/mesh_VERTEX")
    assert vertex_event.step == 7
    assert vertex_event.tensor_proto.tensor_shape.dim[1].size == len(mesh.vertices)
    (face_event,) = acc.Tensors("val/mesh_FACE")
    assert face_event.tensor_proto.tensor_shape.dim[1].size == len(mesh.faces)


def test_wandb_gets_image_and_object3d(
    tmp_path: Path, image: Image.Image, mesh: trimesh.Trimesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the GLB copy for PLY goes here

    wb = mock.MagicMock(spec=WandbLogger)
    log_image(wb, "samples", image, step=3)
    wb.log_image.assert_called_once_with(key="samples", images=[image], step=3)

    obj_path = tmp_path / "box.obj"
    log_mesh([wb], "mesh/obj", mesh, obj_path, step=3)
    ply_path = tmp_path / "box.ply"
    log_mesh([wb], "mesh/ply", mesh, ply_path, step=4)
    calls = wb.log_metrics.call_args_list
    assert [c.kwargs["step"] for c in calls] == [3, 4]
    obj_metrics, ply_metrics = (c.args[0] for c in calls)
    assert isinstance(obj_metrics["mesh/obj"], wandb.Object3D)
    assert obj_metrics["mesh/obj"]._path == str(obj_path)
    # wandb cannot read PLY: it gets a GLB export of the same mesh
    glb = Path(ply_metrics["mesh/ply"]._path)
    assert glb.suffix == ".glb" and glb.is_file() and tmp_path in glb.parents
    assert len(trimesh.load(glb, force="mesh").faces) == len(mesh.faces)


def test_clearml_dispatch(tmp_path: Path, image: Image.Image, mesh: trimesh.Trimesh) -> None:
    cm = mock.MagicMock(spec=ClearMLLogger)
    log_image([cm], "val/grid", image, step=5)
    cm.log_image.assert_called_once_with("val/grid", image, 5)
    path = tmp_path / "m.glb"
    log_mesh([cm], "val/mesh", mesh, path, step=5)
    cm.log_file.assert_called_once_with("val/mesh", path, 5)
    assert path.is_file()


def test_csv_and_unknown_loggers_are_skipped(
    tmp_path: Path, image: Image.Image, mesh: trimesh.Trimesh
) -> None:
    csv = CSVLogger(tmp_path, name="csv", version=0)
    unknown = mock.MagicMock()  # not a known logger type: never touched
    log_image([csv, unknown], "img", image, step=0)
    log_mesh([csv, unknown], "mesh", mesh, tmp_path / "m.obj", step=0)
    log_image(None, "img", image, step=0)
    assert unknown.mock_calls == []
    assert not Path(csv.log_dir).exists() or not any(Path(csv.log_dir).iterdir())


def test_one_failing_logger_does_not_stop_the_others(
    tmp_path: Path, image: Image.Image, caplog: pytest.LogCaptureFixture
) -> None:
    broken = mock.MagicMock(spec=ClearMLLogger)
    broken.log_image.side_effect = RuntimeError("boom")
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    log_image([broken, tb], "img", image, step=1)
    tb.experiment.flush()
    assert _accumulate(tb.log_dir).Tags()["images"] == ["img"]
    assert any("Could not log image 'img'" in r.getMessage() for r in caplog.records)
