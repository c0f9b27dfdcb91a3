"""otuken3d parts: AdaIN statistics and mixing, tiny T5 (Turkish), point encoder, growth, losses, checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from genlab.geometry.voxelize import voxel_centers
from genlab.models.base import load_weights
from genlab.nn.adain import AdaIN3d, mix_styles
from genlab.nn.point_encoder import PointNet2Encoder
from genlab.nn.text import T5TextEncoder
from tests.helpers import CONF_DIR

TURKISH = "Selçuklu yıldızı ve lale motifli, çini kaplı bir kâse; ĞÜŞİÖÇ ğüşıöç"

# 8 -> 12 -> 16 grids with one trunk doubling: milliseconds per step on a CPU
SMALL = [
    "model=otuken3d_tiny",
    "model.voxel_sizes=[8,12,16]",
    "model.voxel_size=16",
    "model.grow_schedule=[0,1,2]",
    "model.decoder.channels=[16,8]",
    "model.fade_in_epochs=0",
    "model.num_mesh_samples=128",
    "model.mesh_head.subdivisions=1",
]


def build_model(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", [*SMALL, *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.model)


@pytest.fixture(scope="module")
def model():
    return build_model()


def shape_batch(n: int = 4, points: int = 256, size: int = 16, seed: int = 0) -> dict:
    """Spheres of different radii: 16^3 occupancy and points on their surfaces (unit cube)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.as_tensor(voxel_centers(size), dtype=torch.float32)
    radii = torch.linspace(0.2, 0.4, n)
    voxels = torch.stack([(centres.norm(dim=-1) <= r).float()[None] for r in radii])
    dirs = torch.randn(n, points, 3, generator=gen)
    pts = dirs / dirs.norm(dim=-1, keepdim=True) * radii[:, None, None]
    return {
        "object_id": [f"s{i}" for i in range(n)],
        "text": ["küçük bir küre", "bir küre", "büyük bir küre", ""][:n],
        "style_text": ["çini", "", "kilim deseni", "çini"][:n],
        "points": pts,
        "voxels": voxels,
    }


# ---- AdaIN ---------------------------------------------------------------------------------
def test_adain_sets_per_channel_statistics_from_the_style() -> None:
    torch.manual_seed(0)
    layer = AdaIN3d(channels=4, style_dim=8)
    x = torch.randn(2, 4, 6, 6, 6) * 3 + 5
    styles = torch.randn(2, 8)
    y = layer(x, styles)
    scale, bias = layer.style_params(styles)
    mean = y.mean(dim=(2, 3, 4))
    std = y.var(dim=(2, 3, 4), unbiased=False).sqrt()
    torch.testing.assert_close(mean, bias.flatten(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, scale.abs().flatten(1), atol=1e-3, rtol=1e-3)
    # same features, two styles -> two different sets of channel statistics
    assert (mean[0] - mean[1]).abs().max() > 0.05
    with pytest.raises(ValueError, match=r"style must have shape \(B, 8\)"):
        layer(x, torch.randn(2, 5))


def test_style_mixing_endpoints_equal_the_single_styles() -> None:
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    assert torch.equal(mix_styles(a, b, 0.0), a)
    assert torch.equal(mix_styles(a, b, 1.0), b)
    torch.testing.assert_close(mix_styles(a, b, 0.25), 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_styles(a, b, 1.5)


# ---- text encoder --------------------------------------------------------------------------
def test_tiny_t5_turkish_round_trip_and_encoding() -> None:
    enc = T5TextEncoder(pretrained=None, max_length=256)
    tokens = enc.tokenize([TURKISH, "lale"])
    assert enc.decode(tokens["input_ids"]) == [TURKISH, "lale"]
    hidden, mask = enc.encode_tokens([TURKISH, "lale"])
    assert hidden.shape == (2, tokens["input_ids"].shape[1], 32)
    assert mask[1].sum() == len(b"lale") + 1  # bytes + </s>
    pooled = enc([TURKISH, "", "lale"])
    assert pooled.shape == (3, 32) and torch.count_nonzero(pooled[1]) == 0
    assert not torch.allclose(pooled[0], pooled[2])
    again = T5TextEncoder(pretrained=None, max_length=256)([TURKISH])
    assert torch.equal(again[0], pooled[0])  # seeded random weights: rebuilt identically
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.set_trainable(True)
    assert enc([TURKISH]).requires_grad


def test_t5_missing_weights_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from genlab.pretrained import WeightsUnavailableError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError) as info:
        T5TextEncoder(pretrained="google/t5-v1_1-base-not-cached")
    msg = str(info.value)
    assert "google/t5-v1_1-base-not-cached" in msg and "model.text_encoder.pretrained=" in msg
    assert "model=otuken3d_tiny" in msg and "\n" not in msg


# ---- point encoder -------------------------------------------------------------------------
def test_point_encoder_is_permutation_invariant_and_freezable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = PointNet2Encoder(
        out_dim=24, num_centres=(32, 8), k=(8, 4), widths=((16,), (16,)), global_widths=(32,)
    )
    pts = torch.rand(2, 200, 3) - 0.5
    perm = torch.randperm(200)
    out = enc(pts)
    assert out.shape == (2, 24)
    torch.testing.assert_close(enc(pts[:, perm]), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match=r"points must have shape \(B, N>0, 3\)"):
        enc(torch.rand(2, 200, 2))

    from safetensors.torch import save_file

    path = tmp_path / "encoder.safetensors"
    save_file({f"point_encoder.{k}": v for k, v in enc.state_dict().items()}, str(path))
    kwargs = dict(
        out_dim=24, num_centres=(32, 8), k=(8, 4), widths=((16,), (16,)), global_widths=(32,)
    )
    loaded = PointNet2Encoder.from_checkpoint(path, prefix="point_encoder.", frozen=True, **kwargs)
    torch.testing.assert_close(loaded(pts), out)
    loaded.train()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="no weights under the prefix 'other.'"):
        PointNet2Encoder.from_checkpoint(path, prefix="other.", **kwargs)


