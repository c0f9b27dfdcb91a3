"""Objaverse/Shap-E layout data: metadata.json, validation report, batches, splits, config."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from genlab.data.captions import CaptionError, read_metadata_json
from genlab.data.images import read_image, resize_to
from genlab.data.objaverse import ObjaverseDataModule, read_latent
from genlab.data.synthetic_export import export_objaverse_layout
from genlab.data.validation import DataValidationError
from tests.conftest import shared_path
from tests.helpers import compose_config

SPHERES = ["sphere_0000", "sphere_0001", "sphere_0002"]
TORI = ["torus_0000", "torus_0001", "torus_0002"]
IDS = sorted(SPHERES + TORI)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_objaverse_layout(
        tmp_path_factory.mktemp("export") / "synthetic",
        classes=("sphere", "torus"),
        num_per_class=3,
        num_views=2,
        image_size=32,
        num_points=256,
    )


@pytest.fixture
def root(exported: Path, tmp_path: Path) -> Path:
    """A fresh copy of the exported layout, free to break."""
    return Path(shutil.copytree(exported, tmp_path / "data"))


def module(root: Path, tmp_path: Path, **overrides: object) -> ObjaverseDataModule:
    args: dict = dict(
        num_points=128,
        image_size=16,
        batch_size=2,
        val_fraction=0.2,
        test_fraction=0.2,
        split_file=tmp_path / "run" / "data_split.json",
        cache_dir=tmp_path / "cache",
    )
    return ObjaverseDataModule(root, **{**args, **overrides})


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def lines(dm: ObjaverseDataModule) -> list[str]:
    assert dm.report is not None
    return [str(p) for p in dm.report.problems]


# ------------------------------------------------------------------------- metadata.json


def test_metadata_json_both_forms(tmp_path: Path) -> None:
    records = {
        "generator": {"seed": 0},
        "images": [
            {"file_name": "images/a/000.png", "object_id": "a", "view": "000"},
            {"file_name": "images/b/x.png", "object_id": "b"},
        ],
    }
    expected = {"images/a/000.png": "a", "images/b/x.png": "b"}
    assert read_metadata_json(write_json(tmp_path / "m1.json", records)) == expected
    assert read_metadata_json(write_json(tmp_path / "m2.json", expected)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"images": [', r"m.json:1: invalid JSON: Expecting value \(column 13\)"),
        ("[]", "m.json: expected a JSON object, got an array"),
        ('{"images": [{"object_id": "a"}]}', "m.json: images\\[0\\]: missing 'file_name'"),
        (
            '{"images": [{"file_name": "a.png", "object_id": "a"}, {"file_name": "b.png"}]}',
            "m.json: images\\[1\\]: missing 'object_id'",
        ),
        (
            '{"images": [{"file_name": "a.png", "object_id": 7}]}',
            "m.json: images\\[0\\]: 'object_id' must be a string, got a number",
        ),
        (
            '{"images": [{"file_name": "a.png", "object_id": "a"}, '
            '{"file_name": "a.png", "object_id": "b"}]}',
            "m.json: images\\[1\\]: duplicate file name 'a.png'",
        ),
        ('{"images": ["a.png"]}', "m.json: images\\[0\\]: expected a JSON object, got a string"),
        (
            '{"a.png": "a", "b.png": null}',
            "m.json: entry 'b.png': object id must be a string, got null",
        ),
        ('{"a.png": "a", "a.png": "b"}', "m.json: duplicate file name 'a.png'"),
        (
            '{"images": [{"file_name": "a.png", "object_id": ""}]}',
            "m.json: images\\[0\\]: empty object id",
        ),
        ('{"a.png": " "}', "m.json: entry 'a.png': empty object id"),
    ],
)
def test_metadata_json_errors_name_the_file_and_entry(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "m.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CaptionError, match=f"^{re.escape(str(tmp_path))}/{message}$"):
        read_metadata_json(path)


# ------------------------------------------------------------------------- a clean layout


def test_clean_layout_report_and_batches(root: Path, tmp_path: Path) -> None:
    dm = module(root, tmp_path, load=["points", "image"], background=[0, 0, 255])
    dm.setup("fit")
    assert dm.report is not None and dm.report.ok, dm.report.summary()
    assert dm.report.counts == {
        "objects": 6,
        "images": 12,
        "point clouds": 6,
        "captions": 6,
        "latents": 0,
    }
    assert dm.report.splits == {"train": 4, "val": 1, "test": 1}
    assert [p.path for p in dm.skipped] == []

    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"object_id", "caption", "points", "point_colors", "image"}
    captions = dict(
        line.split(",", 1) for line in (root / "captions.csv").read_text().split("\n")[1:-1]
    )
    assert batch["caption"] == [captions[i] for i in batch["object_id"]]
    assert batch["points"].shape == batch["point_colors"].shape == (2, 128, 3)
    assert batch["points"].dtype == batch["point_colors"].dtype == torch.float32
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.float32
    for b, object_id in enumerate(batch["object_id"]):
        stored = np.load(root / "points" / f"{object_id}.npy")
        # resampled from the file: every point is one of the file's, with its colour
        rows = {tuple(r) for r in stored.tolist()}
        together = torch.cat([batch["points"][b], batch["point_colors"][b]], 1).tolist()
        assert all(tuple(r) in rows for r in together)
        # 128 of the 256 points, by farthest-point sampling: no repeats
        assert len({tuple(p) for p in batch["points"][b].tolist()}) == 128
    # composited onto the blue background: the corners are blue
    assert torch.equal(batch["image"][:, :, 0, 0], torch.tensor([[0.0, 0.0, 1.0]] * 2))
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0


def test_views_first_random_and_fixed(root: Path, tmp_path: Path) -> None:
    def expected(object_id: str, view: str) -> torch.Tensor:
        img = resize_to(read_image(root / "images" / object_id / f"{view}.png"), 16)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)

    dm = module(root, tmp_path, load=["image"])
    dm.setup()
    val = dm.dataset("val")[0]
    assert set(val) == {"object_id", "caption", "image"}
    assert torch.equal(val["image"], expected(val["object_id"], "000"))
    train = dm.dataset("train")
    torch.manual_seed(0)
    views = {v: expected(train.objects[0].object_id, v) for v in ("000", "001")}
    seen = set()
    for _ in range(16):
        image = train[0]["image"]
        seen |= {v for v, want in views.items() if torch.equal(image, want)}
    assert seen == {"000", "001"}
    fixed = module(root, tmp_path / "fixed", load=["image"], views="001")
    fixed.setup()
    item = fixed.dataset("train")[0]
    assert torch.equal(item["image"], expected(item["object_id"], "001"))


def test_missing_fixed_view_is_a_problem(root: Path, tmp_path: Path) -> None:
    dm = module(root, tmp_path, load=["image"], views="007")
    dm.validate()
    assert lines(dm) == [f"{root}/images/{i}: no view '007' for object '{i}'" for i in IDS]


def test_point_clouds_without_colours_and_transposed(root: Path, tmp_path: Path) -> None:
    stored = np.load(root / "points" / "sphere_0000.npy")
    np.save(root / "points" / "sphere_0000.npy", stored[:, :3].T.copy())  # (3, N), no colours
    dm = module(
        root, tmp_path, num_points=256, point_sampling="random", val_fraction=0.0, test_fraction=0.0
    )
    dm.setup()
    item = next(it for it in dm.dataset("train") if it["object_id"] == "sphere_0000")
    assert torch.equal(item["point_colors"], torch.full((256, 3), 0.5))
    # all 256 points, each once, in some order
    assert sorted(map(tuple, item["points"].tolist())) == sorted(map(tuple, stored[:, :3].tolist()))


def test_point_cache_lives_outside_the_data(root: Path, tmp_path: Path) -> None:
    dm = module(root, tmp_path)
    dm.setup()
    first = dm.dataset("train")[0]
    cached = sorted((tmp_path / "cache" / "points").glob("*.npy"))
    assert len(cached) == 1 and cached[0].name.startswith(first["object_id"] + "-")
    assert np.array_equal(np.load(cached[0])[:, :3], first["points"].numpy())
    assert torch.equal(dm.dataset("train")[0]["points"], first["points"])
    with pytest.raises(ValueError, match="is inside the data folder"):
        module(root, tmp_path, cache_dir=root / "cache")


# ------------------------------------------------------------------------- broken files


def break_layout(root: Path, shared_testdata: Path) -> None:
    """Truncated PNG, NaN npy, (3, N) npy, object without points, no caption, duplicate ids."""
    (root / "metadata.json").unlink()  # image links from the folders
    png = root / "images" / "torus_0000" / "001.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    cloud = np.load(root / "points" / "sphere_0000.npy")
    cloud[7, 1] = np.nan
    np.save(root / "points" / "sphere_0000.npy", cloud)
    np.save(
        root / "points" / "torus_0001.npy", np.load(root / "points" / "torus_0001.npy").T.copy()
    )
    image = root / "images" / "sphere_0002" / "000.png"
    for name in ("ghost", "bunny", "tree"):
        (root / "images" / name).mkdir()
        shutil.copy(image, root / "images" / name / "000.png")
    shutil.copy(shared_path(shared_testdata, "point_cloud_utils", "bunny.ply"), root / "points")
    shutil.copy(shared_path(shared_testdata, "point_cloud_utils", "tree.ply"), root / "points")
    np.save(root / "points" / "tree.npy", np.zeros((10, 3), np.float32))
    rows = (root / "captions.csv").read_text().splitlines()
    rows = [r for r in rows if not r.startswith("sphere_0001,")]
    rows += ["ghost,a ghost", "bunny,a bunny", "tree,a tree", "nobody,nothing at all"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")


def expected_lines(root: Path) -> list[str]:
    return [
        f"{root}/points/tree.npy: duplicate object id 'tree' (also points/tree.ply)",
        f"{root}/captions.csv: caption for unknown object 'nobody'",
        f"{root}/points: no point cloud for object 'ghost'",
        f"{root}/captions.csv: no caption for object 'sphere_0001'",
        f"{root}/points/sphere_0000.npy: 1 of 256 points have non-finite coordinates (NaN or inf)",
        f"{root}/images/torus_0000/001.png: truncated or corrupt image: ",
    ]


def test_broken_files_report(root: Path, tmp_path: Path, shared_testdata: Path) -> None:
    break_layout(root, shared_testdata)
    dm = module(root, tmp_path, load=["points", "image"])
    report = dm.validate()
    got = lines(dm)
    assert got[:-1] == expected_lines(root)[:-1]
    assert got[-1].startswith(expected_lines(root)[-1])
    assert report.counts == {
        "objects": 9,
        "images": 15,
        "point clouds": 9,
        "captions": 9,
        "latents": 0,
    }
    assert [p.path for p in dm.skipped] == [
        "ghost",
        "sphere_0000",
        "sphere_0001",
        "torus_0000",
        "tree",
    ]
    with pytest.raises(DataValidationError) as info:
        dm.setup()
    message = str(info.value)
    assert "6 problem(s):" in message and all(line in message for line in got)
    assert "data.on_bad_file=skip" in message
    assert not (tmp_path / "run" / "data_split.json").exists()


def test_broken_files_skipped(root: Path, tmp_path: Path, shared_testdata: Path) -> None:
    break_layout(root, shared_testdata)
    dm = module(
        root,
        tmp_path,
        load=["points", "image"],
        on_bad_file="skip",
        val_fraction=0.0,
        test_fraction=0.0,
    )
    dm.setup()
    assert [p.path for p in dm.skipped] == [
        "ghost",
        "sphere_0000",
        "sphere_0001",
        "torus_0000",
        "tree",
    ]
    items = {it["object_id"]: it for it in dm.dataset("train")}
    assert sorted(items) == ["bunny", "sphere_0002", "torus_0001", "torus_0002"]
    # the (3, N) file is read transposed; the bunny PLY has no colours
    stored = np.load(root / "points" / "torus_0001.npy").T
    rows = {tuple(r) for r in stored[:, :3].tolist()}
    assert all(tuple(p) in rows for p in items["torus_0001"]["points"].tolist())
    assert torch.equal(items["bunny"]["point_colors"], torch.full((128, 3), 0.5))
    assert items["bunny"]["caption"] == "a bunny"


def test_text_mode_without_captions_file(root: Path, tmp_path: Path) -> None:
    (root / "captions.csv").unlink()
    dm = module(root, tmp_path, on_bad_file="skip")
    dm.validate()
    assert lines(dm) == [f"{root}/captions.csv: file not found"]
    assert [p.path for p in dm.skipped] == IDS
    with pytest.raises(ValueError, match="no usable objects"):
        dm.setup()


# ------------------------------------------------------------------------- image mode


def test_image_mode_links_from_metadata(root: Path, tmp_path: Path) -> None:
    (root / "captions.csv").unlink()  # optional in image mode
    shutil.rmtree(root / "images" / "torus_0002")  # its images are only named in metadata.json
    dm = module(root, tmp_path, mode="image", load=[], on_bad_file="skip")
    dm.setup()
    assert lines(dm) == [
        f"{root}/metadata.json: image 'images/torus_0002/000.png' of object 'torus_0002' not found",
        f"{root}/metadata.json: image 'images/torus_0002/001.png' of object 'torus_0002' not found",
        f"{root}/images/torus_0002: no images for object 'torus_0002'",
    ]
    assert [p.path for p in dm.skipped] == ["torus_0002"]
    item = dm.dataset("train")[0]
    assert set(item) == {"object_id", "caption", "image"} and item["caption"] == ""
    assert dm.sample_prompts == []


def test_image_mode_plain_mapping_and_broken_metadata(root: Path, tmp_path: Path) -> None:
    # the plain mapping, with the images under other names than the folders suggest
    shutil.move(root / "images" / "sphere_0000" / "001.png", root / "images" / "extra.png")
    links = {f"images/{i}/000.png": i for i in IDS} | {"images/extra.png": "sphere_0000"}
    write_json(root / "metadata.json", links)
    dm = module(root, tmp_path, mode="image")
    dm.setup()
    assert dm.report is not None and dm.report.ok and dm.report.counts["images"] == 7
    sphere = next(o for o in dm.objects if o.object_id == "sphere_0000")
    assert sphere.images == {
        "000": root / "images/sphere_0000/000.png",
        "extra": root / "images/extra.png",
    }
    (root / "metadata.json").write_text("{not json", encoding="utf-8")
    broken = module(root, tmp_path / "b", mode="image")
    broken.validate()
    assert lines(broken)[0] == (
        f"{root}/metadata.json:1: invalid JSON: Expecting property name enclosed in double "
        "quotes (column 2)"
    )
    assert lines(broken)[1:] == [f"{root}/images/{i}: no images for object '{i}'" for i in IDS]


# ------------------------------------------------------------------------- latents


def test_latents(root: Path, tmp_path: Path) -> None:
    (root / "latents").mkdir()
    for n, object_id in enumerate(IDS):
        value = torch.full((4, 8), float(n))
        if object_id == "torus_0002":
            np.save(root / "latents" / f"{object_id}.npy", value.numpy())
        elif object_id != "sphere_0001":
            torch.save(value, root / "latents" / f"{object_id}.pt")
    torch.save(torch.zeros(3), root / "latents" / "sphere_0002.pt")
    dm = module(
        root, tmp_path, load=["latent"], on_bad_file="skip", val_fraction=0.0, test_fraction=0.0
    )
    dm.setup()
    assert lines(dm) == [
        f"{root}/latents: no latent for object 'sphere_0001'",
        f"{root}/latents/sphere_0002.pt: latent shape (3,) differs from the others' (4, 8)",
    ]
    assert dm.report is not None and dm.report.counts["latents"] == 5
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("train"), batch_size=4)))
    assert batch["latent"].shape == (4, 4, 8) and set(batch) == {"object_id", "caption", "latent"}
    for object_id, latent in zip(batch["object_id"], batch["latent"], strict=True):
        assert torch.equal(latent, torch.full((4, 8), float(IDS.index(object_id))))
    # no latents/ folder: no latent key
    shutil.rmtree(root / "latents")
    plain = module(root, tmp_path / "p", load=["latent", "points"])
    plain.setup()
    assert "latent" not in plain.dataset("train")[0]


def test_read_latent_errors(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(2)}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"d.pt: expected one tensor, got dict"):
        read_latent(tmp_path / "d.pt")
    np.save(tmp_path / "n.npy", np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match=r"n.npy: non-finite values \(NaN or inf\)"):
        read_latent(tmp_path / "n.npy")


# ------------------------------------------------------------------------- splits, state, config


def test_split_file_is_written_and_reused(root: Path, tmp_path: Path) -> None:
    dm = module(root, tmp_path)
    dm.setup()
    path = tmp_path / "run" / "data_split.json"
    saved = json.loads(path.read_text())
    assert {k: saved[k] for k in ("train", "val", "test")} == {
        k: [o.object_id for o in v] for k, v in dm.splits.items()
    }
    assert sorted(saved["train"] + saved["val"] + saved["test"]) == IDS
    assert dm.sample_prompts == [dm.splits["val"][0].caption]
    # another seed, same file: the saved split wins; an object gone is dropped
    (root / "points" / saved["val"][0]).with_suffix(".npy").unlink()
    other = module(root, tmp_path, split_seed=123, on_bad_file="skip")
    other.setup()
    assert [o.object_id for o in other.splits["train"]] == saved["train"]
    assert other.splits["val"] == [] and json.loads(path.read_text()) == saved


def test_train_order_resumes_from_state_dict(root: Path, tmp_path: Path) -> None:
    def order(dm: ObjaverseDataModule) -> list[str]:
        return [i for batch in dm.train_dataloader() for i in batch["object_id"]]

    dm = module(root, tmp_path)
    dm.setup()
    order(dm)
    state = dm.state_dict()
    expected = order(dm)
    resumed = module(root, tmp_path)
    resumed.setup()
    resumed.load_state_dict(state)
    assert order(resumed) == expected


def test_config_instantiates(root: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        ["data=objaverse", f"data.root={root}", "data.num_points=64", "data.batch_size=3"],
        tmp_path,
    )
    dm = instantiate(cfg.data)
    assert isinstance(dm, ObjaverseDataModule)
    assert dm.cache_dir == tmp_path / "cache" / "objaverse"
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["points"].shape == (3, 64, 3)
    assert (tmp_path / "run" / "data_split.json").is_file()
    synthetic = compose_config("train", ["data=synthetic_objaverse"], tmp_path)
    assert synthetic.data.root == str(tmp_path / "data" / "synthetic_objaverse")
    assert synthetic.data.num_points == 16384 and synthetic.data.mode == "text"


def test_setup_reuses_an_earlier_validation(root: Path, tmp_path: Path) -> None:
    dm = module(root, tmp_path)
    calls = []
    validate = dm.validate
    dm.validate = lambda: calls.append(1) or validate()  # type: ignore[method-assign]
    report = dm.validate()
    dm.setup()
    assert calls == [1] and dm.report is report and len(dm.splits["train"]) == 4
