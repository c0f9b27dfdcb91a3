"""The multi-view diffusion module on its tiny config: batch layout, training step, checkpoints,
pretrained loading (conv_in widening), offline errors, LPIPS fallback and sampling."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from genlab.models.mv_diffusion import MultiViewDiffusion
from genlab.models.mv_diffusion.module import (
    camera_layout,
    interleave_domains,
    prepare_condition_image,
)
from genlab.models.mv_diffusion.networks import (
    TINY_IMAGE_ENCODER,
    TINY_UNET,
    TINY_VAE,
    build_image_encoder,
    build_unet,
    build_vae,
)
from genlab.pretrained import WeightsUnavailableError
from tests.helpers import CONF_DIR

B, N, S = 2, 4, 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=mvds", "data.root=unused", *overrides])
    return cfg.model


@pytest.fixture(scope="module")
def tiny_cfg():
    return model_config("model=mv_diffusion_tiny")


@pytest.fixture(scope="module")
def tiny(tiny_cfg) -> MultiViewDiffusion:
    torch.manual_seed(0)
    return instantiate(tiny_cfg)


def fake_batch(b: int = B, n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {}
    cond = torch.rand(b, 1, 3, S, S, generator=g).expand(b, n, 3, S, S)
    batch["image_cond"] = cond.contiguous()
    batch["image_target"] = torch.rand(b, n, 3, S, S, generator=g)
    batch["normal_target"] = torch.rand(b, n, 3, S, S, generator=g)
    for key in ("image_cond", "image_target", "normal_target"):
        batch[f"{key}_vae"] = batch[key] * 2 - 1
    batch["image_cond_CLIP"] = torch.randn(b, 1, 3, 224, 224, generator=g).expand(b, n, 3, 224, 224)
    batch["camera_embed_image"] = torch.randn(b, n, 10, generator=g)
    batch["camera_embed_normal"] = torch.randn(b, n, 10, generator=g)
    return batch


class CaptureUNet:
    """Records the UNet's inputs (sample, encoder_hidden_states, class_labels) of each call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append(
            {
                "sample": args[0].detach().clone(),
                "timestep": args[1].detach().clone(),
                "context": kwargs["encoder_hidden_states"].detach().clone(),
                "class_labels": kwargs["class_labels"].detach().clone(),
            }
        )

    def __enter__(self) -> CaptureUNet:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# ---- config ------------------------------------------------------------------------------
def test_tiny_config_is_the_tiny_networks(tiny_cfg) -> None:
    c = OmegaConf.to_container(tiny_cfg, resolve=True)
    assert c["pretrained"] is None
    assert c["unet"]["config"] == TINY_UNET
    assert c["vae"]["config"] == TINY_VAE
    assert c["image_encoder"]["config"] == TINY_IMAGE_ENCODER


# ---- batch layout ------------------------------------------------------------------------
def test_interleave_domains_order() -> None:
    rgb = torch.arange(B * N).view(B, N) * 10
    normal = rgb + 1
    flat = interleave_domains(rgb, normal)
    expected = [(b * N + n) * 10 + d for b in range(B) for d in range(2) for n in range(N)]
    assert flat.tolist() == expected