# ---- the model -----------------------------------------------------------------------------
def test_style_changes_the_output_and_mix_scopes_pick_blocks(model) -> None:
    def grid(**style):
        return model.sample_grids(["bir vazo"], voxel_size=16, **style)

    plain, cini, kilim = grid(style=""), grid(style="çini"), grid(style="kilim deseni")
    assert (plain - cini).abs().max() > 1e-4 and (cini - kilim).abs().max() > 1e-4
    torch.testing.assert_close(
        grid(style="çini", style_b="kilim deseni", style_mix=1.0), kilim, rtol=0, atol=0
    )
    half = grid(style="çini", style_b="kilim deseni", style_mix=0.5)
    assert (half - cini).abs().max() > 1e-5 and (half - kilim).abs().max() > 1e-5
    # mixing only the coarse blocks' style differs from mixing everything and from none
    coarse = grid(style="çini", style_b="kilim deseni", style_mix=1.0, mix_scope="global")
    assert (coarse - kilim).abs().max() > 1e-5 and (coarse - cini).abs().max() > 1e-5
    with pytest.raises(ValueError, match="mix_scope"):
        grid(style="a", style_b="b", style_mix=0.5, mix_scope="middle")


def test_sample_sizes_and_text_only_inference(model) -> None:
    assert model.sample_grids(["a"], 2, voxel_size=12).shape == (2, 12, 12, 12)
    assert model.sample_grids(["a"], voxel_size=20).shape == (1, 20, 20, 20)  # resampled
    pts = shape_batch(1)["points"]
    with_points = model.sample_grids(["a"], voxel_size=8, points=pts)
    assert (with_points - model.sample_grids(["a"], voxel_size=8)).abs().max() > 1e-5


def test_bad_batches_fail_with_the_array_named(model) -> None:
    batch = shape_batch(2)
    batch["voxels"] = batch["voxels"][:, :, :8, :8, :8]
    with pytest.raises(
        ValueError, match=r"batch\['voxels'\] must be \(B, 1, R, R, R\) with R >= 16"
    ):
        model.forward_batch(batch, 16, dropout=False)
    batch = shape_batch(2)
    batch["points"] = batch["points"][:, :0]
    with pytest.raises(ValueError, match=r"batch\['points'\]"):
        model.forward_batch(batch, 8, dropout=False)


def test_losses_finite_and_falling_when_overfitting_one_batch() -> None:
    model = build_model("model.text_dropout=0", "model.points_dropout=0")
    model.train()
    batch = shape_batch(4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(25):
        parts = model.losses(batch, model.forward_batch(batch, 16, dropout=False))
        assert all(torch.isfinite(v).all() for k, v in parts.items() if k.startswith("loss"))
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in parts.items() if k.startswith("loss")})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.4 * first["loss"], (first, last)
    assert last["loss_voxel"] < 0.4 * first["loss_voxel"]
    assert last["loss_chamfer"] < 0.85 * first["loss_chamfer"]


