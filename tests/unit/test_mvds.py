"""Multi-view dataset and datamodule on tiny rendered objects (32 px spheres and boxes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from genlab.data.cameras import (
    CameraReadError,
    camera_embeddings,
    look_at_camera,
    read_camera_json,
    write_camera_json,
)
from genlab.data.images import ImageReadError
from genlab.data.mvds import (
    CLIP_MEAN,
    CLIP_STD,
    ITEM_KEYS,
    MultiViewDataModule,
    MultiViewDataset,
    MultiViewReadError,
    scan_object,
)
from genlab.geometry.rasterize import render_view

CONF = Path(__file__).resolve().parents[2] / "conf" / "data" / "mvds.yaml"
SIZE = 32


def add_object(root: Path, object_id: str, mesh: trimesh.Trimesh, num_views: int = 6) -> None:
    """Write ``num_views`` RGBA renders, normal maps and cameras of ``mesh`` (views v0, v1...)."""
    for v in range(num_views):
        camera = look_at_camera(20 + 5 * (v % 3), 360 * v / num_views, 3.0, width=SIZE, height=SIZE)
        view = render_view(mesh, camera)
        for folder, pixels in (("images", view.rgba()), ("normals", view.normal_rgba())):
            (root / folder / object_id).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / folder / object_id / f"v{v}.png")
        write_camera_json(camera, root / "cameras" / object_id / f"v{v}.json")


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvds")
    add_object(root, "ball", trimesh.creation.icosphere(subdivisions=2, radius=0.8))
    add_object(root, "brick", trimesh.creation.box(extents=(1.2, 0.8, 0.6)))
    add_object(root, "pebble", trimesh.creation.icosphere(subdivisions=1, radius=0.6), num_views=12)
    return root


@pytest.fixture
def root(dataset_root: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(dataset_root, tmp_path / "data"))


def module(root: Path, **kwargs) -> MultiViewDataModule:
    options = dict(image_size=SIZE, clip_size=24, val_fraction=0.34, split_seed=5, batch_size=2)
    options.update(kwargs)
    dm = MultiViewDataModule(root, **options)
    dm.setup()
    return dm


def test_item_keys_shapes_and_ranges(dataset_root: Path) -> None:
    dm = module(dataset_root, background="black")
    assert dm.splits == {"train": ["ball", "pebble"], "val": ["brick"]}
    item = dm.val_dataset[0]
    assert tuple(item) == ITEM_KEYS
    for key in ITEM_KEYS:
        assert item[key].dtype == torch.float32, key
    for key in ("image_cond", "image_target", "normal_target"):
        assert item[key].shape == (6, 3, SIZE, SIZE)
        assert item[key].min() >= 0.0 and item[key].max() <= 1.0
        vae = item[key.replace("_cond", "_cond_vae").replace("_target", "_target_vae")]
        torch.testing.assert_close(vae, item[key] * 2 - 1)
        assert vae.min() >= -1.0 and vae.max() <= 1.0
    assert item["image_cond_CLIP"].shape == (6, 3, 24, 24)
    assert item["camera_embed_image"].shape == item["camera_embed_normal"].shape == (6, 10)
    # the conditioning view repeated, and (val) it is the first view: the first target
    assert (item["image_cond"] == item["image_cond"][:1]).all()
    torch.testing.assert_close(item["image_cond"][0], item["image_target"][0])
    # CLIP input: the conditioning image resized and normalised
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    clip = item["image_cond_CLIP"][0] * std + mean
    assert clip.min() >= -1e-5 and clip.max() <= 1 + 1e-5
    assert clip.mean() == pytest.approx(item["image_cond"][0].mean().item(), abs=0.02)


def test_pixels_are_the_renders_on_the_background(dataset_root: Path) -> None:
    dm = module(dataset_root, background="gray")
    item = dm.val_dataset[0]  # brick, views v0..v5
    for k in range(6):
        rgba = np.asarray(Image.open(dataset_root / "images" / "brick" / f"v{k}.png"))
        normal = np.asarray(Image.open(dataset_root / "normals" / "brick" / f"v{k}.png"))
        mask = rgba[..., 3] == 255
        image = (item["image_target"][k].permute(1, 2, 0).numpy() * 255).round()
        np.testing.assert_array_equal(image[mask], rgba[mask][:, :3])
        np.testing.assert_array_equal(image[~mask], np.full(((~mask).sum(), 3), 128))
        normals = (item["normal_target"][k].permute(1, 2, 0).numpy() * 255).round()
        np.testing.assert_array_equal(normals[mask], normal[mask][:, :3])
        np.testing.assert_array_equal(normals[~mask], np.full(((~mask).sum(), 3), 128))


def test_camera_embeddings_match(dataset_root: Path) -> None:
    dm = module(dataset_root, cond_view="v2")
    brick = [read_camera_json(dataset_root / "cameras" / "brick" / f"v{k}.json") for k in range(6)]
    item = dm.val_dataset[0]
    for task in ("image", "normal"):
        expected = camera_embeddings(brick[2], brick, task)
        np.testing.assert_array_equal(item[f"camera_embed_{task}"].numpy(), expected)
    torch.testing.assert_close(item["image_cond"][0], item["image_target"][2])
    # 12 views, 6 targets: every other view (val: no offset); views sort naturally (v10 > v9)
    pebble = [
        read_camera_json(dataset_root / "cameras" / "pebble" / f"v{k}.json") for k in range(12)
    ]
    dataset = MultiViewDataset(
        [obj for obj in dm.train_dataset.objects if obj.object_id == "pebble"],
        image_size=SIZE,
        clip_size=24,
    )
    assert dataset.objects[0].views[-3:] == ("v9", "v10", "v11")
    got = dataset[0]["camera_embed_image"].numpy()
    np.testing.assert_array_equal(got, camera_embeddings(pebble[0], pebble[0::2], "image"))


def test_training_randomness_and_val_determinism(dataset_root: Path) -> None:
    dm = module(dataset_root, background="random")
    val = [dm.val_dataset[0] for _ in range(2)]
    for key in ITEM_KEYS:
        torch.testing.assert_close(val[0][key], val[1][key])
    assert (val[0]["image_target"][:, :, 0, 0] == 1.0).all()  # "random" is white in val
    torch.manual_seed(0)
    corners = {tuple(dm.train_dataset[0]["image_target"][0, :, 0, 0].tolist()) for _ in range(6)}
    assert len(corners) == 6  # a new background colour per item
    torch.manual_seed(0)
    again = {tuple(dm.train_dataset[0]["image_target"][0, :, 0, 0].tolist()) for _ in range(6)}
    assert again == corners
    conds = {
        int(torch.nonzero((it["image_cond"][0] == it["image_target"]).flatten(1).all(1))[0])
        for it in (dm.train_dataset[0] for _ in range(20))
        if (it["image_cond"][0] == it["image_target"]).flatten(1).all(1).any()
    }
    assert len(conds) > 1  # the conditioning view changes in training


def test_dataloader_batches(dataset_root: Path) -> None:
    dm = module(dataset_root)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == set(ITEM_KEYS)
    assert batch["image_target"].shape == (2, 6, 3, SIZE, SIZE)
    assert batch["image_cond_CLIP"].shape == (2, 6, 3, 24, 24)
    assert batch["camera_embed_normal"].shape == (2, 6, 10)
    assert len(list(dm.val_dataloader())) == 1


def test_config_file(dataset_root: Path) -> None:
    cfg = OmegaConf.load(CONF)
    assert cfg.num_views == 6 and cfg.image_size == 256 and cfg.clip_size == 224
    dm = instantiate(cfg, root=str(dataset_root), image_size=SIZE, clip_size=24)
    assert isinstance(dm, MultiViewDataModule)
    assert (dm.cond_view, dm.background, dm.on_bad_file) == ("random", "white", "error")


def test_split_is_deterministic_and_seeded(dataset_root: Path) -> None:
    a = MultiViewDataModule(dataset_root, val_fraction=0.34, split_seed=5)
    b = MultiViewDataModule(dataset_root, val_fraction=0.34, split_seed=5)
    ids = [f"obj{i}" for i in range(50)]
    assert a.split_ids(ids) == b.split_ids(ids)
    assert len(a.split_ids(ids)["val"]) == 17
    other = MultiViewDataModule(dataset_root, val_fraction=0.34, split_seed=6).split_ids(ids)
    assert other != a.split_ids(ids)


def test_mask_files_override_alpha(root: Path) -> None:
    image_path = root / "images" / "brick" / "v0.png"
    rgba = np.asarray(Image.open(image_path))
    Image.fromarray(rgba[..., :3]).save(image_path)  # RGB: no alpha left
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 8:24] = 255
    (root / "masks" / "brick").mkdir(parents=True)
    Image.fromarray(mask).save(root / "masks" / "brick" / "v0.png")
    item = module(root, background="black").val_dataset[0]
    image = item["image_target"][0].permute(1, 2, 0).numpy()
    assert (image[mask == 0] == 0).all()
    np.testing.assert_array_equal(
        (image[mask == 255] * 255).round(), rgba[8:24, 8:24, :3].reshape(-1, 3)
    )
    # view v1 has no mask file: its alpha is used
    assert (item["image_target"][1][:, 0, 0] == 0).all()


# ------------------------------------------------------------------------------ bad data


def test_empty_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"images: no object folders"):
        module(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        module(tmp_path / "missing")


def bad(root: Path, kind: str) -> tuple[type[Exception], str]:
    """Damage object 'ball'; return the error type and message expected from it."""
    images, normals, cameras = (root / f / "ball" for f in ("images", "normals", "cameras"))
    if kind == "missing_normal":
        (normals / "v3.png").unlink()
        return MultiViewReadError, f"{normals}/v3.png: no normal map for view 'v3'"
    if kind == "missing_camera":
        (cameras / "v4.json").unlink()
        return MultiViewReadError, f"{cameras}/v4.json: no camera for view 'v4'"
    if kind == "extra_normal":
        shutil.copy(normals / "v0.png", normals / "v9.png")
        return MultiViewReadError, (
            f"{normals}/v9.png: normal map has no image (no view 'v9' in {images})"
        )
    if kind == "two_images":
        shutil.copy(images / "v1.png", images / "v1.jpg")
        return MultiViewReadError, f"{images}/v1.png: two image files for view 'v1' (also v1.jpg)"
    if kind == "too_few_views":
        for f in ("images", "normals"):
            (root / f / "ball" / "v5.png").unlink()
        (cameras / "v5.json").unlink()
        return MultiViewReadError, f"{images}: object 'ball' has 5 views, fewer than num_views=6"
    if kind == "not_an_image":
        (images / "v2.png").write_bytes(b"this is not a png")
        return ImageReadError, (
            f"{images}/v2.png: not a recognised image format (or a corrupt image header)"
        )
    if kind == "empty_image":
        (normals / "v2.png").write_bytes(b"")
        return ImageReadError, f"{normals}/v2.png: empty file (0 bytes)"
    if kind == "bad_camera":
        (cameras / "v1.json").write_text('{"fx": 1}')
        return CameraReadError, f"{cameras}/v1.json: missing key 'fy' (give all of fx, fy, cx, cy)"
    raise AssertionError(kind)


BAD_KINDS = [
    "missing_normal",
    "missing_camera",
    "extra_normal",
    "two_images",
    "too_few_views",
    "not_an_image",
    "empty_image",
    "bad_camera",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_object_is_an_error(root: Path, kind: str) -> None:
    error, message = bad(root, kind)
    with pytest.raises(error) as info:
        module(root)
    assert str(info.value) == message


@pytest.mark.parametrize("kind", ["missing_normal", "not_an_image", "bad_camera"])
def test_bad_object_is_skipped(root: Path, kind: str) -> None:
    _, message = bad(root, kind)
    dm = module(root, on_bad_file="skip")
    assert [(p.path, p.reason) for p in dm.skipped] == [("ball", message)]
    assert dm.splits == {"train": ["pebble"], "val": ["brick"]}  # the split of all three
    assert [o.object_id for o in dm.train_dataset.objects] == ["pebble"]


def test_missing_cond_view(root: Path) -> None:
    with pytest.raises(MultiViewReadError) as info:
        scan_object(root, "ball", num_views=6, cond_view="front")
    assert str(info.value) == f"{root}/images/ball: object 'ball' has no view 'front'"


def test_truncated_image_found_on_load_and_by_validate(root: Path) -> None:
    path = root / "images" / "pebble" / "v3.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = MultiViewDataModule(root, val_fraction=0.34, split_seed=5).validate()
    assert report.counts == {"objects": 3, "views": 24}
    assert [p.path for p in report.problems] == [str(path)]
    assert report.problems[0].reason.startswith("truncated or corrupt image")
    assert report.splits == {"train": 1, "val": 1}
    # setup only reads headers: the object is kept, loading it fails or is replaced
    dm = module(root, cond_view="v3")
    pebble = dm.train_dataset.objects.index(
        next(o for o in dm.train_dataset.objects if o.object_id == "pebble")
    )
    with pytest.raises(ImageReadError, match="truncated or corrupt image"):
        dm.train_dataset[pebble]
    dm = module(root, cond_view="v3", on_bad_file="skip")
    item = dm.train_dataset[pebble]  # the next object instead
    assert list(dm.train_dataset.skipped) == ["pebble"]
    assert item["image_target"].shape == (6, 3, SIZE, SIZE)


def test_validate_reports_structure_problems(root: Path) -> None:
    bad(root, "missing_camera")
    report = MultiViewDataModule(root, val_fraction=0.34).validate()
    assert [str(p) for p in report.problems] == [
        f"{root}/cameras/ball/v4.json: no camera for view 'v4'"
    ]
    assert report.counts == {"objects": 3, "views": 18}


def test_bad_options(dataset_root: Path) -> None:
    with pytest.raises(ValueError, match="background must be one of"):
        MultiViewDataModule(dataset_root, background="pink")
    with pytest.raises(ValueError, match="on_bad_file must be one of"):
        MultiViewDataModule(dataset_root, on_bad_file="ignore")
    with pytest.raises(ValueError, match="num_views must be a positive integer, got 0"):
        MultiViewDataModule(dataset_root, num_views=0)
