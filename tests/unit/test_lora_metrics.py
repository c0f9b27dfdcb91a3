"""Validation metrics of DreamBooth LoRA: DINO / CLIP-I / CLIP-T per prompt and mean, the base-model
baseline, the files they are written to, and the scorer configs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image
from torch.utils.data import DataLoader

from genlab.metrics.fidelity_report import (
    MEAN_ROW,
    fidelity_values,
    read_fidelity_csv,
    write_fidelity_csv,
    write_fidelity_json,
)
from genlab.metrics.image_similarity import SubjectFidelity, SubjectFidelityScores
from genlab.models.lora_sd import LoRADreamBooth
from genlab.models.lora_sd.module import BASELINE_FILE
from genlab.pretrained import WeightsUnavailableError
from tests.helpers import compose_config

R = 32
PROMPTS = ["a photo of sksToy toy", "a sksToy toy on a beach"]
SCORES = ("dino", "clip_i", "clip_t")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip_tok")


def model_cfg(tmp: Path, tok_dir: Path, *overrides: str):
    cfg = compose_config("train", ["model=lora_sd_tiny", "data=sks_toy", *overrides], tmp)
    cfg.model.tiny.tokenizer_dir = str(tok_dir)
    return cfg.model


def make(tmp: Path, tok_dir: Path, *overrides: str) -> LoRADreamBooth:
    return instantiate(model_cfg(tmp, tok_dir, *overrides))


def loader(batches: int = 1, n: int = 3, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    items = [
        {"pixel_values": torch.rand(3, R, R, generator=g) * 2 - 1, "prompt": PROMPTS[0]}
        for _ in range(batches * n)
    ]
    return DataLoader(items, batch_size=n, shuffle=False)


def trainer(tmp: Path):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        default_root_dir=str(tmp),
    )


def pngs(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(folder.glob("*.png")):
        if p.name != "grid.png":
            with Image.open(p) as im:
                out[p.name] = np.asarray(im.convert("RGB")).copy()
    return out


class Recorder(torch.nn.Module):
    """Wraps a scorer and keeps what it was called with."""

    def __init__(self, scorer):
        super().__init__()
        self.scorer = scorer
        self.calls: list[dict] = []

    def forward(self, images, prompts, references):
        self.calls.append({"images": images, "prompts": prompts, "references": references})
        return self.scorer(images=images, prompts=prompts, references=references)


# ------------------------------------------------------------------------------ validation


def test_validation_scores_lora_and_baseline_once_with_adapters_off(
    tmp_path: Path, tok_dir: Path
) -> None:
    model = make(
        tmp_path,
        tok_dir,
        "model/metrics=subject_fidelity_tiny",
        "model.lora.init=false",  # random B: the LoRA model differs from the base at once
        "model.optimizer.lr=0",  # the weights of the fit step stay those sampled below
        f"model.validation.prompts=[{','.join(PROMPTS)}]",
        "model.validation.num_images=2",
    )
    assert isinstance(model.metrics, SubjectFidelity) and model.metrics.identifier == "sksToy"
    real = model.metrics
    recorder = Recorder(real)
    model.metrics = recorder
    t = trainer(tmp_path)
    t.fit(model, train_dataloaders=loader(), val_dataloaders=loader(batches=2))

    # first validation (after the sanity check, which scores nothing): baseline, then LoRA
    assert [c["prompts"] for c in recorder.calls] == [[p for p in PROMPTS for _ in "ab"]] * 2
    base_call, lora_call = recorder.calls
    references = lora_call["references"]
    assert len(references) == 6 and base_call["references"] is references
    metrics = {k: float(v) for k, v in t.callback_metrics.items()}
    for name in SCORES:
        assert math.isfinite(metrics[f"val/{name}"])
        assert math.isfinite(metrics[f"val/baseline_{name}"])

    step = tmp_path / "samples" / "step_000001"
    base_dir = tmp_path / "samples" / "baseline"
    lora_imgs, base_imgs = pngs(step), pngs(base_dir)
    assert sorted(lora_imgs) == sorted(base_imgs) and len(lora_imgs) == 4
    assert (base_dir / "grid.png").is_file()
    assert any(not np.array_equal(lora_imgs[k], base_imgs[k]) for k in lora_imgs)
    # the baseline is the base model: adapters off, the validation seeds (prompt i: seed + i)
    with model.adapters_disabled():
        for i, prompt in enumerate(PROMPTS):
            images = model.generate([prompt], torch.Generator().manual_seed(i), 2)
            for k, image in enumerate(images):
                assert np.array_equal(np.asarray(image), np.asarray(base_call["images"][2 * i + k]))
    # the images on disk are the ones scored (file names sort in prompt-major order here)
    names = sorted(lora_imgs)
    for k, name in enumerate(names):
        assert np.array_equal(lora_imgs[name], np.asarray(lora_call["images"][k]))
        assert np.array_equal(base_imgs[name], np.asarray(base_call["images"][k]))

    # metrics.csv: per-prompt and mean values == the scorer called directly on the PNGs
    table = read_fidelity_csv(step / "metrics.csv")
    assert list(table) == [*PROMPTS, MEAN_ROW]
    reloaded = [Image.fromarray(lora_imgs[n]) for n in names]
    prompts = [PROMPTS[0] if n.startswith("a_photo") else PROMPTS[1] for n in names]
    direct = real(images=reloaded, prompts=prompts, references=references)
    for name in SCORES:
        assert table[MEAN_ROW][name] == pytest.approx(getattr(direct, name), abs=1e-9)
        assert metrics[f"val/{name}"] == pytest.approx(getattr(direct, name), abs=1e-6)
        for prompt in PROMPTS:
            assert table[prompt][name] == pytest.approx(direct.per_prompt[prompt][name], abs=1e-9)
    assert table[MEAN_ROW]["num_images"] == 4 and table[PROMPTS[1]]["num_images"] == 2

    # baseline_metrics.json and the baseline columns hold the base model's scores
    baseline = json.loads((tmp_path / BASELINE_FILE).read_text())
    base_direct = real(
        images=base_call["images"], prompts=base_call["prompts"], references=references
    )
    assert baseline["prompts"] == PROMPTS and baseline["seed"] == 0
    assert baseline["num_images"] == 4 and baseline["num_references"] == 6
    for name in SCORES:
        assert baseline[name] == pytest.approx(getattr(base_direct, name), abs=1e-9)
        assert metrics[f"val/baseline_{name}"] == pytest.approx(baseline[name], abs=1e-6)
        assert table[MEAN_ROW][f"baseline_{name}"] == pytest.approx(baseline[name], abs=1e-9)
        for prompt in PROMPTS:
            expected = baseline["per_prompt"][prompt][name]
            assert table[prompt][f"baseline_{name}"] == pytest.approx(expected, abs=1e-9)

    # validating again: the LoRA model is scored again, the baseline is not recomputed
    stamp = (tmp_path / BASELINE_FILE).stat().st_mtime_ns
    t.validate(model, dataloaders=loader(batches=2), verbose=False)
    assert len(recorder.calls) == 3
    assert (tmp_path / BASELINE_FILE).stat().st_mtime_ns == stamp
    again = {k: float(v) for k, v in t.callback_metrics.items()}
    for name in SCORES:
        assert again[f"val/baseline_{name}"] == pytest.approx(metrics[f"val/baseline_{name}"])
        assert again[f"val/{name}"] == pytest.approx(metrics[f"val/{name}"], abs=1e-6)


def test_no_baseline_when_switched_off_and_no_files_without_a_scorer(
    tmp_path: Path, tok_dir: Path
) -> None:
    model = make(
        tmp_path / "a",
        tok_dir,
        "model/metrics=subject_fidelity_tiny",
        "model.validation.baseline=false",
        f"model.validation.prompts=[{PROMPTS[0]}]",
    )
    recorder = Recorder(model.metrics)
    model.metrics = recorder
    t = trainer(tmp_path / "a")
    t.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    assert len(recorder.calls) == 1
    assert not (tmp_path / "a" / BASELINE_FILE).exists()
    assert not (tmp_path / "a" / "samples" / "baseline").exists()
    assert "val/baseline_dino" not in t.callback_metrics
    header = (tmp_path / "a" / "samples" / "step_000001" / "metrics.csv").read_text().split("\n")[0]
    assert header == "prompt,num_images,dino,clip_i,clip_t"

    plain = make(tmp_path / "b", tok_dir, f"model.validation.prompts=[{PROMPTS[0]}]")
    assert plain.metrics is None
    t = trainer(tmp_path / "b")
    t.fit(plain, train_dataloaders=loader(), val_dataloaders=loader())
    assert (tmp_path / "b" / "samples" / "step_000001" / "grid.png").is_file()
    assert not (tmp_path / "b" / "samples" / "step_000001" / "metrics.csv").exists()
    assert not (tmp_path / "b" / BASELINE_FILE).exists()


def test_every_rank_draws_samples_only_rank_zero_writes(tmp_path: Path, tok_dir: Path) -> None:
    """Samples are drawn in validation_step on every rank (so FSDP / ZeRO-3 ranks gather their
    shards together); only rank 0 writes and scores them, and nothing is drawn while
    sanity-checking."""
    model = make(tmp_path, tok_dir, "model/metrics=subject_fidelity_tiny")
    drawn, written = [], []
    model.draw_validation_samples = lambda: drawn.append(True) or "draw"  # type: ignore[method-assign]
    model.write_validation_samples = written.append  # type: ignore[method-assign]
    model.diffusion_loss = lambda pixels, *a: torch.zeros(len(pixels))  # type: ignore[method-assign]
    model.log = lambda *a, **k: None  # type: ignore[method-assign]
    batch = {"pixel_values": torch.zeros(1, 3, R, R), "prompt": ["p"]}
    for zero, sanity in ((False, False), (True, False), (True, True)):
        model._trainer = SimpleNamespace(
            sanity_checking=sanity,
            is_global_zero=zero,
            fast_dev_run=False,
            global_rank=int(not zero),
        )
        model.validation_step(batch, 0)
        model.validation_step(batch, 1)
        model.on_validation_epoch_end()
    assert drawn == [True, True]
    assert written == ["draw"]


def test_references_are_the_datamodules_whole_val_split(tmp_path: Path, tok_dir: Path) -> None:
    """Every val photo (not only the shard this process validated), read once."""
    model = make(tmp_path, tok_dir)
    items = [{"pixel_values": torch.full((3, R, R), v)} for v in (-1.0, 0.0, 1.0)]
    datamodule = SimpleNamespace(val_dataloader=lambda: DataLoader(items, batch_size=2))
    model._trainer = SimpleNamespace(datamodule=datamodule)
    model._references = ["only this shard"]  # type: ignore[list-item]
    refs = model.reference_images()
    assert len(refs) == 3 and all(im.size == (R, R) for im in refs)
    assert [im.getpixel((0, 0)) for im in refs] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    assert model.reference_images() is refs
    without = make(tmp_path, tok_dir)
    without._trainer = SimpleNamespace(datamodule=None)
    without._references = collected = [Image.new("RGB", (R, R))]
    assert without.reference_images() is collected


# ------------------------------------------------------------------------------ configs


def test_scorer_configs_and_recipe_wiring(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_config(
        "train", ["experiment=sks_toy_sd15", "data.instance_token=zqToy"], tmp_path
    )
    metrics = cfg.model.metrics
    assert metrics._target_ == "genlab.metrics.image_similarity.SubjectFidelity"
    assert metrics.identifier == "zqToy"  # from the data's instance token
    assert (
        metrics.dino.model_name == "vit_small_patch16_224.dino" and metrics.dino.pretrained == "hub"
    )
    assert metrics.clip.model_name == "ViT-B-32" and metrics.clip.pretrained == "openai"
    xl = compose_config("train", ["experiment=sks_toy_sdxl"], tmp_path)
    assert xl.model.metrics.identifier == "sksToy" and not xl.model.metrics.dino.tiny
    assert compose_config("train", ["model=lora_sd"], tmp_path).model.metrics is None

    # offline, the real encoders stop at once with the one-line weights error
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception) as info:
        instantiate(metrics)
    err = info.value
    while not isinstance(err, WeightsUnavailableError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, WeightsUnavailableError)
    assert "\n" not in str(err) and "model.metrics.dino.pretrained" in str(err)

    # the recipe with the scorer group removed: only the identifier is left, no scorer
    cfg = model_cfg(tmp_path, tok_dir, "experiment=sks_toy_sd15", "~model/metrics")
    assert dict(cfg.metrics) == {"identifier": "sksToy"}
    with open_dict(cfg):
        cfg.pretrained = None
        cfg.tiny = model_cfg(tmp_path, tok_dir).tiny
        cfg.resolution = R
    assert instantiate(cfg).metrics is None
    with open_dict(cfg):
        cfg.metrics = {"dino": {"tiny": True}}
    with pytest.raises(Exception, match="model/metrics=subject_fidelity"):
        instantiate(cfg)


# ------------------------------------------------------------------------------ files


def test_fidelity_files_round_trip(tmp_path: Path) -> None:
    scores = SubjectFidelityScores(
        dino=0.5,
        clip_i=0.25,
        clip_t=0.125,
        per_prompt={
            "a, b": {"dino": 0.4, "clip_i": 0.2, "clip_t": 0.1, "num_images": 2},
            'say "x"': {"dino": 0.6, "clip_i": 0.3, "clip_t": 0.15, "num_images": 2},
        },
        num_images=4,
        num_references=3,
    )
    values = fidelity_values(scores)
    assert values.means == {"dino": 0.5, "clip_i": 0.25, "clip_t": 0.125}
    assert values.num_images == 4 and values.num_references == 3
    baseline = fidelity_values(
        {
            "dino": torch.tensor(0.1),
            "clip_i": 0.05,
            "clip_t": 0.3,
            "per_prompt": {"a, b": {"dino": 0.2}},
        }
    )
    write_fidelity_csv(tmp_path / "m.csv", values, baseline)
    table = read_fidelity_csv(tmp_path / "m.csv")
    assert list(table) == ["a, b", 'say "x"', MEAN_ROW]
    assert table["a, b"] == {
        "num_images": 2,
        "dino": 0.4,
        "clip_i": 0.2,
        "clip_t": 0.1,
        "baseline_dino": pytest.approx(0.2),
    }
    assert "baseline_dino" not in table['say "x"']  # the baseline has no such prompt
    assert table[MEAN_ROW]["num_images"] == 4 and table[MEAN_ROW]["clip_t"] == 0.125
    assert table[MEAN_ROW]["baseline_dino"] == pytest.approx(0.1)

    write_fidelity_json(
        tmp_path / "m.json", values, extra={"seed": 3, "path": tmp_path}, baseline=baseline
    )
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["dino"] == 0.5 and data["per_prompt"]['say "x"']["clip_i"] == 0.3
    assert data["seed"] == 3 and data["path"] == str(tmp_path)
    assert data["baseline"]["dino"] == pytest.approx(0.1)
    assert not list(tmp_path.glob(".*.tmp"))

    # a scorer's extra scalars are kept; malformed per-prompt entries are left out
    odd = fidelity_values({"dino": 0.25, "lpips": 0.5, "per_prompt": {"ignored": 1.0}})
    assert odd.names == ["dino", "lpips"] and odd.per_prompt == {}
