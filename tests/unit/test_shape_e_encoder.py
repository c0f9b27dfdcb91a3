"""The Shap-E-style encoder: shapes, permutation invariance, training through the decoder,
checkpoints, the ``encode`` stage on an exported synthetic objaverse-layout folder, and
``train.py model=shape_e_encoder_tiny`` end to end."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from genlab.data.objaverse import ObjaverseDataModule, read_latent
from genlab.data.point_clouds import read_point_cloud
from genlab.data.synthetic_export import export_objaverse_layout
from genlab.models.shape_e.components import LatentShapeError, tiny_renderer
from genlab.models.shape_e.encode import encode_folder, main
from genlab.models.shape_e.encoder import (
    EncoderCheckpointError,
    ShapEEncoder,
    ShapEEncoderModule,
    camera_poses,
    load_encoder_checkpoint,
)

LATENT = (64, 32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic objects (2 spheres, 2 boxes) with meshes, 512 points, 2 small views."""
    return export_objaverse_layout(
        tmp_path_factory.mktemp("shape_e") / "objects",
        classes=("sphere", "box"),
        num_per_class=2,
        voxel_size=16,
        num_views=2,
        image_size=32,
        num_points=512,
    )


def _encoder(**kwargs) -> ShapEEncoder:
    torch.manual_seed(0)
    options = {"width": 32, "heads": 2, "num_layers": 1, "max_points": 256, **kwargs}
    return ShapEEncoder(LATENT, **options)


def _batch(root: Path, object_id: str) -> dict:
    points, colors = read_point_cloud(root / "points" / f"{object_id}.npy")
    return {
        "object_id": [object_id],
        "points": torch.from_numpy(points)[None],
        "point_colors": torch.from_numpy(colors)[None],
    }


def test_output_shape_range_and_views() -> None:
    encoder = _encoder(patch_size=8).eval()
    points = torch.rand(3, 300, 3) - 0.5
    latents = encoder(points, torch.rand(3, 300, 3))
    assert latents.shape == (3, *LATENT)
    assert latents.abs().max() < 1  # tanh bottleneck
    with_views = encoder(points, None, images=torch.rand(3, 2, 3, 16, 16))
    assert with_views.shape == (3, *LATENT)
    assert not torch.allclose(with_views, encoder(points, None))
    # the same view seen from another camera (genlab.data.cameras) changes the latent
    from genlab.data.cameras import look_at_camera

    images = torch.rand(3, 1, 3, 16, 16)
    front = camera_poses([look_at_camera(20, 0, 2.0)]).expand(3, -1, -1, -1)
    side = camera_poses([look_at_camera(20, 90, 2.0)]).expand(3, -1, -1, -1)
    assert front.shape == (3, 1, 3, 4)
    assert not torch.allclose(
        encoder(points, None, images, front), encoder(points, None, images, side)
    )
    with pytest.raises(ValueError, match=r"points must be \(batch, N > 0, 3\)"):
        encoder(torch.rand(3, 300, 2))


def test_permutation_invariance_over_points() -> None:
    encoder = _encoder().eval()
    points, colors = torch.rand(2, 400, 3) - 0.5, torch.rand(2, 400, 3)
    order = torch.randperm(400)
    torch.testing.assert_close(
        encoder(points, colors), encoder(points[:, order], colors[:, order]), atol=1e-5, rtol=0
    )


