"""Shap-E prior fine-tuning: training maths vs the diffusers sampler, conditioning, the module."""

from __future__ import annotations

import functools
import json
import logging
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from genlab.data.objaverse import ObjaverseObject
from genlab.models.shape_e.components import LatentShapeError, tiny_components
from genlab.models.shape_e.module import ShapEPriorFineTune
from genlab.models.shape_e.prior_adapters import LORA_WEIGHT_NAME, TrainableEMA
from genlab.models.shape_e.prior_training import (
    SigmaSchedule,
    add_noise_for_training,
    diffusion_training_target,
    drop_condition,
    prior_loss,
    sample_latents,
    text_condition,
)

CAPTION = "a red vase with patterns"


def _components(conditioning: str = "text"):
    return tiny_components(conditioning, seed=0)


def _module(conditioning: str = "text", lr: float = 1e-3, **kwargs) -> ShapEPriorFineTune:
    return ShapEPriorFineTune(
        components=_components(conditioning),
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        conditioning=conditioning,
        seed=0,
        **kwargs,
    )


def _sampler(scheduler, steps: int):
    sampler = type(scheduler).from_config(scheduler.config)
    sampler.set_timesteps(steps)
    return sampler


# ------------------------------------------------------------------------------ maths


def test_model_input_is_scaled_scheduler_noising_at_the_samplers_sigmas():
    parts = _components()
    schedule = SigmaSchedule(parts.scheduler)
    sampler = _sampler(parts.scheduler, 8)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 64, 32, generator=gen) * 2 - 1
    noise = torch.randn(1, 64, 32, generator=gen)
    checked = 0
    for index, t in enumerate(sampler.timesteps):
        expected_noisy = sampler.add_noise(x0, noise, t[None])
        sampler._step_index = index
        expected_input = sampler.scale_model_input(expected_noisy, t)
        ours = diffusion_training_target(x0, noise, t[None], schedule, "sample")
        torch.testing.assert_close(ours.noisy, expected_noisy, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ours.model_input, expected_input, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.target, x0)
        checked += 1
    assert checked == len(sampler.timesteps) == 15  # Heun: 1 + 2 * 7 calls


def test_integer_timesteps_give_the_ddpm_marginal_of_the_exp_schedule():
    parts = _components()
    schedule = SigmaSchedule(parts.scheduler)
    abar = parts.scheduler.alphas_cumprod
    assert schedule.num_train_timesteps == 1024
    # the exp schedule: abar(t) ~ exp(-12 t / T)
    assert abs(math.log(float(abar[511])) - (-12 * 512 / 1024)) < 0.05
    t = torch.tensor([0.0, 17.0, 512.0, 1023.0])
    x0, noise = torch.randn(4, 64, 32), torch.randn(4, 64, 32)
    _, model_input = add_noise_for_training(x0, noise, schedule.sigma_at(t))
    a = abar[t.long()].reshape(-1, 1, 1)
    torch.testing.assert_close(
        model_input, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-5, rtol=1e-4
    )


def test_timesteps_passed_to_the_prior_are_the_samplers():
    parts = _components()
    schedule = SigmaSchedule(parts.scheduler)
    sampler = _sampler(parts.scheduler, 16)
    # sigma -> timestep value as the sampler's _sigma_to_t, and back
    torch.testing.assert_close(
        schedule.timestep_for(sampler.sigmas[:-1]), sampler.timesteps, atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        schedule.sigma_at(sampler.timesteps), sampler.sigmas[:-1], rtol=1e-4, atol=1e-6
    )
    seen: list[torch.Tensor] = []
    prior = parts.prior
    forward = prior.forward

    def recording(*args, **kwargs):
        seen.append(torch.as_tensor(kwargs["timestep"]).clone())
        return forward(*args, **kwargs)

    prior.forward = recording
    cond = text_condition(parts.text_encoder, parts.tokenizer, [CAPTION])
    sample_latents(prior, parts.scheduler, cond, 3.0, 16, torch.Generator().manual_seed(0))
    assert torch.equal(torch.stack(seen), sampler.timesteps)