class _Recorder(pl.Callback):
    """Optimizer object and state tensors at the end of epoch 0 and before epoch 1's first step."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            opt = trainer.optimizers[0]
            self.seen["opt"] = opt
            self.seen["state"] = {id(p): dict(s) for p, s in opt.state.items()}
            self.seen["values"] = {
                id(p): s["exp_avg"].clone() for p, s in opt.state.items() if "exp_avg" in s
            }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 0:
            opt = trainer.optimizers[0]
            self.seen["same_opt"] = opt is self.seen["opt"]
            self.seen["after"] = {id(p): dict(s) for p, s in opt.state.items()}
            with torch.no_grad():  # the new size starts from the resized previous output
                z = pl_module.latent(["bir küre"], None, None)
                g, loc = pl_module.mixed_styles(1, "çini")
                self.seen["new"] = pl_module.decoder(z, g, loc, size=12).logits
                self.seen["old"] = torch.nn.functional.interpolate(
                    pl_module.decoder(z, g, loc, size=8).logits, size=(12,) * 3, mode="trilinear"
                )
            self.seen["after_values"] = {
                id(p): s["exp_avg"].clone() for p, s in opt.state.items() if "exp_avg" in s
            }


def test_progressive_growth_switches_size_and_keeps_optimizer_state(tmp_path: Path) -> None:
    model = build_model(
        "model.grow_schedule=[0,1,3]", "model.scheduler=null", "model.text_unfreeze_epoch=1"
    )
    t5_weight = model.text_encoder.model.shared.weight
    t5_before = t5_weight.detach().clone()
    sizes: list[int] = []

    class Sizes(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sizes.append(pl_module.active_size)

    data = [shape_batch(2, seed=i) for i in range(2)]
    loader = DataLoader(data, batch_size=None)
    recorder = _Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, Sizes()],
        default_root_dir=tmp_path,
    )
    n_params = sum(p.numel() for p in model.parameters())
    trainer.fit(model, train_dataloaders=loader)
    assert sizes == [8, 8, 12, 12]
    assert sum(p.numel() for p in model.parameters()) == n_params  # nothing was added
    assert recorder.seen["same_opt"]
    before, after = recorder.seen["state"], recorder.seen["after"]
    assert before.keys() == after.keys() and len(before) > 10
    for pid, state in before.items():
        for key, tensor in state.items():
            assert after[pid][key] is tensor  # the same tensor objects ...
    for pid, value in recorder.seen["values"].items():
        assert torch.equal(recorder.seen["after_values"][pid], value)  # ... the same values
    torch.testing.assert_close(recorder.seen["new"], recorder.seen["old"], atol=1e-5, rtol=1e-5)
    # the 12^3 head and stage block only train from epoch 1: they have state now
    head12 = model.decoder.heads[1].weight
    assert id(head12) not in before and head12 in trainer.optimizers[0].state
    assert int(model.trained_size) == 12
    # staged unfreezing: the text encoder trains from epoch 1 in its own, pre-built group
    assert model.text_encoder.trainable and t5_weight in trainer.optimizers[0].state
    assert id(t5_weight) not in before and not torch.equal(t5_weight.detach(), t5_before)


def test_checkpoint_round_trip_and_frozen_text_encoder(tmp_path: Path) -> None:
    model = build_model("model.text_unfreeze_epoch=5")
    model.eval()
    keys = list(model.state_dict())
    assert model.fid is not None  # the tiny DINO FID extractor: rebuilt, not saved or optimised
    assert keys and not any(k.startswith(("text_encoder.", "fid.")) for k in keys)
    assert "trained_size" in keys
    model.trained_size.fill_(12)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    fresh = build_model("model.text_unfreeze_epoch=5")
    torch.manual_seed(1)
    load_weights(fresh, path)
    assert fresh.active_size == 12
    expected = model.sample_grids(["kilim"], style="çini")
    torch.testing.assert_close(fresh.sample_grids(["kilim"], style="çini"), expected)
    assert expected.shape == (1, 12, 12, 12)
    # once unfrozen the text encoder trains, so it is saved (and restored) too
    model.text_encoder.set_trainable(True)
    with torch.no_grad():
        next(model.text_encoder.parameters()).add_(0.5)
    assert any(k.startswith("text_encoder.") for k in model.state_dict())
    torch.save({"state_dict": model.state_dict()}, path)
    load_weights(fresh, path)
    torch.testing.assert_close(
        fresh.sample_grids(["kilim"], style="çini"), model.sample_grids(["kilim"], style="çini")
    )
    opt = model.configure_optimizers()["optimizer"]
    assert [g["name"] for g in opt.param_groups] == ["otuken3d", "text_encoder"]
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in model.fid.parameters()}
    assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"] * 0.1)


def test_reference_points_are_normalised_to_the_unit_cube(tmp_path: Path) -> None:
    import numpy as np

    from genlab.tasks.generate_shapes_styled import reference_points

    path = tmp_path / "vase.npy"
    np.save(path, np.random.default_rng(0).normal(size=(300, 3)) * [4.0, 1.0, 2.0] + 7.0)
    pts = reference_points(path, num_points=128)
    assert pts.shape == (128, 3) and pts.dtype == torch.float32
    lo, hi = pts.min(0).values, pts.max(0).values
    assert (hi - lo).max() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close((lo + hi)[0] / 2, torch.tensor(0.0), atol=1e-5, rtol=0)
    (tmp_path / "flat.xyz").write_text("0 0 0\n0 0 0\n")
    with pytest.raises(ValueError, match="flat.xyz"):
        reference_points(tmp_path / "flat.xyz")


def test_modality_dropout_never_drops_both(model) -> None:
    torch.manual_seed(0)
    texts = ["bir vazo", "", "kilim"] * 400
    old = (model.hparams.text_dropout, model.hparams.points_dropout)
    model.hparams.text_dropout, model.hparams.points_dropout = 0.4, 0.6
    try:
        kept, has_points = model._modality_masks(texts)
    finally:
        model.hparams.text_dropout, model.hparams.points_dropout = old
    has_text = torch.tensor([bool(t) for t in kept])
    assert bool((has_text | has_points).all())  # every sample keeps a condition
    captioned = torch.tensor([bool(t) for t in texts])
    assert 0.3 < (~has_text[captioned]).float().mean() < 0.5
    assert bool(has_points[~captioned].all())  # no caption: the points always stay


def test_gradient_checkpointing_gives_the_same_gradients(model) -> None:
    dec = model.decoder
    z = torch.randn(2, dec.latent_dim)
    g, loc = torch.randn(2, dec.style_dim), torch.randn(2, dec.style_dim)
    grads = []
    for flag in (False, True):
        dec.gradient_checkpointing = flag
        dec.train()
        dec.zero_grad()
        dec(z, g, loc, size=16).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in dec.parameters() if p.grad is not None])
    dec.gradient_checkpointing = False
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_residual_gain_is_shardable_and_loads_older_scalar_gains() -> None:
    """FSDP refuses 0-dim parameters, so the ReZero gain has shape (1,); checkpoints written
    with the former 0-dim gain still load, value kept."""
    from genlab.models.otuken3d.networks import StyledBlock

    block = StyledBlock(4, 4, 8, 8, residual=True)
    assert block.gain.shape == (1,)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    state["gain"] = torch.tensor(0.25)
    block.load_state_dict(state)
    assert block.gain.shape == (1,) and block.gain.item() == 0.25
    x, style = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 8)
    y = torch.nn.functional.leaky_relu(block.adain(block.conv(x), style), 0.2)
    torch.testing.assert_close(block(x, style), x + 0.25 * y)
    with pytest.raises(RuntimeError, match="size mismatch for gain"):
        block.load_state_dict({**state, "gain": torch.zeros(2)})


def test_scalar_gains_load_from_lazily_read_checkpoints(tmp_path: Path) -> None:
    """Lightning reads a checkpoint lazily when a strategy (FSDP) loads the best one for testing:
    the older 0-dim gain arrives as a tensor not loaded yet and still loads."""
    from lightning.fabric.utilities.load import _lazy_load

    from genlab.models.otuken3d.networks import StyledBlock

    block = StyledBlock(4, 4, 8, 8, residual=True)
    torch.save({**block.state_dict(), "gain": torch.tensor(0.5)}, tmp_path / "old.ckpt")
    lazy = _lazy_load(tmp_path / "old.ckpt")
    assert type(lazy["gain"]).__name__ == "_NotYetLoadedTensor"
    block.load_state_dict(lazy)
    assert block.gain.shape == (1,) and block.gain.item() == 0.5
