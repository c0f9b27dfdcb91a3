"""DreamBooth LoRA on tiny SD / SDXL: loading, adapters, loss maths, checkpoints, export, class images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

from genlab.models.base import every_weight, load_weights
from genlab.models.lora_sd import (
    LoRADreamBooth,
    adamw_8bit,
    build_tiny_components,
    clip_bpe_tokenizer,
    combine_prior_loss,
    detect_architecture,
    load_components,
    min_snr_weights,
    sdxl_time_ids,
)
from genlab.models.lora_sd.components import ArchitectureError
from genlab.models.lora_sd.lora import KOHYA_WEIGHT_NAME
from genlab.pretrained import WeightsUnavailableError
from tests.helpers import compose_config

PROMPT = "a photo of sksToy toy"
R = 32  # pixels; the tiny VAE gives 16x16 latents


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip_tok")


def model_cfg(name: str, tmp: Path, tok_dir: Path, *overrides: str):
    cfg = compose_config(
        "train",
        [f"model={name}", "data=sks_toy", *overrides],
        tmp,
    )
    if cfg.model.tiny:
        cfg.model.tiny.tokenizer_dir = str(tok_dir)
    return cfg.model


def make(name: str, tmp: Path, tok_dir: Path, *overrides: str) -> LoRADreamBooth:
    return instantiate(model_cfg(name, tmp, tok_dir, *overrides))


def fake_batch(n: int = 2, prior: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "pixel_values": torch.rand(n, 3, R, R, generator=g) * 2 - 1,
        "prompt": [PROMPT] * n,
        "original_size": torch.tensor([[480, 640]] * n),
        "crop_top_left": torch.tensor([[0, 12]] * n),
    }
    if prior:
        batch |= {
            "class_pixel_values": torch.rand(n, 3, R, R, generator=g) * 2 - 1,
            "class_prompt": ["a photo of toy"] * n,
            "class_original_size": torch.tensor([[512, 512]] * n),
            "class_crop_top_left": torch.tensor([[0, 0]] * n),
        }
    return batch


def loader(batches: int = 1, n: int = 2) -> DataLoader:
    items = []
    for b in range(batches):
        batch = fake_batch(n, seed=b)
        items += [{k: v[i] for k, v in batch.items()} for i in range(n)]
    return DataLoader(items, batch_size=n, shuffle=False)


def trainer(tmp: Path, **kw):
    import lightning.pytorch as pl

    options = dict(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp),
    )
    return pl.Trainer(**{**options, **kw})


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> dict[str, Path]:
    """The tiny SD and SDXL components saved as diffusers folders (LoRA-free base models)."""
    out = {}
    for arch, name in (("sd", "lora_sd_tiny"), ("sdxl", "lora_sdxl_tiny")):
        tmp = tmp_path_factory.mktemp(arch)
        tiny = model_cfg(name, tmp, tok_dir).tiny
        out[arch] = build_tiny_components(**tiny).save_pretrained(tmp / "base")
    return out


# ------------------------------------------------------------------------------------ tokenizer


def test_clip_bpe_tokenizer_matches_open_clip(tok_dir: Path) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    tok = clip_bpe_tokenizer(tok_dir)
    ids = tok(PROMPT).input_ids
    assert ids[0] == tok.bos_token_id == 49406 and ids[-1] == tok.eos_token_id == 49407
    assert ids[1:-1] == SimpleTokenizer().encode(PROMPT)
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "photo</w>", "of</w>"]
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.pad_token_id == 49407
    assert clip_bpe_tokenizer(tok_dir, pad_token="!").pad_token_id == 0
    padded = tok([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77) and padded[0, -1] == 49407
    mtime = (tok_dir / "vocab.json").stat().st_mtime_ns
    clip_bpe_tokenizer(tok_dir)  # cached: not rewritten
    assert (tok_dir / "vocab.json").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_architecture_detected_from_saved_folder(arch: str, saved: dict[str, Path]) -> None:
    folder = saved[arch]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == (
        "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"
    )
    parts = load_components(folder)
    assert parts.architecture == arch
    assert (parts.text_encoder_2 is not None) == (arch == "sdxl")
    assert parts.tokenizer(PROMPT).input_ids[:3] == [49406, 320, 1125]
    if arch == "sdxl":
        assert parts.tokenizer_2.pad_token_id == 0


def test_detect_architecture_rejects_inconsistent_folders() -> None:
    sd_index = {"text_encoder": ["transformers", "CLIPTextModel"]}
    xl_index = {**sd_index, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    assert detect_architecture(sd_index, {}) == "sd"
    assert detect_architecture(xl_index, {"addition_embed_type": "text_time"}) == "sdxl"
    with pytest.raises(ArchitectureError, match="disagree"):
        detect_architecture(sd_index, {"addition_embed_type": "text_time"})
    with pytest.raises(ArchitectureError, match="refiner"):
        detect_architecture({"text_encoder": [None, None], "text_encoder_2": ["t", "c"]}, {})
    with pytest.raises(ArchitectureError, match="addition_embed_type"):
        detect_architecture(None, {"addition_embed_type": "image"})


def test_missing_weights_offline_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tok_dir: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = model_cfg("lora_sd", tmp_path, tok_dir, "model.pretrained=nobody-here/no-such-model")
    with pytest.raises(Exception) as info:
        instantiate(cfg)
    err = info.value
    while not isinstance(err, WeightsUnavailableError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, WeightsUnavailableError)
    message = str(err)
    assert "\n" not in message
    assert "'nobody-here/no-such-model'" in message
    assert "model.pretrained=" in message and "model=lora_sd_tiny" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.pretrained=.*no model_index.json"):
        load_components(tmp_path / "empty")


# ------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_optimizer_holds_exactly_the_lora_parameters(
    train_text_encoder: bool, tmp_path: Path, tok_dir: Path
) -> None:
    model = make(
        "lora_sdxl_tiny", tmp_path, tok_dir, f"model.lora.train_text_encoder={train_text_encoder}"
    )
    opt = model.configure_optimizers()["optimizer"]
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    lora = {n for n in named if ".lora_A." in n or ".lora_B." in n}
    assert in_opt == {id(named[n]) for n in lora}
    assert all(not p.requires_grad for n, p in named.items() if n not in lora)
    assert all(named[n].dtype == torch.float32 for n in lora)
    # 2 attention blocks (SDXL tiny: 1 + 2 transformer layers down, 2 + 2 up... counted) x 2
    # attentions x 4 projections x (A, B) on the UNet; 2 x 2 layers x 4 x 2 on the encoders
    unet = [n for n in lora if n.startswith("unet.")]
    text = [n for n in lora if n.startswith("text_encoder")]
    assert len(unet) % 8 == 0 and unet
    assert len(text) == (2 * 2 * 4 * 2 if train_text_encoder else 0)
    rank = model.lora_settings.rank
    assert all(rank in named[n].shape for n in lora)


def test_one_training_step_changes_only_lora_weights(tmp_path: Path, tok_dir: Path) -> None:
    model = make(
        "lora_sd_tiny", tmp_path, tok_dir, "model.optimizer.lr=1e-2", "model.noise_offset=0.1"
    )
    with every_weight():  # the frozen base too
        before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trainer(tmp_path)
    t.fit(model, train_dataloaders=loader())
    with every_weight():
        after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_b = {k for k in before if ".lora_B." in k}
    assert lora_b <= changed  # B starts at zero and moves
    assert all(".lora_" in k for k in changed)
    assert math.isfinite(float(t.callback_metrics["train/loss_step"]))


def test_loss_falls_when_overfitting_one_batch_with_fixed_noise(
    tmp_path: Path, tok_dir: Path
) -> None:
    model = make("lora_sd_tiny", tmp_path, tok_dir).train()
    batch = fake_batch(2)
    opt = torch.optim.AdamW([p for _, p in model.lora_parameters()], lr=1e-2)
    losses = []
    for _ in range(8):
        g = torch.Generator().manual_seed(0)
        loss = model.diffusion_loss(batch["pixel_values"], batch["prompt"], g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.02, losses


# ------------------------------------------------------------------------------------ loss maths


def test_prior_preservation_combination_by_hand() -> None:
    per_sample = torch.tensor([1.0, 2.0, 3.0, 5.0])
    loss, instance, prior = combine_prior_loss(per_sample, 2, 0.5)
    assert instance.item() == 1.5 and prior.item() == 4.0 and loss.item() == 1.5 + 0.5 * 4.0
    loss, instance, prior = combine_prior_loss(per_sample, 4, 0.5)
    assert prior is None and loss.item() == instance.item() == 2.75


def test_training_step_concatenates_class_batch_and_weights_prior(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make(
        "lora_sd_tiny",
        tmp_path,
        tok_dir,
        "model.prior_preservation.enabled=true",
        f"model.prior_preservation.class_dir={tmp_path / 'class'}",
        "model.prior_preservation.prior_loss_weight=0.25",
    )
    seen = {}

    def fake_loss(pixels, prompts, generator, sizes, crops):
        seen.update(pixels=pixels, prompts=prompts, sizes=sizes)
        return torch.tensor([1.0, 3.0, 10.0, 20.0])

    monkeypatch.setattr(model, "diffusion_loss", fake_loss)
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    batch = fake_batch(2, prior=True)
    loss = model.training_step(batch, 0)
    assert loss.item() == pytest.approx(2.0 + 0.25 * 15.0)
    assert seen["pixels"].shape == (4, 3, R, R)
    assert torch.equal(seen["pixels"][2:], batch["class_pixel_values"])
    assert seen["prompts"] == [PROMPT, PROMPT, "a photo of toy", "a photo of toy"]
    assert seen["sizes"][2:].tolist() == [[512, 512]] * 2
    with pytest.raises(ValueError, match="data.class_dir"):
        model.training_step(fake_batch(2), 0)


def test_min_snr_weights_by_hand(tmp_path: Path, tok_dir: Path) -> None:
    snr = torch.tensor([0.5, 5.0, 20.0])
    gamma = 5.0
    assert torch.allclose(min_snr_weights(snr, gamma, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(
        min_snr_weights(snr, gamma, "v_prediction"),
        torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0]),
    )
    assert torch.allclose(min_snr_weights(snr, gamma, "sample"), torch.tensor([0.5, 5.0, 5.0]))
    # the module's weights use the scheduler's SNR = abar / (1 - abar)
    model = make("lora_sd_tiny", tmp_path, tok_dir, "model.snr_gamma=5.0")
    t = torch.tensor([10, 500, 990])
    abar = model.noise_scheduler.alphas_cumprod[t].double()
    expected = torch.clamp(abar / (1 - abar), max=5.0) / (abar / (1 - abar))
    assert torch.allclose(model.loss_weights(t).double(), expected, atol=1e-6)
    assert torch.equal(make("lora_sd_tiny", tmp_path, tok_dir).loss_weights(t), torch.ones(3))


def test_v_prediction_target_and_weights(tmp_path: Path, tok_dir: Path) -> None:
    model = make(
        "lora_sd_tiny",
        tmp_path,
        tok_dir,
        "model.prediction_type=v_prediction",
        "model.snr_gamma=5.0",
    )
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 400, 999])
    abar = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    assert torch.allclose(model.target(latents, noise, t), v, atol=1e-6)
    snr = (abar / (1 - abar)).flatten()
    assert torch.allclose(model.loss_weights(t), torch.clamp(snr, max=5.0) / (snr + 1), atol=1e-6)
    # and the pipeline built for sampling inherits it
    assert model.pipeline().scheduler.config.prediction_type == "v_prediction"


def test_sdxl_time_ids_and_conditioning(tmp_path: Path, tok_dir: Path) -> None:
    ids = sdxl_time_ids(
        torch.tensor([[480, 640], [1024, 768]]), torch.tensor([[0, 12], [5, 0]]), (32, 32)
    )
    assert ids.shape == (2, 6) and ids.dtype == torch.float32
    assert ids.tolist() == [[480, 640, 0, 12, 32, 32], [1024, 768, 5, 0, 32, 32]]
    model = make("lora_sdxl_tiny", tmp_path, tok_dir)
    batch = fake_batch(2)
    cond = model.encode_prompts(batch["prompt"], batch["original_size"], batch["crop_top_left"])
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)  # 32 + 32, penultimate layers
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[480, 640, 0, 12, 32, 32]] * 2
    # without sizes: the target size and no crop
    plain = model.encode_prompts([PROMPT])["added_cond_kwargs"]["time_ids"]
    assert plain.tolist() == [[32, 32, 0, 0, 32, 32]]
    assert "added_cond_kwargs" not in make("lora_sd_tiny", tmp_path, tok_dir).encode_prompts(
        [PROMPT]
    )


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_holds_only_lora_weights_and_reloads(tmp_path: Path, tok_dir: Path) -> None:
    model = make("lora_sd_tiny", tmp_path, tok_dir, "model.optimizer.lr=1e-2")
    t = trainer(tmp_path)
    t.fit(model, train_dataloaders=loader())
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    lora = [n for n, _ in model.lora_parameters()]
    assert sorted(keys) == sorted(lora) and all(".lora_" in k for k in keys)
    assert len(ckpt["optimizer_states"]) == 1
    with every_weight():
        base_bytes = sum(v.numel() * 4 for v in model.state_dict().values())
    assert path.stat().st_size < 0.1 * base_bytes
    fresh = make("lora_sd_tiny", tmp_path, tok_dir)
    load_weights(fresh, path)
    for k in keys:
        assert torch.equal(fresh.state_dict()[k], ckpt["state_dict"][k]), k
    with pytest.raises(RuntimeError, match="does not match"):
        make("lora_sd_tiny", tmp_path, tok_dir, "model.lora.rank=2").load_state_dict(
            ckpt["state_dict"]
        )


def test_lr_scheduler_warms_up_per_optimizer_step(tmp_path: Path, tok_dir: Path) -> None:
    model = make("lora_sd_tiny", tmp_path, tok_dir, "model.scheduler.num_warmup_steps=4")
    t = trainer(tmp_path, max_steps=2)
    t.fit(model, train_dataloaders=loader(batches=2))
    opt = t.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * 2 / 4)


def test_adamw_8bit_needs_bitsandbytes_and_cuda() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="bitsandbytes"):
            adamw_8bit([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    else:  # pragma: no cover - not installed here
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="CUDA"):
                adamw_8bit([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)


# ------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_export_round_trip_through_load_lora_weights(
    arch: str, saved: dict[str, Path], tmp_path: Path, tok_dir: Path
) -> None:
    """A fresh pipeline from the same base + load_lora_weights == the module in memory."""
    from diffusers import DiffusionPipeline

    name = "lora_sdxl_tiny" if arch == "sdxl" else "lora_sd_tiny"
    model = make(
        name,
        tmp_path,
        tok_dir,
        "model.tiny=null",
        f"model.pretrained={saved[arch]}",
        "model.lora.init=false",  # random B: the adapters change the output
        "model.lora.alpha=8",  # scale alpha / rank = 2 must survive the file
        "model.lora.train_text_encoder=true",
        "model.export_format=[diffusers,kohya]",
        "model.sample_scheduler=null",
    ).eval()
    run = tmp_path / "run"
    model.export_weights(run / "model.safetensors")
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert (run / KOHYA_WEIGHT_NAME).is_file()

    pipe = DiffusionPipeline.from_pretrained(saved[arch], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        cond = model.encode_prompts([PROMPT])
        ours = model.unet(x, t, **cond).sample
        if arch == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
            theirs_cond = {
                "encoder_hidden_states": embeds,
                "added_cond_kwargs": {
                    "text_embeds": pooled,
                    "time_ids": cond["added_cond_kwargs"]["time_ids"],
                },
            }
        else:
            embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
            theirs_cond = {"encoder_hidden_states": embeds}
        theirs = pipe.unet(x, t, **theirs_cond).sample
        with model.adapters_disabled():
            base = model.unet(x, t, **cond).sample
    assert (ours - base).abs().max() > 1e-3  # LoRA is not a no-op here
    torch.testing.assert_close(embeds, cond["encoder_hidden_states"], rtol=0, atol=1e-6)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    # the same image with a fixed seed, 2 steps
    mine = model.sample([PROMPT], 1, torch.Generator().manual_seed(3))[0].image
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        guidance_scale=model.validation["guidance"],
        height=R,
        width=R,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    diff = np.abs(np.asarray(mine, np.int16) - np.asarray(out, np.int16))
    assert diff.max() <= 1

    # kohya file: A1111-style names, the configured alpha, and it loads to the same output
    from safetensors.torch import load_file

    kohya = load_file(str(run / KOHYA_WEIGHT_NAME))
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in kohya)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in kohya)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    assert (arch == "sdxl") == any(k.startswith("lora_te2_") for k in kohya)
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    pipe2 = DiffusionPipeline.from_pretrained(saved[arch], local_files_only=True)
    pipe2.load_lora_weights(run, weight_name=KOHYA_WEIGHT_NAME)
    with torch.no_grad():
        torch.testing.assert_close(pipe2.unet(x, t, **theirs_cond).sample, ours, rtol=0, atol=1e-5)

    # and genlab reads its own diffusers file back into a fresh module
    fresh = make(
        name,
        tmp_path,
        tok_dir,
        "model.tiny=null",
        f"model.pretrained={saved[arch]}",
        "model.lora.alpha=8",
        "model.lora.train_text_encoder=true",
    )
    load_weights(fresh, run / "pytorch_lora_weights.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------ class images


def test_class_images_generated_once_then_reused(tmp_path: Path, tok_dir: Path) -> None:
    class_dir = tmp_path / "class_images"
    model = make(
        "lora_sd_tiny",
        tmp_path,
        tok_dir,
        "model.prior_preservation.enabled=true",
        f"model.prior_preservation.class_dir={class_dir}",
        "model.prior_preservation.num_class_images=3",
        "model.prior_preservation.sample_batch_size=2",
        "model.prior_preservation.steps=2",
        "model.lora.init=false",
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.prepare_data()
    names = sorted(p.name for p in class_dir.iterdir())
    assert names == ["class_00000.png", "class_00001.png", "class_00002.png"]
    with Image.open(class_dir / "class_00001.png") as im:
        assert im.size == (R, R)
        first = np.asarray(im.convert("RGB")).copy()
    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    assert model.generate_class_images() == 0  # enough images: nothing generated
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamps
    # a lost image is regenerated alone, identically (seeded per index, base model)
    (class_dir / "class_00001.png").unlink()
    assert model.generate_class_images() == 1
    with Image.open(class_dir / "class_00001.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), first)
    # the base model drew them: LoRA (random B here) was off, and is on again afterwards
    with model.adapters_disabled():
        base_image = model.generate(
            ["a photo of toy"], [torch.Generator().manual_seed(1)], steps=2, guidance=7.5
        )[0]
    assert np.array_equal(np.asarray(base_image), first)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(p.name.startswith(".") for p in class_dir.iterdir())


# ------------------------------------------------------------------------------------ validation


def test_validation_logs_loss_writes_samples_and_calls_the_metric_seam(
    tmp_path: Path, tok_dir: Path
) -> None:
    calls = []

    def scorer(images, prompts, references):
        calls.append((images, prompts, references))
        return {"dino": 0.25, "per_prompt": {"ignored": 1.0}}

    model = make(
        "lora_sd_tiny",
        tmp_path,
        tok_dir,
        "model.validation.prompts=[a photo of sksToy toy,a sksToy toy on a beach]",
        "model.validation.num_images=2",
        "model.validation.baseline=false",  # the base-model scores: tests/unit/test_lora_metrics.py
    )
    model.metrics = scorer
    t = trainer(tmp_path, limit_val_batches=None, num_sanity_val_steps=1)
    t.fit(model, train_dataloaders=loader(), val_dataloaders=loader(batches=2, n=3))
    assert math.isfinite(float(t.callback_metrics["val/loss"]))
    assert float(t.callback_metrics["val/dino"]) == 0.25
    ((images, prompts, references),) = calls  # not during the sanity check
    assert len(images) == 4 and all(im.size == (R, R) for im in images)
    assert prompts == ["a photo of sksToy toy"] * 2 + ["a sksToy toy on a beach"] * 2
    assert len(references) == 6  # every val photo, as images
    step = tmp_path / "samples" / "step_000001"
    assert (step / "grid.png").is_file()
    assert len([p for p in step.glob("*.png") if p.name != "grid.png"]) == 4
    # fixed seeds: validating again gives the same val loss and the same images
    first = float(t.callback_metrics["val/loss"])
    t.validate(model, dataloaders=loader(batches=2, n=3), verbose=False)
    assert float(t.callback_metrics["val/loss"]) == pytest.approx(first, abs=1e-6)
    assert np.array_equal(np.asarray(calls[-1][0][0]), np.asarray(images[0]))