def test_unet_batch_shapes_order_and_camera_routing(tiny: MultiViewDiffusion, monkeypatch) -> None:
    batch = fake_batch()
    deterministic = tiny.encode_latents
    monkeypatch.setattr(tiny, "encode_latents", lambda px, sample=True: deterministic(px, False))
    inputs = tiny.unet_batch(batch)
    total = B * 2 * N
    assert inputs["latents"].shape == (total, 4, S // 8, S // 8)
    assert inputs["cond_latents"].shape == (B, 4, S // 8, S // 8)
    assert inputs["image_embeds"].shape == (B, 32)
    assert inputs["class_labels"].shape == (total, 10)
    for b in range(B):
        for d, (img_key, cam_key) in enumerate(
            [
                ("image_target_vae", "camera_embed_image"),
                ("normal_target_vae", "camera_embed_normal"),
            ]
        ):
            for n in range(N):
                row = (b * 2 + d) * N + n
                torch.testing.assert_close(inputs["class_labels"][row], batch[cam_key][b, n])
                expected = deterministic(batch[img_key][b, n][None], False)[0]
                torch.testing.assert_close(inputs["latents"][row], expected, rtol=1e-4, atol=1e-4)

    # what the UNet receives in a training step: the conditioning latent of object b in
    # channels 4-7 of all its 2N samples, its CLIP embedding as the only context token, one
    # timestep per object, and the camera embeddings in (object, domain, view) order
    with CaptureUNet(tiny.unet) as cap:
        tiny.diffusion_loss(batch, cond_dropout=0.0)
    call = cap.calls[0]
    assert call["sample"].shape == (total, 8, S // 8, S // 8)
    assert call["context"].shape == (total, 1, 32)
    per_object = call["timestep"].view(B, 2 * N)
    assert (per_object == per_object[:, :1]).all()
    for b in range(B):
        rows = slice(b * 2 * N, (b + 1) * 2 * N)
        torch.testing.assert_close(
            call["sample"][rows, 4:], inputs["cond_latents"][b].expand(2 * N, -1, -1, -1)
        )
        torch.testing.assert_close(
            call["context"][rows, 0], inputs["image_embeds"][b].expand(2 * N, -1)
        )
    torch.testing.assert_close(call["class_labels"], inputs["class_labels"])


def test_wrong_number_of_views_is_a_clear_error(tiny: MultiViewDiffusion) -> None:
    with pytest.raises(ValueError, match="data.num_views=4 or model.num_views=3"):
        tiny.unet_batch(fake_batch(n=3))


def test_cond_dropout_zeroes_clip_and_latent_per_object(tiny: MultiViewDiffusion) -> None:
    batch = fake_batch()
    with CaptureUNet(tiny.unet) as cap:
        tiny.diffusion_loss(batch, cond_dropout=1.0)
        tiny.diffusion_loss(batch, cond_dropout=0.0)
    dropped, kept = cap.calls
    assert torch.count_nonzero(dropped["context"]) == 0
    assert torch.count_nonzero(dropped["sample"][:, 4:]) == 0
    assert (
        torch.count_nonzero(kept["context"]) > 0 and torch.count_nonzero(kept["sample"][:, 4:]) > 0
    )


# ---- training ----------------------------------------------------------------------------
class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int = 2) -> None:
        self.items = [{k: v[0] for k, v in fake_batch(b=1, seed=i).items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def fit_steps(model: MultiViewDiffusion, steps: int, tmp_path: Path) -> None:
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(Batches(), batch_size=2))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_step_changes_only_trainable_weights(tiny_cfg, tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    model = instantiate(tiny_cfg, trainable_modules=["attn1", "class_embedding"])
    before = {name: snapshot(getattr(model, name)) for name in ("unet", "vae", "image_encoder")}
    loss = model.diffusion_loss(fake_batch())["loss"]
    assert torch.isfinite(loss)
    with caplog.at_level(logging.INFO, logger="genlab.models.mv_diffusion.module"):
        fit_steps(model, 1, tmp_path)
    assert "UNet batch: 2 objects x 2 domains x 4 views = 16 images per step" in caplog.text
    assert model.hparams["unet_batch_size"] == 16
    for name in ("vae", "image_encoder"):
        after = getattr(model, name).state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in after), name
    changed = {
        k for k, v in model.unet.state_dict().items() if not torch.equal(before["unet"][k], v)
    }
    assert changed and all("attn1" in k or k.startswith("class_embedding.") for k in changed)
    assert any("attn1.to_q" in k for k in changed)
    assert "conv_in.weight" not in changed


def test_loss_falls_when_overfitting_one_batch(tiny_cfg) -> None:
    torch.manual_seed(0)
    model = instantiate(tiny_cfg, cond_dropout=0.0)
    optimizer = model.configure_optimizers()
    batch = fake_batch()
    losses = []
    for _ in range(25):
        # the same noise and timesteps every step: only the weights change the loss
        loss = model.diffusion_loss(batch, generator=torch.Generator().manual_seed(1))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.6 * losses[0], losses


def test_ema_tracks_the_unet_and_is_checkpointed(tiny_cfg, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = instantiate(tiny_cfg, ema_decay=0.99)
    fit_steps(model, 2, tmp_path)
    state = model.state_dict()
    ema_keys = [k for k in state if k.startswith("ema_unet.module.")]
    assert ema_keys and int(state["ema_unet.n_averaged"]) == 2
    w, e = model.unet.conv_in.weight, model.ema_unet.module.conv_in.weight
    assert not torch.equal(w, e) and model.sampling_unet is model.ema_unet.module
    assert not any(p.requires_grad for p in model.ema_unet.parameters())


def test_checkpoint_leaves_out_frozen_parts_and_round_trips(tiny_cfg, tiny) -> None:
    state = tiny.state_dict()
    assert not any(k.startswith(("vae.", "image_encoder.", "lpips.")) for k in state)
    assert any(k.startswith("unet.conv_in") for k in state)
    torch.manual_seed(123)  # a different global seed: the frozen parts are seeded by config
    fresh = instantiate(tiny_cfg)
    fresh.load_state_dict(copy.deepcopy(state))
    batch = fake_batch(b=1)
    kwargs = dict(num_inference_steps=2, guidance_scale=2.0)
    a = tiny.generate_views(
        batch["image_cond"][:, 0],
        batch["camera_embed_image"],
        batch["camera_embed_normal"],
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    b = fresh.generate_views(
        batch["image_cond"][:, 0],
        batch["camera_embed_image"],
        batch["camera_embed_normal"],
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    torch.testing.assert_close(a.rgb, b.rgb)
    torch.testing.assert_close(a.normal, b.normal)


def test_v_prediction_trains_and_samples(tiny_cfg) -> None:
    torch.manual_seed(0)
    model = instantiate(
        tiny_cfg, noise_scheduler={"prediction_type": "v_prediction"}, snr_gamma=5.0
    )
    assert model.prediction_type == "v_prediction"
    losses = model.diffusion_loss(fake_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    out = model.generate_views(
        fake_batch(b=1)["image_cond"][:, 0],
        *camera_layout(20, [0] * N, [0, 90, 180, 270]),
        num_inference_steps=2,
    )
    assert out.rgb.shape == (1, N, 3, S, S) and torch.isfinite(out.normal).all()


# ---- pretrained weights ------------------------------------------------------------------
def test_missing_weights_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for build in (build_unet, build_vae, build_image_encoder):
        with pytest.raises(WeightsUnavailableError) as info:
            build(pretrained="lambdalabs/sd-image-variations-diffusers")
        msg = str(info.value)
        assert "\n" not in msg
        assert "lambdalabs/sd-image-variations-diffusers" in msg
        assert "model.pretrained=" in msg and "model=mv_diffusion_tiny" in msg
    # the same error through the config, as train.py builds it
    with pytest.raises(Exception) as info:
        instantiate(model_config("model=mv_diffusion"))
    causes, err = [], info.value
    while err is not None:
        causes.append(err)
        err = err.__cause__
    assert any(isinstance(e, WeightsUnavailableError) for e in causes)


def test_local_pretrained_unet_gets_a_widened_conv_in(tmp_path: Path, caplog) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    base = UNet2DConditionModel(**{**TINY_UNET, "in_channels": 4}).eval()
    base.save_pretrained(tmp_path / "ckpt" / "unet")
    with caplog.at_level(logging.INFO, logger="genlab.models.mv_diffusion.networks"):
        unet = build_unet(pretrained=str(tmp_path / "ckpt"), zero_init_camera_projection=True)
    assert "conv_in widened from 4 to 8 input channels" in caplog.text
    w = unet.conv_in.weight
    assert w.shape[1] == 8 and torch.count_nonzero(w[:, 4:]) == 0
    torch.testing.assert_close(w[:, :4], base.conv_in.weight)
    # zero extra channels + zero camera projection output: the image-variation UNet, unchanged
    x = torch.randn(3, 4, 8, 8)
    cond = torch.randn(3, 4, 8, 8)
    ctx = torch.randn(3, 1, 32)
    t = torch.tensor([5, 50, 500])
    with torch.no_grad():
        expected = base(x, t, encoder_hidden_states=ctx).sample
        got = unet(
            torch.cat([x, cond], 1), t, encoder_hidden_states=ctx, class_labels=torch.randn(3, 10)
        ).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the UNet folder itself works too, and a saved multi-view UNet loads as it is
    again = build_unet(pretrained=str(tmp_path / "ckpt" / "unet"))
    assert again.conv_in.weight.shape[1] == 8
    unet.save_pretrained(tmp_path / "mv_unet")
    reloaded = build_unet(pretrained=str(tmp_path / "mv_unet"), zero_init_camera_projection=False)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


def test_local_pretrained_vae_and_image_encoder_load(tmp_path: Path) -> None:
    vae = build_vae(config=TINY_VAE, seed=1)
    enc = build_image_encoder(config=TINY_IMAGE_ENCODER, seed=1)
    vae.save_pretrained(tmp_path / "vae")
    enc.save_pretrained(tmp_path / "image_encoder")
    vae2 = build_vae(pretrained=str(tmp_path))
    enc2 = build_image_encoder(pretrained=str(tmp_path))
    assert not any(p.requires_grad for p in [*vae2.parameters(), *enc2.parameters()])
    for a, b in ((vae, vae2), (enc, enc2)):
        sb = b.state_dict()
        assert all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


# ---- LPIPS -------------------------------------------------------------------------------
def test_lpips_without_backbone_weights_warns_once_or_fails_clearly(
    tiny_cfg, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    import urllib.error

    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    model = instantiate(tiny_cfg, lpips="auto")
    with caplog.at_level(logging.WARNING, logger="genlab.models.mv_diffusion.module"):
        model.setup("fit")
        model.setup("fit")
    assert model.lpips is None
    warnings = [r for r in caplog.records if "LPIPS is off" in r.getMessage()]
    assert len(warnings) == 1 and "no network" in warnings[0].getMessage()
    strict = instantiate(tiny_cfg, lpips=True)
    with pytest.raises(WeightsUnavailableError) as info:
        strict.setup("fit")
    assert "\n" not in str(info.value) and "model.lpips=false" in str(info.value)
    off = instantiate(tiny_cfg, lpips="false")
    off.setup("fit")
    assert off.lpips is None


def test_validation_samples_scores_and_writes_views(
    tiny_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Trainer.validate: val loss, PSNR/SSIM/LPIPS per domain, PNGs + grid of the sampled views.

    The LPIPS backbone gets random stand-in weights (the real ones are a download).
    """
    import torchvision
    import torchvision.models._api as tv_api

    monkeypatch.setattr(
        tv_api,
        "load_state_dict_from_url",
        lambda *a, **k: torchvision.models.alexnet().state_dict(),
    )
    torch.manual_seed(0)
    model = instantiate(tiny_cfg, num_inference_steps=2, num_val_objects=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    batches = Batches(3)
    for item in batches.items:  # targets in [0, 1] as the data module gives them
        item["image_target"] = (item["image_target_vae"] + 1) / 2
        item["normal_target"] = (item["normal_target_vae"] + 1) / 2
    (metrics,) = trainer.validate(model, DataLoader(batches, batch_size=2))
    for key in ("val/loss", "val/loss_rgb", "val/loss_normal"):
        assert np.isfinite(metrics[key]), key
    for domain in ("rgb", "normal"):
        assert 0 < metrics[f"val/psnr_{domain}"] < 60
        assert -1 <= metrics[f"val/ssim_{domain}"] <= 1
        assert metrics[f"val/lpips_{domain}"] >= 0
    out = tmp_path / "samples" / "step_000000"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["grid.png", "obj00_input.png"]
        + [f"obj00_{d}_{v:02d}.png" for d in ("rgb", "normal") for v in range(N)]
    )
    assert "lpips." not in " ".join(model.state_dict())


def test_hyperparameters_are_plain_python(tiny_cfg) -> None:
    """Checkpoints are loaded with weights_only=True: no OmegaConf objects in hparams."""
    import io

    model = instantiate(tiny_cfg, trainable_modules=["attn1"], view_azimuths=[0, 10, 20, 30])
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": dict(model.hparams)}, buffer)
    buffer.seek(0)
    hp = torch.load(buffer, weights_only=True)["hyper_parameters"]
    assert hp["trainable_modules"] == ["attn1"] and hp["view_azimuths"] == [0.0, 10.0, 20.0, 30.0]


# ---- sampling ----------------------------------------------------------------------------
def test_sample_gives_rgb_and_normal_views_per_condition(tiny: MultiViewDiffusion) -> None:
    rgba = Image.new("RGBA", (80, 60), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (10, 10, 30, 40))
    tensor_image = torch.rand(3, 32, 32)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    tiny.hparams.num_inference_steps = 2
    try:
        samples = tiny.sample(["", rgba, tensor_image], 1, gen())
        again = tiny.sample(["", rgba, tensor_image], 1, gen())
    finally:
        tiny.hparams.num_inference_steps = 8
    assert len(samples) == 3 * 2 * N
    assert [s.prompt for s in samples[: 2 * N]] == [
        *(f"rgb view {v}" for v in range(N)),
        *(f"normal view {v}" for v in range(N)),
    ]
    assert samples[2 * N].prompt == "image 1 rgb view 0"
    assert all(s.image.size == (S, S) for s in samples)
    for a, b in zip(samples, again, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_condition_image_background_and_recentering() -> None:
    rgba = Image.new("RGBA", (100, 50), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 10, 10))  # a small red square in the corner
    plain = np.asarray(prepare_condition_image(rgba, 32, background=(0.0, 0.0, 1.0)))
    assert plain.shape == (32, 32, 3) and tuple(plain[16, 16]) == (0, 0, 255)
    centred = np.asarray(prepare_condition_image(rgba, 32, recenter=True, object_scale=0.5))
    assert tuple(centred[16, 16]) == (255, 0, 0) and tuple(centred[1, 1]) == (255, 255, 255)
    red = (centred[..., 0] > 200) & (centred[..., 1] < 60)
    assert 12 <= red.sum(axis=1).max() <= 20  # the square spans about half the width
    # an opaque RGBA photo (what read_image gives for a JPEG) is not recentred
    opaque = Image.new("RGBA", (64, 32), (0, 255, 0, 255))
    assert np.asarray(prepare_condition_image(opaque, 16, recenter=True)).min(
        axis=(0, 1)
    ).tolist() == [0, 255, 0]


def test_camera_layout_uses_the_data_embedding() -> None:
    image, normal = camera_layout(20.0, [0.0, 10.0], [0.0, 90.0])
    assert image.shape == normal.shape == (2, 10)
    x = torch.tensor([[20.0, 0.0, 0.0], [20.0, 10.0, 90.0]]).deg2rad()
    torch.testing.assert_close(image[:, :3], x.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(image[:, 5:8], x.cos(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(image[:, 3:5].numpy(), [[0.0, np.sin(1.0)]] * 2, atol=1e-6)
    np.testing.assert_allclose(normal[:, 3:5].numpy(), [[np.sin(1.0), 0.0]] * 2, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        camera_layout(80.0, [20.0], [0.0])
