"""The voxel VAE-GAN LightningModule: its steps change the weights, its errors name the problem,
and its text conditioning steers what it generates."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from genlab.data.synthetic_shapes import SyntheticShapes
from genlab.data.voxel_datamodule import VoxelDataModule
from genlab.geometry.marching_cubes import MeshExtractor
from genlab.models.voxel_vaegan import VoxelVAEGAN
from genlab.models.voxel_vaegan.networks import ConditionalVAE, Discriminator
from genlab.nn.text import HashedBagOfWordsEncoder


def tiny_model(r: int = 16, lr: float = 2e-3, **kw) -> VoxelVAEGAN:
    return VoxelVAEGAN(
        generator=ConditionalVAE(
            r,
            latent_dim=8,
            cond_dim=32,
            hidden_channels=8,
            num_encoder_layers=3,
            num_decoder_layers=3,
        ),
        discriminator=Discriminator(r, cond_dim=32, hidden_channels=8, num_layers=3),
        text_encoder=HashedBagOfWordsEncoder(embed_dim=32),
        optimizer=partial(torch.optim.Adam, lr=lr, betas=(0.5, 0.999)),
        voxel_size=r,
        **{"mesh_extraction": MeshExtractor(level=0.5, sigma=0.5), **kw},
    )


def fit(
    model: VoxelVAEGAN, dm: VoxelDataModule, epochs: int = -1, max_steps: int = -1
) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    return trainer


def test_one_step_changes_generator_and_discriminator_with_finite_losses(tmp_path) -> None:
    pl.seed_everything(0)
    model = tiny_model()
    dm = VoxelDataModule(
        SyntheticShapes(16, 4, ["sphere", "box"], cache_dir=tmp_path), 16, 0.0, 0.0, batch_size=8
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = fit(model, dm, max_steps=2).callback_metrics
    for key in (
        "train/loss_recon",
        "train/loss_kl",
        "train/loss_adv",
        "train/loss_d",
        "train/loss_g",
    ):
        assert torch.isfinite(m[key]), key
    assert m["train/loss_d"] > 0 and m["train/loss_recon"] > 0
    changed = {
        k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])
    }
    assert changed == {"generator", "discriminator"}
    assert not list(model.text_encoder.parameters())


def test_discriminator_learns_at_its_fraction_of_the_lr() -> None:
    opt_g, opt_d = tiny_model(lr=1e-3, disc_lr_ratio=0.25).configure_optimizers()
    assert opt_g.param_groups[0]["lr"] == 1e-3
    assert opt_d.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_scheduler_steps_both_optimisers_once_per_epoch(tmp_path) -> None:
    pl.seed_everything(0)
    sched = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = tiny_model(lr=1e-3, scheduler=sched)
    dm = VoxelDataModule(
        SyntheticShapes(16, 2, ["sphere"], cache_dir=tmp_path), 16, 0.0, 0.0, batch_size=2
    )
    fit(model, dm, epochs=3)
    opt_g, opt_d = model.optimizers()
    assert opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)
    assert opt_d.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5**3)


def test_wrong_batch_shape_and_mismatched_parts_are_reported() -> None:
    model = tiny_model()
    with pytest.raises(
        ValueError, match=r"expected voxels of shape \(B, 1, 16, 16, 16\), got \(2, 16, 16, 16\)"
    ):
        model._check_batch(torch.zeros(2, 16, 16, 16))
    with pytest.raises(ValueError, match="voxel_size=32"):
        tiny_model(r=16).__class__(
            generator=ConditionalVAE(16, 8, 32, 8, 3, 3),
            discriminator=Discriminator(16, 32, 8, 3),
            text_encoder=HashedBagOfWordsEncoder(32),
            optimizer=torch.optim.Adam,
            voxel_size=32,
        )
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*3"):
        ConditionalVAE(20, 8, 32, 8, 3, 3)


def test_dice_keeps_reconstruction_from_collapsing_to_empty() -> None:
    model = tiny_model()
    target = torch.zeros(2, 1, 16, 16, 16)
    target[:, :, 4:12, 4:12, 4:12] = 1
    empty = torch.full_like(target, -8.0)  # confident "all empty" logits
    right = torch.where(target > 0, 8.0, -8.0)
    assert model.reconstruction_loss(empty, target) > model.reconstruction_loss(right, target) + 0.9


def test_text_condition_steers_samples(tmp_path) -> None:
    """Trained on spheres, tori and cones, the samples for "a <class>" match that class's shapes best."""
    pl.seed_everything(0)
    model = tiny_model(lambda_adv=0.0)
    src = SyntheticShapes(16, 24, ["sphere", "torus", "cone"], seed=0, cache_dir=tmp_path)
    fit(model, VoxelDataModule(src, 16, 0.0, 0.0, batch_size=16), epochs=30)
    data = src.load()
    grids = {
        name: [
            torch.from_numpy(g) for g, lab in zip(data.voxels, data.labels, strict=True) if lab == i
        ]
        for i, name in enumerate(data.class_names)
    }
    report = model.conditioning_report(grids, num_per_prompt=8)
    assert report.classes == ["cone", "sphere", "torus"]
    iou = report.iou.numpy()  # rows: prompts, columns: classes, same order
    for i in range(3):
        others = np.delete(iou[i], i)
        assert iou[i, i] > others.max() + 0.15, np.round(iou, 3)
    assert report.summary["cond_accuracy"] >= 0.9
    assert report.summary["cond_iou_own_class"] > report.summary["cond_iou_other_classes"] + 0.2


def test_samples_are_meshes_in_the_unit_cube_and_reproducible() -> None:
    pl.seed_everything(0)
    model = tiny_model(mesh_extraction=None)
    a = model.sample_grids(["a sphere", ""], 2, torch.Generator().manual_seed(1))
    b = model.sample_grids(["a sphere", ""], 2, torch.Generator().manual_seed(1))
    assert a.shape == (4, 16, 16, 16) and torch.equal(a, b)
    assert model.training  # sampling restores the train/eval mode
    samples = model.sample(["a box"], 1, torch.Generator().manual_seed(0))
    assert samples[0].prompt == "a box" and samples[0].stem == "a_box_00"
    if samples[0].mesh is not None:
        assert np.abs(samples[0].mesh.vertices).max() <= 0.5 + 1e-6
