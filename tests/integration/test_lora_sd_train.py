"""End-to-end ``genlab.cli.train`` runs of DreamBooth LoRA on tiny SD / SDXL and real photos."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from genlab.cli import train
from tests.conftest import shared_path
from tests.helpers import compose_config

JPEGS = [f"{i:02d}.jpg" for i in range(6)]
HEICS = ["heif_other_pug.heic", "heif_zPug_3.heic"]


@pytest.fixture(scope="module")
def photos(shared_testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 backpack JPEGs and 2 phone HEICs in one folder (the instance photos)."""
    backpack = shared_path(shared_testdata, "dreambooth_backpack")
    heif = shared_path(shared_testdata, "pillow_heif")
    folder = tmp_path_factory.mktemp("sks_photos")
    for name in JPEGS:
        shutil.copy(backpack / name, folder / name)
    for name in HEICS:
        shutil.copy(heif / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip_tok")


def overrides(model: str, photos: Path, tok_dir: Path, *extra: str) -> list[str]:
    return [
        f"model={model}",
        "data=sks_toy",
        f"data.instance_dir={photos}",
        "data.resolution=${model.resolution}",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.repeats=1",
        "data.val_fraction=0.25",
        f"model.tiny.tokenizer_dir={tok_dir}",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=-1",
        "trainer.log_every_n_steps=1",
        "test=false",
        "logger=csv",
        "callbacks.samples=null",
        "extras.print_config=false",
        *extra,
    ]


def csv_rows(run: Path) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def lora_state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.parametrize("model", ["lora_sd_tiny", "lora_sdxl_tiny"])
def test_train_writes_lora_weights_samples_and_metrics(
    model: str, photos: Path, tok_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        "train", overrides(model, photos, tok_dir, "+trainer.max_steps=3"), tmp_path
    )
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)

    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    assert math.isfinite(on_disk["val/loss"]) and on_disk["val/loss"] > 0
    assert math.isfinite(on_disk["train/loss_epoch"])
    report = json.loads((run / "data_report.json").read_text())
    assert "images" in json.dumps(report)

    # 8 photos: 6 train (3 steps of 2), 2 val; validation at the end of the epoch (step 3)
    step = run / "samples" / "step_000003"
    pngs = sorted(p for p in step.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 4  # the datamodule's four sample prompts, one image each
    assert pngs[0].name.startswith("a_photo_of_skstoy_toy")
    with Image.open(step / "grid.png") as grid, Image.open(pngs[0]) as first:
        assert first.size == (32, 32) and grid.size[0] > 64

    lora_file = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert lora_file and all(k.startswith("unet.") for k in lora_file)
    exported = load_file(str(run / "model.safetensors"))
    assert exported and all(".lora_" in k for k in exported)
    state = lora_state(run)
    assert state.keys() == exported.keys()
    assert (run / "checkpoints" / "last.ckpt").stat().st_size < 2_000_000

    header = set(csv_rows(run)[0])
    assert {"train/loss_step", "val/loss"} <= header


def test_resume_from_last_is_exact(photos: Path, tok_dir: Path, tmp_path: Path) -> None:
    """2 steps == 1 step, then ckpt_path=last.ckpt for the second: same losses, same LoRA."""
    base = overrides(
        "lora_sd_tiny",
        photos,
        tok_dir,
        # one batch per epoch: every step ends an epoch, validates and checkpoints
        "data.max_train_samples=2",
        "model.lora.dropout=0.1",  # the global RNG stream matters too
        "model.optimizer.lr=1e-3",
        "model.scheduler.num_warmup_steps=3",
        "model.validation.prompts=[a photo of sksToy toy]",
    )
    straight = compose_config("train", [*base, "+trainer.max_steps=2"], tmp_path / "a")
    train(straight)
    first = compose_config("train", [*base, "+trainer.max_steps=1"], tmp_path / "b")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = compose_config(
        "train", [*base, "+trainer.max_steps=2", f"ckpt_path={last}"], tmp_path / "c"
    )
    train(resumed)

    a, b, c = (Path(x.paths.output_dir) for x in (straight, first, resumed))
    wa, wb, wc = lora_state(a), lora_state(b), lora_state(c)
    assert wa.keys() == wc.keys()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # step 2 did change the weights
    for k in wa:
        torch.testing.assert_close(wc[k], wa[k], rtol=0, atol=1e-6, msg=k)

    def losses(run: Path) -> dict[int, float]:
        rows = [r for r in csv_rows(run) if r.get("train/loss_step")]
        return {int(r["step"]): float(r["train/loss_step"]) for r in rows}

    # the loss curve: A's two steps == B's first step + C's (resumed) second step
    la, lb, lc = (list(losses(r).values()) for r in (a, b, c))
    assert len(la) == 2 and len(lb) == 1 and len(lc) == 1
    assert lb[0] == pytest.approx(la[0], abs=1e-6)
    assert lc[0] == pytest.approx(la[1], abs=1e-6)


def test_prior_preservation_generates_class_images_and_trains_on_them(
    photos: Path, tok_dir: Path, tmp_path: Path
) -> None:
    # the class folder does not exist yet: the base model fills it before the data is set up
    class_dir = tmp_path / "class_images"
    cfg = compose_config(
        "train",
        overrides(
            "lora_sd_tiny",
            photos,
            tok_dir,
            "+trainer.max_steps=2",
            "model.prior_preservation.enabled=true",
            f"model.prior_preservation.class_dir={class_dir}",
            "model.prior_preservation.num_class_images=3",
            "model.prior_preservation.steps=2",
            "model.prior_preservation.prior_loss_weight=0.5",
            "data.class_dir=${model.prior_preservation.class_dir}",
            "data.num_class_images=${model.prior_preservation.num_class_images}",
            "model.validation.num_images=0",
        ),
        tmp_path,
    )
    train(cfg)
    run = Path(cfg.paths.output_dir)
    assert sorted(p.name for p in class_dir.iterdir()) == [
        "class_00000.png",
        "class_00001.png",
        "class_00002.png",
    ]
    rows = [r for r in csv_rows(run) if r.get("train/loss_prior_step")]
    assert len(rows) == 2
    for r in rows:
        total = float(r["train/loss_step"])
        combined = float(r["train/loss_instance_step"]) + 0.5 * float(r["train/loss_prior_step"])
        assert total == pytest.approx(combined, rel=1e-5)
