"""``inference.py task=generate_images`` on a tiny DreamBooth LoRA run trained through ``genlab.cli.train``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genlab.cli import inference, train
from genlab.metrics.fidelity_report import MEAN_ROW, read_fidelity_csv
from tests.conftest import shared_path
from tests.helpers import compose_config

PROMPTS = ["a photo of sksToy toy", "a sksToy toy on a beach"]
SCORES = ("dino", "clip_i", "clip_t")


@pytest.fixture(scope="module")
def photos(shared_testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    backpack = shared_path(shared_testdata, "dreambooth_backpack")
    folder = tmp_path_factory.mktemp("sks_photos")
    for i in range(6):
        shutil.copy(backpack / f"{i:02d}.jpg", folder / f"{i:02d}.jpg")
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip_tok")


@pytest.fixture(scope="module")
def run(photos: Path, tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 steps of lora_sd_tiny (random LoRA B, so the LoRA visibly changes the images), with
    the tiny scorer: 4 train photos, 2 held out."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = compose_config(
        "train",
        [
            "model=lora_sd_tiny",
            "model/metrics=subject_fidelity_tiny",
            "model.lora.init=false",
            "model.export_format=[diffusers,kohya]",
            f"model.tiny.tokenizer_dir={tok_dir}",
            "data=sks_toy",
            f"data.instance_dir={photos}",
            "data.resolution=${model.resolution}",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.repeats=1",
            "data.val_fraction=0.34",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=-1",
            "+trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "test=false",
            "logger=csv",
            "callbacks.samples=null",
            "extras.print_config=false",
        ],
        tmp,
    )
    train(cfg)
    return Path(cfg.paths.output_dir)


def generate(tmp: Path, *overrides: str) -> Path:
    """Run the task in a fresh inference run directory under ``tmp``; returns it."""
    cfg = compose_config(
        "inference",
        [
            "task=generate_images",
            f"prompts=[{','.join(PROMPTS)}]",
            "num_images=2",
            "seed=0",
            "task.steps=2",
            "extras.print_config=false",
            *overrides,
        ],
        tmp,
    )
    inference(cfg)
    return Path(cfg.paths.output_dir)


def images(out: Path) -> dict[str, np.ndarray]:
    found = {}
    for p in sorted((out / "samples").glob("*.png")):
        if p.name != "grid.png":
            with Image.open(p) as im:
                found[p.name] = np.asarray(im.convert("RGB")).copy()
    return found


@pytest.fixture(scope="module")
def lora_out(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("lora"), f"lora_path={run}")


@pytest.fixture(scope="module")
def base_out(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("base"),
        "lora_path=null",
        "model=lora_sd_tiny",
        f"model.tiny.tokenizer_dir={tok_dir}",
    )


def test_training_validated_with_scores_and_baseline(run: Path) -> None:
    final = json.loads((run / "metrics.json").read_text())
    for name in SCORES:
        assert math.isfinite(final[f"val/{name}"]) and math.isfinite(final[f"val/baseline_{name}"])
    baseline = json.loads((run / "baseline_metrics.json").read_text())
    assert baseline["num_references"] == 2  # the held-out photos of the datamodule
    assert baseline["dino"] == pytest.approx(final["val/baseline_dino"], abs=1e-6)
    table = read_fidelity_csv(run / "samples" / "step_000002" / "metrics.csv")
    assert len(table) == 5 and table[MEAN_ROW]["num_images"] == 4  # 4 sample prompts + mean
    assert table[MEAN_ROW]["dino"] == pytest.approx(final["val/dino"], abs=1e-6)
    assert table[MEAN_ROW]["baseline_clip_t"] == pytest.approx(baseline["clip_t"], abs=1e-9)
    assert len(list((run / "samples" / "baseline").glob("*.png"))) == 5


def test_images_and_grid_same_seed_same_pixels(run: Path, lora_out: Path, tmp_path: Path) -> None:
    first = images(lora_out)
    assert sorted(first) == [
        "a_photo_of_skstoy_toy_00.png",
        "a_photo_of_skstoy_toy_01.png",
        "a_skstoy_toy_on_a_beach_00.png",
        "a_skstoy_toy_on_a_beach_01.png",
    ]
    assert all(a.shape == (32, 32, 3) for a in first.values())  # model.resolution of the run
    assert not np.array_equal(*[first[n] for n in sorted(first)[:2]])  # seed + i per image
    with Image.open(lora_out / "samples" / "grid.png") as grid:
        assert grid.size[0] > 64
    assert not (lora_out / "metrics.json").exists()
    again = images(generate(tmp_path, f"lora_path={run}"))
    for name, pixels in first.items():
        assert np.array_equal(again[name], pixels), name


def test_lora_scale_zero_is_the_base_model(
    run: Path, lora_out: Path, base_out: Path, tmp_path: Path
) -> None:
    base, lora = images(base_out), images(lora_out)
    assert any(not np.array_equal(base[n], lora[n]) for n in base)  # the LoRA does something
    # the diffusers file, at scale 0: exactly the base model's pixels
    off = images(
        generate(
            tmp_path / "off",
            f"lora_path={run / 'pytorch_lora_weights.safetensors'}",
            "task.lora_scale=0",
        )
    )
    for name, pixels in base.items():
        assert np.array_equal(off[name], pixels), name
    # the kohya export loads to the same LoRA as the run folder
    kohya = images(generate(tmp_path / "kohya", f"lora_path={run / 'lora_kohya.safetensors'}"))
    for name, pixels in lora.items():
        assert np.abs(kohya[name].astype(int) - pixels).max() <= 1, name


def test_metrics_against_reference_photos(run: Path, photos: Path, tmp_path: Path) -> None:
    out = generate(tmp_path / "a", f"lora_path={run}", "metrics=true", f"reference_dir={photos}")
    scores = json.loads((out / "metrics.json").read_text())
    for name in SCORES:
        assert math.isfinite(scores[name]) and -1 <= scores[name] <= 1
    assert scores["num_images"] == 4 and scores["num_references"] == 6
    assert scores["lora_scale"] == 1.0 and scores["lora_path"].endswith(".safetensors")
    assert sorted(scores["per_prompt"]) == sorted(PROMPTS)
    table = read_fidelity_csv(out / "metrics.csv")
    assert list(table) == [*PROMPTS, MEAN_ROW]
    assert table[MEAN_ROW]["dino"] == pytest.approx(scores["dino"], abs=1e-12)
    assert table[PROMPTS[1]]["clip_t"] == pytest.approx(
        scores["per_prompt"][PROMPTS[1]]["clip_t"], abs=1e-12
    )
    # no reference_dir: the run's held-out photos
    held_out = json.loads(
        (generate(tmp_path / "b", f"lora_path={run}", "metrics=true") / "metrics.json").read_text()
    )
    assert held_out["num_references"] == 2 and "held-out" in held_out["references"]


def test_scheduler_choice_and_clear_errors(run: Path, lora_out: Path, tmp_path: Path) -> None:
    ddim = images(generate(tmp_path / "ddim", f"lora_path={run}", "task.scheduler=ddim"))
    dpm = images(lora_out)
    assert sorted(ddim) == sorted(dpm)
    assert any(not np.array_equal(ddim[n], dpm[n]) for n in dpm)
    partial = "{_target_:diffusers.DDIMScheduler.from_config,_partial_:true}"
    same = images(
        generate(
            tmp_path / "partial",
            f"lora_path={run}",
            f"task.scheduler={partial}",
            "task.height=48",
            "num_images=1",
        )
    )
    assert sorted(same) == ["a_photo_of_skstoy_toy_00.png", "a_skstoy_toy_on_a_beach_00.png"]
    assert all(a.shape == (48, 32, 3) for a in same.values())
    with pytest.raises(ValueError, match="task.scheduler='nope'"):
        generate(tmp_path / "bad", f"lora_path={run}", "task.scheduler=nope")
    missing = tmp_path / "no_such_lora.safetensors"
    with pytest.raises(FileNotFoundError, match=f"lora_path={missing}: no such file"):
        generate(tmp_path / "missing", f"lora_path={missing}")
    weights = run / "pytorch_lora_weights.safetensors"
    with pytest.raises(ValueError, match=f"lora_path={weights}: unet: .*another rank"):
        generate(
            tmp_path / "rank", f"lora_path={weights}", "model=lora_sd_tiny", "model.lora.rank=2"
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without LoRA weights"):
        generate(tmp_path / "e", f"lora_path={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="needs a scorer.*model/metrics=subject_fidelity_tiny"):
        generate(tmp_path / "s", "lora_path=null", "model=lora_sd_tiny", "metrics=true")
    with pytest.raises(ValueError, match="reference_dir="):
        generate(
            tmp_path / "r",
            "lora_path=null",
            "model=lora_sd_tiny",
            "model/metrics=subject_fidelity_tiny",
            "metrics=true",
        )