def test_sampling_loop_equals_the_diffusers_pipeline():
    from diffusers import ShapEPipeline

    parts = _components()
    pipe = ShapEPipeline(
        prior=parts.prior,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        scheduler=parts.scheduler,
        shap_e_renderer=parts.renderer,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        [CAPTION, "a chair"],
        num_images_per_prompt=2,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    cond = text_condition(parts.text_encoder, parts.tokenizer, [CAPTION, "a chair"])
    ours = sample_latents(
        parts.prior, parts.scheduler, cond, 3.0, 4, torch.Generator().manual_seed(7), None, 2
    )
    assert ours.shape == (4, 64, 32)
    assert torch.equal(ours, theirs)


def test_condition_dropout_uses_the_pipelines_unconditional_zeros():
    parts = _components()
    pipe_like = SimpleNamespace(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder)
    from diffusers import ShapEPipeline

    guided = ShapEPipeline._encode_prompt(pipe_like, [CAPTION] * 8, "cpu", 1, True)
    cond = text_condition(parts.text_encoder, parts.tokenizer, [CAPTION] * 8)
    torch.testing.assert_close(cond, guided[8:])
    # the text condition: unit-norm projection times sqrt(dim)
    torch.testing.assert_close(cond.norm(dim=-1), torch.full((8,), math.sqrt(cond.shape[1])))
    dropped_cond, dropped = drop_condition(cond, 0.5, torch.Generator().manual_seed(3))
    assert 0 < int(dropped.sum()) < 8
    assert torch.equal(dropped_cond[dropped], guided[:8][dropped])  # the pipeline's zeros
    assert torch.equal(dropped_cond[~dropped], cond[~dropped])
    assert not drop_condition(cond, 0.0)[1].any()
    assert torch.count_nonzero(drop_condition(cond, 1.0)[0]) == 0
    # image tokens (B, T, H): whole rows
    tokens = torch.randn(6, 16, 32)
    out, mask = drop_condition(tokens, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out[mask], torch.zeros_like(tokens[mask]))
    assert torch.equal(out[~mask], tokens[~mask])
    with pytest.raises(ValueError, match="cond_dropout"):
        drop_condition(cond, 1.5)


def test_loss_uses_the_mean_channels_and_min_snr_weights():
    target = torch.zeros(2, 4, 3)
    prediction = torch.cat([torch.ones(2, 4, 3), 100 * torch.ones(2, 4, 3)], dim=-1)
    assert float(prior_loss(prediction, target)) == pytest.approx(1.0)  # variance ignored
    sigmas = torch.tensor([0.1, 10.0])  # SNR 100 and 0.01
    weighted = prior_loss(prediction, target, sigmas, snr_gamma=5.0)
    assert float(weighted) == pytest.approx((5.0 + 0.01) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="does not fit target"):
        prior_loss(torch.zeros(2, 4, 5), target)


def test_overfit_one_latent_then_sample_converges_to_it():
    torch.manual_seed(0)
    module = _module(lr=1e-2, cond_dropout=0.0, timestep_sampling="continuous")
    prior, parts = module.prior, module.components
    target = torch.rand(1, 64, 32, generator=torch.Generator().manual_seed(5)) * 1.6 - 0.8
    cond = text_condition(parts.text_encoder, parts.tokenizer, [CAPTION])

    def distance_of_sample() -> float:
        prior.eval()
        sample = sample_latents(
            prior, parts.scheduler, cond, 1.0, 16, torch.Generator().manual_seed(1)
        )
        prior.train()
        return float((sample - target).pow(2).mean().sqrt())

    before = distance_of_sample()
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    batch = target.expand(8, -1, -1)
    losses = []
    for _ in range(150):
        loss = module.diffusion_loss(batch, cond.expand(8, -1), gen, 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    after = distance_of_sample()
    # measured (1 thread): RMS distance 0.73 untrained -> 0.09 after 150 steps
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:20])
    assert after < 0.25 * before, (before, after)
    assert after < 0.15


# ------------------------------------------------------------------------------ module


def _one_step_trainer(root) -> pl.Trainer:
    return pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(root),
        accelerator="cpu",
    )


def test_nan_batch_skips_the_step_and_keeps_the_weights(tmp_path, caplog):
    module = _module()
    before = {n: p.detach().clone() for n, p in module.prior.named_parameters()}
    bad = {
        "latent": torch.full((2, 64, 32), float("nan")),
        "caption": [CAPTION] * 2,
        "object_id": ["a", "b"],
    }
    trainer = _one_step_trainer(tmp_path)
    loader = DataLoader([bad], batch_size=None)
    with caplog.at_level(logging.WARNING, logger="genlab.models.shape_e.module"):
        trainer.fit(module, train_dataloaders=loader)
    assert module.skipped_steps == 1
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert any("non-finite loss" in r.message for r in caplog.records)
    for name, param in module.prior.named_parameters():
        assert torch.equal(param, before[name]), name
    # a finite batch afterwards does train
    good = {
        "latent": torch.rand(2, 64, 32) - 0.5,
        "caption": [CAPTION] * 2,
        "object_id": ["a", "b"],
    }
    trainer = _one_step_trainer(tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader([good], batch_size=None))
    assert any(not torch.equal(p, before[n]) for n, p in module.prior.named_parameters())


