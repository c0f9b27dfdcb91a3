"""DreamBooth data: batches, prompts, split file, bad files, cache, class images, resume, config."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from genlab.data import dreambooth
from genlab.data.dreambooth import DreamBoothDataModule, split_names
from genlab.data.images import ImageReadError, read_image, register_heif
from genlab.data.validation import DataValidationError, Problem
from tests.conftest import shared_path
from tests.helpers import compose_config

BACKPACK = [f"{i:02d}.jpg" for i in range(6)]
HEIFS = ["heif_RGB_8__29x100.heif", "heif_LA_8__29x100.heif", "heif_other_L_exif_xmp_iptc.heic"]
BROKEN = [
    "heif_corrupted_corrupted.heic",
    "heif_truncated_truncated.heic",
    "heif_corrupted_empty.heic",
]
KEYS = {"pixel_values", "prompt", "image_id", "original_size", "crop_top_left"}
CLASS_KEYS = {"class_pixel_values", "class_prompt", "class_original_size", "class_crop_top_left"}
RED, BLUE = (255, 0, 0), (0, 0, 255)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def photos(shared_testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 photos: 6 backpack JPEGs, 3 HEIF/HEIC files and a HEIC with EXIF orientation 6."""
    backpack = shared_path(shared_testdata, "dreambooth_backpack")
    heif_dir = shared_path(shared_testdata, "pillow_heif")
    folder = tmp_path_factory.mktemp("photos")
    for name in BACKPACK:
        shutil.copy(backpack / name, folder / name)
    for name in HEIFS:
        shutil.copy(heif_dir / name, folder / name)
    # stored 80 wide x 40 high, red left half, blue right half; orientation 6 turns it
    # clockwise to 40 x 80 with red on top
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40], stored[:, 40:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    register_heif()
    Image.fromarray(stored).save(folder / "rotated.heic", format="HEIF", exif=exif.tobytes())
    return folder


@pytest.fixture
def folder(photos: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(photos, tmp_path / "instance"))


@pytest.fixture(scope="module")
def heif_dir(shared_testdata: Path) -> Path:
    return shared_path(shared_testdata, "pillow_heif")


def make_dm(folder: Path, tmp_path: Path, **kw) -> DreamBoothDataModule:
    options = {
        "cache_dir": tmp_path / "cache",
        "split_file": tmp_path / "run" / "data_split.json",
        "resolution": 32,
        "batch_size": 4,
        "crop": "center",
    }
    return DreamBoothDataModule(folder, **{**options, **kw})


def unbatch(loader) -> list[dict]:
    items = []
    for batch in loader:
        for i in range(len(batch["prompt"])):
            items.append({k: v[i] for k, v in batch.items()})
    return items


def by_id(dm: DreamBoothDataModule) -> dict[str, dict]:
    """Every item of one train epoch and the val split, keyed by image id (one each)."""
    items = unbatch(dm.train_dataloader()) + unbatch(dm.val_dataloader())
    out = {item["image_id"]: item for item in items}
    assert len(out) == len(items)
    return out


def to_u8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) int values 0..255."""
    return ((pixels + 1) * 127.5).round().to(torch.int64).permute(1, 2, 0).numpy()


def solid(path: Path, size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def write_captions(folder: Path, lines: list[str]) -> Path:
    path = folder / "captions.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ batches


def test_batches_have_the_documented_keys_shapes_and_ranges(folder: Path, tmp_path: Path) -> None:
    dm = make_dm(folder, tmp_path, crop="random", random_flip=0.5)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == KEYS
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["prompt"] == ["a photo of sksToy toy"] * 4
    for key in ("original_size", "crop_top_left"):
        assert batch[key].shape == (4, 2) and batch[key].dtype == torch.int64

    items = unbatch(dm.train_dataloader())
    assert sorted(i["image_id"] for i in items) == dm.splits["train"]
    for item in items:
        w, h = read_image(folder / item["image_id"]).size
        assert tuple(item["original_size"].tolist()) == (h, w)
        # crops lie inside the photo resized to shorter side 32
        scale = 32 / min(h, w)
        top, left = item["crop_top_left"].tolist()
        assert 0 <= top <= max(32, round(h * scale)) - 32
        assert 0 <= left <= max(32, round(w * scale)) - 32
    backpack = torch.stack([i["pixel_values"] for i in items if i["image_id"].endswith(".jpg")])
    assert backpack.min() < -0.5 and backpack.max() > 0.5  # real photo contrast, not a constant


def test_crop_and_flip_take_the_pixels_they_report(tmp_path: Path) -> None:
    # 256 x 64: red channel = x, so every pixel tells which column it came from
    folder = tmp_path / "ramp"
    folder.mkdir()
    ramp = np.zeros((64, 256, 3), np.uint8)
    ramp[..., 0] = np.arange(256, dtype=np.uint8)[None, :]
    Image.fromarray(ramp).save(folder / "ramp.png")
    solid(folder / "other.png", (64, 64), (0, 0, 0))

    centre = make_dm(folder, tmp_path, resolution=64, val_fraction=0)
    centre.setup()
    item = by_id(centre)["ramp.png"]
    assert item["crop_top_left"].tolist() == [0, 96]
    assert (to_u8(item["pixel_values"])[..., 0] == np.arange(96, 160)[None, :]).all()

    flipped = make_dm(folder, tmp_path, resolution=64, val_fraction=0, crop="random", random_flip=1)
    flipped.setup()
    lefts = set()
    for _ in range(6):
        item = by_id(flipped)["ramp.png"]
        top, left = item["crop_top_left"].tolist()
        # column j of the output is column left + j of the flipped photo = 255 - left - j
        assert top == 0 and 0 <= left <= 192
        assert (to_u8(item["pixel_values"])[..., 0] == 255 - left - np.arange(64)[None, :]).all()
        lefts.add(left)
    assert len(lefts) > 1


def test_rotated_heic_is_decoded_upright(folder: Path, tmp_path: Path) -> None:
    dm = make_dm(folder, tmp_path)
    dm.setup()
    item = by_id(dm)["rotated.heic"]
    assert item["original_size"].tolist() == [80, 40]  # (h, w): portrait after orientation 6
    assert item["crop_top_left"].tolist() == [16, 0]  # resized to 32 x 64, centre crop
    pixels = to_u8(item["pixel_values"])
    assert np.abs(pixels[:12] - RED).max() <= 12  # top of the upright photo is red
    assert np.abs(pixels[-12:] - BLUE).max() <= 12


def test_alpha_is_composited_onto_the_background(tmp_path: Path) -> None:
    folder = tmp_path / "alpha"
    folder.mkdir()
    solid(folder / "clear.png", (40, 40), (9, 9, 9, 0), mode="RGBA")
    solid(folder / "grey.png", (40, 40), (128, 128, 128))
    for background in [(0, 128, 255), (255, 255, 255)]:
        dm = make_dm(folder, tmp_path, val_fraction=0, background=background, split_file=None)
        dm.setup()
        assert (to_u8(by_id(dm)["clear.png"]["pixel_values"]) == background).all()


# ------------------------------------------------------------------------------------ prompts


def test_captions_fill_the_placeholders(folder: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    lines = [f"{n}\ta {{instance_token}} {{class_word}} number {i}" for i, n in enumerate(names)]
    lines[-1] = "rotated\ta {instance_token} lying on its side"  # a stem works as the key too
    write_captions(folder, lines)
    dm = make_dm(folder, tmp_path, use_captions=True, instance_token="zwx", class_word="plushie")
    dm.setup()
    items = by_id(dm)
    assert items["00.jpg"]["prompt"] == "a zwx plushie number 0"
    assert items[names[5]]["prompt"] == "a zwx plushie number 5"
    assert items["rotated.heic"]["prompt"] == "a zwx lying on its side"
    assert dm.validate().counts == {"images": 10, "captions": 10}


def test_one_caption_per_line_follows_sorted_file_names(folder: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    write_captions(folder, [f"{{instance_token}} view {i}" for i in range(len(names))])
    dm = make_dm(folder, tmp_path, use_captions=True)
    dm.setup()
    assert {k: v["prompt"] for k, v in by_id(dm).items()} == {
        n: f"sksToy view {i}" for i, n in enumerate(names)
    }


def test_missing_and_unknown_captions_are_reported(folder: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.name != "05.jpg")
    captions = write_captions(
        folder, [f"{n}\ta {{instance_token}}" for n in names] + ["ghost.jpg\tboo"]
    )
    dm = make_dm(folder, tmp_path, use_captions=True)
    assert dm.validate().problems == [
        Problem(str(folder / "05.jpg"), "caption missing in captions.txt"),
        Problem(str(captions), "caption for 'ghost.jpg', a file that does not exist"),
    ]
    with pytest.raises(DataValidationError) as info:
        dm.setup()
    assert f"{folder / '05.jpg'}: caption missing in captions.txt" in str(info.value)

    skipping = make_dm(folder, tmp_path, use_captions=True, on_bad_file="skip")
    skipping.setup()
    assert len(skipping.skipped) == 2
    assert sorted(by_id(skipping)) == names

    captions.unlink()  # use_captions without a captions file cannot be skipped
    assert make_dm(folder, tmp_path, use_captions=True).validate().problems == [
        Problem(str(captions), "file not found")
    ]
    with pytest.raises(DataValidationError, match="captions.txt: file not found"):
        make_dm(folder, tmp_path, use_captions=True, on_bad_file="skip").setup()


def test_sample_prompts_use_the_instance_token(folder: Path, tmp_path: Path) -> None:
    dm = make_dm(folder, tmp_path)
    assert dm.sample_prompts[:3] == [
        "a photo of sksToy toy",
        "a photo of sksToy toy on a beach",
        "a photo of sksToy toy in the snow",
    ]
    custom = make_dm(folder, tmp_path, sample_prompts=["{instance_token} {class_word} on Mars"])
    assert custom.sample_prompts == ["sksToy toy on Mars"]


# ------------------------------------------------------------------------------------ split


def test_split_is_80_20_deterministic_and_seeded(folder: Path, tmp_path: Path) -> None:
    splits = []
    for seed in (0, 0, 1):
        dm = make_dm(folder, tmp_path, split_seed=seed, split_file=None)
        dm.setup()
        splits.append(dm.splits)
    first, again, other = splits
    assert (len(first["train"]), len(first["val"])) == (8, 2)
    assert sorted(first["train"] + first["val"]) == sorted(p.name for p in folder.iterdir())
    assert first == again
    assert other["val"] != first["val"]
    assert dm.validate().splits == {"train": 8, "val": 2}
    assert [len(split_names(list("abcde"), 0.2, 0)[k]) for k in ("train", "val")] == [4, 1]
    assert [len(split_names(list("ab"), 0.2, 0)[k]) for k in ("train", "val")] == [1, 1]
    assert split_names(list("abc"), 0.0, 0) == {"train": ["a", "b", "c"], "val": []}


def test_split_file_is_written_and_reused(folder: Path, tmp_path: Path) -> None:
    dm = make_dm(folder, tmp_path)
    dm.setup()
    split_file = tmp_path / "run" / "data_split.json"
    assert json.loads(split_file.read_text()) == {
        "split_seed": 0,
        "val_fraction": 0.2,
        "train": dm.splits["train"],
        "val": dm.splits["val"],
    }
    names = sorted(p.name for p in folder.iterdir())
    chosen = {"train": names[3:], "val": names[:3]}
    split_file.write_text(json.dumps(chosen))
    reused = make_dm(folder, tmp_path, split_seed=7)
    reused.setup()
    assert reused.splits == chosen
    assert json.loads(split_file.read_text()) == chosen  # read, not rewritten


def test_split_file_naming_a_missing_file_is_an_error(folder: Path, tmp_path: Path) -> None:
    split_file = tmp_path / "run" / "data_split.json"
    split_file.parent.mkdir()
    names = sorted(p.name for p in folder.iterdir())
    split_file.write_text(json.dumps({"train": [*names[2:], "gone.jpg"], "val": names[:2]}))
    expected = Problem(
        str(split_file),
        "names 1 file(s) that are not in the image folder: 'gone.jpg' "
        "(delete the split file to split again)",
    )
    for policy in ("error", "skip"):
        dm = make_dm(folder, tmp_path, on_bad_file=policy)
        assert dm.validate().problems == [expected]
        with pytest.raises(DataValidationError) as info:
            dm.setup()
        assert str(expected) in str(info.value)


# ------------------------------------------------------------------------------------ bad files


def test_broken_heics_are_listed_with_their_reason(
    folder: Path, heif_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in BROKEN:
        shutil.copy(heif_dir / name, folder / name)
    report = make_dm(folder, tmp_path).validate()
    assert report.counts == {"images": 13}
    assert report.splits == {"train": 8, "val": 2}
    reasons = {p.path: p.reason for p in report.problems}
    assert reasons[str(folder / "heif_corrupted_empty.heic")] == "empty file (0 bytes)"
    assert reasons[str(folder / "heif_truncated_truncated.heic")] == (
        "truncated or corrupt image: the 'mdat' box at byte 607 needs 3051 bytes "
        "but the file ends 1 byte short (3657 bytes)"
    )
    assert reasons[str(folder / "heif_corrupted_corrupted.heic")].startswith(
        "truncated or corrupt HEIF image: "
    )
    for name in BROKEN:  # the reader's own reason, word for word
        with pytest.raises(ImageReadError) as info:
            read_image(folder / name)
        assert reasons[str(folder / name)] == info.value.problem
    assert len(report.problems) == 3

    with pytest.raises(DataValidationError) as err:
        make_dm(folder, tmp_path).setup()
    assert all(str(folder / name) in str(err.value) for name in BROKEN)

    skipping = make_dm(folder, tmp_path, on_bad_file="skip")
    with caplog.at_level(logging.WARNING, logger="genlab.data.dreambooth"):
        skipping.setup()
    assert {p.path for p in skipping.skipped} == {str(folder / n) for n in BROKEN}
    assert len(by_id(skipping)) == 10
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 3


def test_duplicate_ids_are_reported_and_skipped(folder: Path, tmp_path: Path) -> None:
    solid(folder / "00.png", (40, 40), (1, 2, 3))
    problem = Problem(str(folder / "00.png"), "duplicate id '00': same name stem as 00.jpg")
    assert make_dm(folder, tmp_path).validate().problems == [problem]
    dm = make_dm(folder, tmp_path, on_bad_file="skip")
    dm.setup()
    assert dm.skipped == [problem]
    assert "00.png" not in by_id(dm) and "00.jpg" in by_id(dm)


def test_empty_folder_and_too_few_images(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    with pytest.raises(FileNotFoundError, match=f"data.instance_dir={empty}: no images"):
        make_dm(empty, tmp_path).validate()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        make_dm(tmp_path / "absent", tmp_path).setup()

    single = tmp_path / "single"
    single.mkdir()
    solid(single / "only.png", (40, 40), (5, 5, 5))
    expected = Problem(
        str(single), "fewer than 2 usable images (1 of 1); a train/val split needs at least 2"
    )
    assert make_dm(single, tmp_path).validate().problems == [expected]
    with pytest.raises(DataValidationError, match="fewer than 2 usable images"):
        make_dm(single, tmp_path, on_bad_file="skip").setup()


def test_bad_settings_are_rejected(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_file must be one of"):
        make_dm(folder, tmp_path, on_bad_file="ignore")
    with pytest.raises(ValueError, match="crop must be 'center' or 'random'"):
        make_dm(folder, tmp_path, crop="diagonal")
    with pytest.raises(ValueError, match="inside instance_dir"):
        make_dm(folder, tmp_path, cache_dir=folder / "cache")


# ------------------------------------------------------------------------------------ class images


def test_class_images_are_paired_in_turn(folder: Path, tmp_path: Path) -> None:
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    colors = {"a.png": (200, 0, 0), "b.png": (0, 200, 0), "c.png": (0, 0, 200)}
    for i, (name, color) in enumerate(colors.items()):
        solid(class_dir / name, (40 + 10 * i, 40), color)  # widths 40/50/60 identify them
    dm = make_dm(folder, tmp_path, class_dir=class_dir, num_class_images=3, repeats=3)
    dm.setup()
    assert dm.validate().counts == {"images": 10, "class images": 3}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == KEYS | CLASS_KEYS
    assert batch["class_pixel_values"].shape == (4, 3, 32, 32)
    assert batch["class_prompt"] == ["a photo of toy"] * 4
    assert batch["class_crop_top_left"].dtype == torch.int64
    items = unbatch(dm.train_dataloader())
    assert len(items) == 8 * 3
    widths = [int(i["class_original_size"][1]) for i in items]
    assert {w: widths.count(w) for w in set(widths)} == {40: 8, 50: 8, 60: 8}
    for item in items:
        color = list(colors.values())[(int(item["class_original_size"][1]) - 40) // 10]
        assert (to_u8(item["class_pixel_values"]) == color).all()
    assert set(next(iter(dm.val_dataloader()))) == KEYS

    fewer = make_dm(folder, tmp_path, class_dir=class_dir, num_class_images=2)
    fewer.setup()
    assert {int(i["class_original_size"][1]) for i in unbatch(fewer.train_dataloader())} == {40, 50}


def test_max_train_samples_and_repeats(folder: Path, tmp_path: Path) -> None:
    full = make_dm(folder, tmp_path)
    full.setup()
    dm = make_dm(folder, tmp_path, max_train_samples=3, repeats=4)
    dm.setup()
    assert len(dm.splits["train"]) == 3 and set(dm.splits["train"]) <= set(full.splits["train"])
    ids = [i["image_id"] for i in unbatch(dm.train_dataloader())]
    assert sorted(ids) == sorted(dm.splits["train"] * 4)
    assert len(dm.train_dataloader()) == 3


# ------------------------------------------------------------------------------------ cache


def test_photos_are_decoded_once_and_the_data_folder_is_untouched(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(os.listdir(folder))
    first = make_dm(folder, tmp_path)
    first.prepare_data()
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 10
    first.setup()
    expected = by_id(first)

    calls: list[Path] = []
    real_read = dreambooth.read_image

    def no_decoding(path, *args, **kwargs):
        calls.append(Path(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(dreambooth, "read_image", no_decoding)
    second = make_dm(folder, tmp_path)
    second.prepare_data()
    second.setup()
    assert calls == []
    again = by_id(second)
    assert all(
        torch.equal(again[k]["pixel_values"], v["pixel_values"]) for k, v in expected.items()
    )

    os.utime(folder / "03.jpg", ns=(1_000_000_000, 1_000_000_000))  # an edited photo is re-read
    make_dm(folder, tmp_path).validate()
    assert calls == [folder / "03.jpg"]
    assert sorted(os.listdir(folder)) == before


# ------------------------------------------------------------------------------------ resume


def test_resumed_generator_gives_the_same_next_batch(folder: Path, tmp_path: Path) -> None:
    options = {"crop": "random", "random_flip": 0.5}
    dm = make_dm(folder, tmp_path, **options)
    dm.setup()
    loader = dm.train_dataloader()
    first = next(iter(loader))
    for _ in loader:  # the rest of the first epoch (checkpoints are saved at epoch ends)
        pass
    state = dm.state_dict()
    expected = next(iter(loader))

    resumed = make_dm(folder, tmp_path, **options)
    resumed.setup()
    resumed.load_state_dict(state)
    batch = next(iter(resumed.train_dataloader()))
    assert batch["image_id"] == expected["image_id"]
    assert torch.equal(batch["crop_top_left"], expected["crop_top_left"])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert first["image_id"] != expected["image_id"] or not torch.equal(
        first["crop_top_left"], expected["crop_top_left"]
    )


def test_batches_do_not_depend_on_the_number_of_workers(folder: Path, tmp_path: Path) -> None:
    batches = []
    for workers in (0, 2):
        dm = make_dm(folder, tmp_path, crop="random", random_flip=0.5, num_workers=workers)
        dm.setup()
        dm.load_state_dict({"train_generator": torch.Generator().manual_seed(3).get_state()})
        batches.append(next(iter(dm.train_dataloader())))
    assert batches[0]["image_id"] == batches[1]["image_id"]
    assert torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])


# ------------------------------------------------------------------------------------ config


def test_sks_toy_config_instantiates_the_datamodule(folder: Path, tmp_path: Path) -> None:
    overrides = [
        "data=sks_toy",
        f"data.instance_dir={folder}",
        "data.resolution=32",
        "data.num_workers=0",
    ]
    cfg = compose_config("train", overrides, tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, DreamBoothDataModule)
    assert dm.instance_prompt == "a photo of sksToy toy"
    assert dm.split_file == tmp_path / "run" / "data_split.json"
    assert dm.cache_dir == tmp_path / "cache" / "dreambooth"
    assert (dm.val_fraction, dm.repeats, dm.background) == (0.2, 10, (255, 255, 255))
    dm.setup()
    assert json.loads(dm.split_file.read_text())["val"] == dm.splits["val"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert len(dm.train_dataloader().dataset) == 8 * 10