def test_training_through_the_decoder_reduces_occupancy_loss(objects: Path) -> None:
    """60 Adam steps on one sphere (renderer trained jointly): occupancy BCE falls >= 2.5x."""
    module = ShapEEncoderModule(
        _encoder(width=64, heads=4, num_layers=2, max_points=512),
        tiny_renderer(0),
        functools.partial(torch.optim.Adam, lr=3e-3),
        train_renderer=True,
        mesh_dir=str(objects / "meshes"),
        num_queries=1024,
        num_color_points=256,
        pool_size=4096,
    )
    batch = _batch(objects, "sphere_0000")
    optimizer = module.configure_optimizers()
    torch.manual_seed(0)
    history = []
    for _ in range(60):
        out = module.losses(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append((out["occupancy"].item(), out["occupancy_iou"].item()))
    first, last = history[0][0], np.mean([h[0] for h in history[-5:]])
    assert last < first / 2.5, (first, last)
    assert np.mean([h[1] for h in history[-5:]]) > 0.5  # inside/outside IoU at the queries
    # labels come from the mesh: about half the near-surface queries are inside
    _, targets = module.labels("sphere_0000", batch["points"][0].numpy())
    assert set(targets.unique().tolist()) == {0.0, 1.0}
    assert 0.1 < targets.mean() < 0.5


def test_view_loss_through_rendered_rays(objects: Path) -> None:
    module = ShapEEncoderModule(
        _encoder(),
        tiny_renderer(0),
        functools.partial(torch.optim.Adam),
        mesh_dir=str(objects / "meshes"),
        num_queries=64,
        num_color_points=16,
        pool_size=256,
        view_weight=1.0,
        view_size=8,
        view_samples=8,
    )
    module.views.root = objects
    views = module.views("box_0000")
    assert len(views) == 2  # the export's two views, each with a camera file
    origins, directions, rgb = views[0]
    assert origins.shape == directions.shape == rgb.shape == (64, 3)
    assert rgb.min() >= 0 and rgb.max() <= 1 and (rgb < 0.99).any()  # the object is in view
    out = module.losses(_batch(objects, "box_0000"))
    assert torch.isfinite(out["view"]) and out["view"] > 0
    out["view"].backward()
    assert module.encoder.head.weight.grad.abs().sum() > 0
    assert module.views("no_such_object") == []


def test_point_cloud_labels_without_a_mesh(objects: Path) -> None:
    module = ShapEEncoderModule(
        _encoder(), tiny_renderer(0), functools.partial(torch.optim.Adam), mesh_dir=None
    )
    points = _batch(objects, "box_0000")["points"][0].numpy()
    queries, targets = module.labels("box_0000", points)
    assert set(targets.unique().tolist()) == {0.0, 0.5}
    outside = queries[targets == 0].numpy()
    assert np.all(np.any((outside < points.min(0)) | (outside > points.max(0)), axis=1))
    # a bounded cache: an evicted object's pool is recomputed identically (seeded)
    module.labels.max_cached = 1
    module.labels("box_0001", points)
    assert list(module.labels._cache) == ["box_0001"]
    again, again_targets = module.labels("box_0000", points)
    assert torch.equal(again, queries) and torch.equal(again_targets, targets)


def test_frozen_renderer_and_latent_shape_check() -> None:
    renderer = tiny_renderer(0)
    module = ShapEEncoderModule(_encoder(), renderer, functools.partial(torch.optim.Adam))
    assert not any(p.requires_grad for p in module.renderer.parameters())
    assert not any(k.startswith("renderer.") for k in module.state_dict())
    with pytest.raises(LatentShapeError, match=r"encoder makes latents of shape \(64, 16\)"):
        ShapEEncoderModule(ShapEEncoder((64, 16)), renderer, functools.partial(torch.optim.Adam))


def test_checkpoint_round_trip_and_mismatch(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    encoder = _encoder().eval()
    points = torch.rand(1, 100, 3)
    torch.save(encoder.state_dict(), tmp_path / "enc.pt")
    fresh = ShapEEncoder(LATENT, 32, 2, 1, max_points=256)  # other random weights
    assert not torch.allclose(fresh.eval()(points), encoder(points))
    load_encoder_checkpoint(fresh, tmp_path / "enc.pt")
    torch.testing.assert_close(fresh(points), encoder(points))
    # a module export (encoder.* keys) loads too
    save_file({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, tmp_path / "m.st")
    (tmp_path / "m.st").rename(tmp_path / "model.safetensors")
    load_encoder_checkpoint(ShapEEncoder(LATENT, 32, 2, 1), tmp_path / "model.safetensors")

    wider = ShapEEncoder(LATENT, width=64, heads=2, num_layers=2)
    with pytest.raises(EncoderCheckpointError) as info:
        load_encoder_checkpoint(wider, tmp_path / "enc.pt")
    message = str(info.value)
    assert "enc.pt does not fit" in message
    assert "missing keys: layers.1." in message
    assert (
        "shape mismatches (checkpoint vs encoder): cross.attention.in_proj_bias (96,) vs (192,)"
        in message
    )
    state = encoder.state_dict()
    state["transmitter.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(EncoderCheckpointError, match=r"unexpected keys: transmitter\.extra"):
        load_encoder_checkpoint(_encoder(), tmp_path / "extra.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderCheckpointError, match="junk.pt: not a readable checkpoint"):
        load_encoder_checkpoint(_encoder(), tmp_path / "junk.pt")


def test_encode_fills_only_missing_latents_and_is_idempotent(objects, tmp_path) -> None:
    root = tmp_path / "objects"
    shutil.copytree(objects, root)
    (root / "latents").mkdir()
    kept = torch.full(LATENT, 0.25)
    torch.save(kept, root / "latents" / "box_0000.pt")
    encoder = _encoder()
    summary = encode_folder(root, encoder, num_points=256, batch_size=2)
    assert summary.kept == ["box_0000"]
    assert summary.encoded == ["box_0001", "sphere_0000", "sphere_0001"]
    assert torch.equal(read_latent(root / "latents" / "box_0000.pt"), kept)
    written = {p.name: p.stat().st_mtime_ns for p in (root / "latents").iterdir()}
    assert sorted(written) == [
        f"{i}.pt" for i in ["box_0000", "box_0001", "sphere_0000", "sphere_0001"]
    ]
    latent = read_latent(root / "latents" / "sphere_0000.pt")
    assert latent.shape == LATENT and latent.abs().max() < 1
    again = encode_folder(root, encoder, num_points=256)
    assert again.encoded == [] and len(again.kept) == 4
    assert {p.name: p.stat().st_mtime_ns for p in (root / "latents").iterdir()} == written

    # the objaverse datamodule reads them back
    data = ObjaverseDataModule(
        root,
        load=["points", "latent"],
        num_points=64,
        batch_size=4,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["latent"].shape == (4, *LATENT)

    # --overwrite replaces, in another format, leaving one latent per object
    redo = encode_folder(root, encoder, overwrite=True, fmt="npy", num_points=256)
    assert len(redo.encoded) == 4
    assert sorted(p.suffix for p in (root / "latents").iterdir()) == [".npy"] * 4
    # points drawn seeded by the object id: a rerun gives the same latent
    torch.testing.assert_close(read_latent(root / "latents" / "sphere_0000.npy"), latent)

    # an existing latent of another shape is an error naming it
    torch.save(torch.zeros(1024, 1024), root / "latents" / "extra.pt")
    np.save(root / "points" / "extra.npy", np.random.default_rng(0).random((50, 3)))
    (root / "latents" / "sphere_0000.npy").unlink()
    with pytest.raises(LatentShapeError, match=r"extra\.pt: latent shape \(1024, 1024\)"):
        encode_folder(root, encoder, num_points=256)


def test_encode_cli_errors_and_run(objects, tmp_path, capsys, monkeypatch) -> None:
    from tests.conftest import REPO_ROOT

    monkeypatch.setenv("GENLAB_CONFIG_DIR", str(REPO_ROOT / "conf"))
    assert main([str(tmp_path / "missing"), "--model", "shape_e_encoder_tiny"]) == 1
    assert f"root={tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    root = tmp_path / "objects"
    shutil.copytree(objects, root)
    (root / "points" / "box_0001.npy").write_bytes(b"garbage")
    code = main([f"root={root}", "--model", "shape_e_encoder_tiny", "--num-points", "128"])
    err = capsys.readouterr().err
    assert code == 1 and "box_0001.npy" in err
    (root / "points" / "box_0001.npy").unlink()
    code = main(
        [
            str(root),
            "--model",
            "shape_e_encoder_tiny",
            "--num-points",
            "128",
            "model.encoder.width=32",
            "model.encoder.heads=2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "3 objects: 3 encoded, 0 already had a latent" in out
    assert read_latent(root / "latents" / "box_0000.pt").shape == LATENT


def test_train_py_tiny_encoder(objects, tmp_path) -> None:
    from genlab.cli import train
    from tests.helpers import compose_config

    cfg = compose_config(
        "train",
        [
            "model=shape_e_encoder_tiny",
            "data=synthetic_objaverse",
            f"data.root={objects}",
            "data.num_points=256",
            "data.batch_size=2",
            "data.val_fraction=0.25",
            "data.test_fraction=0.0",
            "model.num_queries=256",
            "model.pool_size=1024",
            "model.sample_grid_size=24",
            "model.encoder.max_points=128",
            "trainer.max_epochs=2",
            "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1",
            "logger=csv",
            "test=false",
            "callbacks.samples.every_n_epochs=0",
            "extras.print_config=false",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert np.isfinite(metrics["val/loss"]) and 0 <= metrics["val/occupancy_iou"] <= 1
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # the run's weights load into a fresh encoder, and reconstructions were written
    encoder = load_encoder_checkpoint(ShapEEncoder(LATENT, 64, 4, 2), run / "model.safetensors")
    assert encoder.latent_shape == LATENT
    meshes = list((run / "samples").rglob("*.obj"))
    assert meshes, sorted(p.name for p in (run / "samples").rglob("*"))
    assert json.loads((run / "metrics.json").read_text())["val/loss"] == pytest.approx(
        metrics["val/loss"]
    )

    # inference: python inference.py model=shape_e_encoder_tiny ckpt_path=... points=[...]
    from genlab.cli import inference

    clouds = sorted((objects / "points").iterdir())[:2]
    infer = compose_config(
        "inference",
        [
            "model=shape_e_encoder_tiny",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            f"points=[{clouds[0]},{clouds[1]}]",
            "task.num_points=256",
            "extras.print_config=false",
        ],
        tmp_path / "infer",
    )
    written = inference(infer)
    out = tmp_path / "infer" / "run" / "samples"
    latents = sorted(out.glob("*.latent.pt"))
    assert [p.name for p in latents] == [f"{c.stem}_00.latent.pt" for c in clouds]
    assert read_latent(latents[0]).shape == LATENT
    assert (out / "grid.png") in written
    assert list(out.glob("*.obj")), "no reconstruction had a surface"
    for obj in out.glob("*.obj"):  # every format of a reconstruction holds the same mesh
        import trimesh

        counts = {
            len(trimesh.load(obj.with_suffix(f".{fmt}"), force="mesh", process=False).vertices)
            for fmt in ("obj", "ply", "glb")
        }
        assert len(counts) == 1


def test_encoder_configs_fit_their_renderers(tmp_path: Path) -> None:
    import inspect

    from diffusers.pipelines.shap_e import ShapERenderer
    from hydra.utils import instantiate

    from genlab.models.shape_e.components import renderer_latent_shape
    from tests.helpers import compose_config

    tiny = compose_config("train", ["model=shape_e_encoder_tiny"], tmp_path / "tiny").model
    assert tiny.renderer._target_.endswith("tiny_renderer") and tiny.train_renderer is False
    encoder = instantiate(tiny.encoder)
    assert encoder.latent_shape == renderer_latent_shape(instantiate(tiny.renderer)) == LATENT
    # the released renderer's config is diffusers' default: latents (1024, 1024)
    full = compose_config("train", ["model=shape_e_encoder"], tmp_path / "full").model
    assert full.renderer.pretrained == "openai/shap-e"
    released = inspect.signature(ShapERenderer.__init__).parameters
    vectors = sum(v for v, _ in released["param_shapes"].default)
    latent = (vectors, released["d_latent"].default)
    assert tuple(full.encoder.latent_shape) == latent == (1024, 1024)