def test_lora_and_full_train_different_parameter_sets(tmp_path):
    full = _module()
    names = {n for n, _ in full.prior.named_parameters()}
    # everything the forward uses (unCLIP's clip_mean / clip_std are not)
    assert {n for n, _ in full.trainable_parameters()} == names - {"clip_mean", "clip_std"}
    partly = _module(frozen=["time_embedding", "embedding_proj"])
    trained = {n for n, _ in partly.trainable_parameters()}
    assert trained and not any(
        n.startswith(("time_embedding.", "embedding_proj.")) for n in trained
    )
    assert any(n.startswith("transformer_blocks.") for n in trained)
    with pytest.raises(ValueError, match="names no parameter of the prior"):
        _module(frozen=["no_such_part"])

    lora = _module(finetune="lora", lora={"rank": 4, "alpha": 4})
    lora_names = {n for n, _ in lora.trainable_parameters()}
    assert lora_names and all(".lora_A." in n or ".lora_B." in n for n in lora_names)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_names}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    # checkpoints hold only the adapters; export writes them as safetensors, loadable elsewhere
    state = lora.state_dict()
    assert set(state) == {f"prior.{n}" for n in lora_names}
    with torch.no_grad():
        for _, p in lora.trainable_parameters():
            p.add_(0.5)
    lora.export_weights(tmp_path / "model.safetensors")
    fresh = _module(finetune="lora", lora={"rank": 4, "alpha": 4})
    assert fresh.load_lora_weights(tmp_path / LORA_WEIGHT_NAME) == len(lora_names)
    for (n, a), (_, b) in zip(
        lora.trainable_parameters(), fresh.trainable_parameters(), strict=True
    ):
        assert torch.equal(a, b), n
    other = _module(finetune="lora", lora={"rank": 8, "alpha": 8})
    with pytest.raises(ValueError, match=r"another shape.*model\.lora\.rank"):
        other.load_lora_weights(tmp_path / LORA_WEIGHT_NAME)


def test_ema_averages_the_trained_weights_only():
    module = _module(finetune="lora", lora={"rank": 4}, ema={"enabled": True, "decay": 0.9})
    ema = module.ema
    assert isinstance(ema, TrainableEMA)
    assert set(ema.names) == {n for n, _ in module.trainable_parameters()}
    name, param = next(iter(module.trainable_parameters()))
    start = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    ema.update(module.prior)
    shadow = ema.shadows()[ema.names.index(name)]
    torch.testing.assert_close(shadow, start + 0.1)  # 0.9 * start + 0.1 * (start + 1)
    with module.sampling_weights():
        torch.testing.assert_close(param, start + 0.1)
    torch.testing.assert_close(param, start + 1.0)
    assert any(k.startswith("ema.") for k in module.state_dict())


def test_latent_shape_errors_name_the_file(tmp_path):
    module = _module()
    root = tmp_path / "objects"
    (root / "latents").mkdir(parents=True)
    bad = root / "latents" / "vase_0001.pt"
    torch.save(torch.zeros(1024, 1024), bad)
    datamodule = SimpleNamespace(
        root=root, load=("latent",), splits={"train": [ObjaverseObject("vase_0001", latent=bad)]}
    )
    module._trainer = SimpleNamespace(datamodule=datamodule)
    with pytest.raises(LatentShapeError, match=r"vase_0001\.pt.*\(1024, 1024\).*\(64, 32\)"):
        module.setup("fit")
    # no latents folder: one error naming the encode step
    empty = tmp_path / "bare"
    empty.mkdir()
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(root=empty, load=("latent",)))
    with pytest.raises(FileNotFoundError, match="genlab.models.shape_e.encode"):
        module.setup("fit")
    module._trainer = None
    with pytest.raises(LatentShapeError, match="latents of objects"):
        module._batch_latents({"latent": torch.zeros(2, 64, 33), "object_id": ["x", "y"]})


def test_latents_outside_the_samplers_clip_range_are_reported(caplog):
    inside, outside = _module(), _module()
    with caplog.at_level(logging.WARNING, logger="genlab.models.shape_e.module"):
        inside._batch_latents({"latent": torch.full((1, 64, 32), 0.5), "object_id": ["ok"]})
        assert not caplog.records
        for _ in range(2):  # checked on the first batch (or file) only
            outside._batch_latents({"latent": torch.full((1, 64, 32), 3.0), "object_id": ["far"]})
    warned = [r.message for r in caplog.records]
    assert len(warned) == 1 and "outside [-1, 1]" in warned[0] and "far" in warned[0]


def test_custom_diffusion_config_file_overrides_the_scheduler(tmp_path):
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"prediction_type": "epsilon", "num_train_timesteps": 512}))
    module = _module(diffusion_config=str(path))
    assert module.prediction_type == "epsilon"
    assert module.schedule.num_train_timesteps == 512
    assert module.scheduler.config.beta_schedule == "exp"  # the rest stays the released one
    noised = diffusion_training_target(
        torch.ones(1, 2, 2),
        torch.full((1, 2, 2), 2.0),
        torch.tensor([3.0]),
        module.schedule,
        module.prediction_type,
    )
    assert torch.equal(noised.target, torch.full((1, 2, 2), 2.0))
    with pytest.raises(FileNotFoundError, match="diffusion_config"):
        _module(diffusion_config=str(tmp_path / "missing.yaml"))


def test_image_conditioning_matches_the_img2img_pipeline():
    from diffusers import ShapEImg2ImgPipeline

    module = _module("image")
    parts = module.components
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    ours = module.encode_condition(images=images)
    pipe_like = SimpleNamespace(
        image_encoder=parts.image_encoder, image_processor=parts.image_processor
    )
    from genlab.models.shape_e.prior_training import images_to_pixels

    pixels = images_to_pixels(parts.image_processor, images)
    theirs = ShapEImg2ImgPipeline._encode_image(pipe_like, pixels, "cpu", 1, True)
    assert ours.shape == (2, 16, 32)  # 4 x 4 patches of the 32 px tiny tower, no class token
    torch.testing.assert_close(ours, theirs[2:])
    assert torch.count_nonzero(theirs[:2]) == 0
    out = module.prior(
        torch.zeros(2, 64, 32), timestep=torch.tensor([5.0, 5.0]), proj_embedding=ours
    )
    assert out.predicted_image_embedding.shape == (2, 64, 64)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        module = _module(gradient_checkpointing=checkpointing)
        latents = torch.rand(2, 64, 32, generator=torch.Generator().manual_seed(0)) - 0.5
        cond = module.encode_condition(captions=[CAPTION, "a chair"])
        loss = module.diffusion_loss(latents, cond, torch.Generator().manual_seed(1), 0.0)
        loss.backward()
        return {n: p.grad.clone() for n, p in module.prior.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any(n.startswith("transformer_blocks.") for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_empty_meshes_are_counted_and_left_out_of_the_geometry(caplog):
    import trimesh

    from genlab.models.shape_e.module import Generated, _ValObjects

    module = _module(validation={"metric_points": 256, "fscore_threshold": 0.25})
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    cloud = torch.from_numpy(box.sample(1000, seed=0)).float()
    objects = _ValObjects(["a", "b", "c"], ["a box", "a ball", "a cone"], [], [cloud, cloud, None])
    frames = np.zeros((3, 2, 8, 8, 3), dtype=np.uint8)
    generated = Generated(torch.zeros(3, 64, 32), [None, box, box], frames, objects.captions)
    with caplog.at_level(logging.WARNING, logger="genlab.models.shape_e.module"):
        metrics = module.score(generated, objects, per=1)
    assert metrics["val/empty_meshes"] == 1.0
    assert any("empty" in r.message for r in caplog.records)
    # one pair left (the third object has no points): the box against its own surface
    # (256 points on a unit cube are ~0.15 apart)
    assert metrics["val/fscore"] > 0.9 and 0 <= metrics["val/chamfer"] < 0.03
    assert all(math.isfinite(v) for v in metrics.values())
    generated.meshes = [None, None, None]
    metrics = module.score(generated, objects, per=1)
    assert metrics == {"val/empty_meshes": 3.0}


def test_image_model_samples_from_files_val_images_or_nothing(tmp_path, caplog):
    from PIL import Image

    from genlab.models.shape_e.module import _ValObjects

    small = {"steps": 2, "frame_size": 16, "num_views": 2, "grid_size": 16}
    module = _module("image", validation=small)
    path = tmp_path / "view.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    red = torch.zeros(3, 40, 40)
    red[0] = 200 / 255
    red[1] = 30 / 255
    red[2] = 30 / 255
    module._last_val = _ValObjects(["obj"], ["a red box"], [red], [None])
    by_file = module._prompt_condition([str(path)])
    by_caption = module._prompt_condition(["a red box"])
    torch.testing.assert_close(by_file, by_caption)  # the same pixels either way
    with caplog.at_level(logging.WARNING, logger="genlab.models.shape_e.module"):
        unknown = module._prompt_condition(["no such picture"])
    assert torch.count_nonzero(unknown) == 0 and unknown.shape == by_file.shape
    assert any("without a condition" in r.message for r in caplog.records)
    samples = module.sample([str(path), "a red box"], num_per_prompt=2)
    assert [s.index for s in samples] == [0, 1, 0, 1]
    assert all(s.image.size == (16, 16) for s in samples)
