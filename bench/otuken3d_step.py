"""Training-step time of the otuken3d LightningModule (through a Lightning Trainer, with gradient
clipping and grad-norm logging) against a plain PyTorch loop doing the same forward, losses,
clipping and AdamW update on the same networks and batches.

    python bench/otuken3d_step.py [--model otuken3d_tiny] [--size 32] [--batch 8] [--steps 20]
    python bench/otuken3d_step.py --real-size [--size 64] [--batch 8] [--steps 10]

Default: prints per-step times and, last, ``ratio: <ours / plain>`` (lower is better; 1.0 = no
overhead), on the CPU.

``--real-size`` (a CUDA GPU): ``model=otuken3d`` at its configured sizes with random weights,
nothing downloaded -- the T5 v1.1 base encoder built from its architecture (12 layers, d_model
768, 12 heads, d_ff 2048, 32128-token vocabulary; fed by the byte-level tokenizer, so sequences
are longer than with T5's own), PointNet++, style encoder, the progressive decoder at ``--size``
(default the largest, 64^3) and the mesh head -- fit by a Trainer at ``bf16-mixed`` with gradient
clipping, with and without the decoder's gradient checkpointing: samples/s and the peak of
``torch.cuda.max_memory_allocated``. The last line is ``ratio: <step time with checkpointing /
step time without>`` (the price of checkpointing).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import PeakTimer, StepClock, bench_trainer, median
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from genlab.geometry.mesh_batch import MeshBatch
from genlab.geometry.mesh_losses import (
    chamfer_distance,
    mesh_edge_loss,
    mesh_laplacian_smoothing,
    sample_points_from_meshes,
)
from genlab.models.otuken3d import Otuken3D
from genlab.nn.losses import soft_dice_loss

CONF = Path(__file__).resolve().parents[1] / "conf"


class Spheres(Dataset):
    """Spheres of random radii: occupancy at ``size``^3, 1024 surface points, a caption and a style."""

    def __init__(self, n: int, size: int) -> None:
        gen = torch.Generator().manual_seed(0)
        axis = (torch.arange(size) + 0.5) / size - 0.5
        centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
        self.radii = 0.15 + 0.3 * torch.rand(n, generator=gen)
        self.voxels = torch.stack([(centres.norm(dim=-1) <= r).float()[None] for r in self.radii])
        dirs = torch.randn(n, 1024, 3, generator=gen)
        self.points = dirs / dirs.norm(dim=-1, keepdim=True) * self.radii[:, None, None]

    def __len__(self) -> int:
        return len(self.radii)

    def __getitem__(self, i: int) -> dict:
        return {
            "text": f"küre {i % 5}",
            "style_text": "çini" if i % 2 else "",
            "points": self.points[i],
            "voxels": self.voxels[i],
        }


def plain_loop(model: Otuken3D, loader: DataLoader, steps: int, size: int) -> list[float]:
    """A hand-written loop over the same networks: no modality dropout, same losses and update."""
    hp = model.hparams
    params = [p for n, p in model.named_parameters() if not n.startswith("text_encoder.")]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5)
    model.train()
    times: list[float] = []
    while len(times) < steps:
        for batch in loader:
            t = time.perf_counter()
            texts, styles = list(batch["text"]), list(batch["style_text"])
            enc = model.text_encoder(texts + styles)
            has = torch.tensor([bool(s) for s in texts + styles])
            text_vec, style_vec = enc[: len(texts)], enc[len(texts) :]
            has_text, has_style = has[: len(texts)], has[len(texts) :]
            z = model.fusion(
                text_vec, model.point_encoder(batch["points"]), has_text, torch.ones_like(has_text)
            )
            codes = model.style_encoder(style_vec, has_style)
            out = model.decoder(z, codes.global_, codes.local, size=size)
            target = F.adaptive_avg_pool3d(batch["voxels"], size)
            voxel = F.binary_cross_entropy_with_logits(out.logits, target) + soft_dice_loss(
                torch.sigmoid(out.logits), target
            )
            meshes = MeshBatch.from_padded(
                model.mesh_head(z, out.trunk_features), model.mesh_head.faces
            )
            pts = sample_points_from_meshes(meshes, hp.num_mesh_samples)
            loss = (
                voxel
                + chamfer_distance(pts, batch["points"])
                + hp.edge_weight * mesh_edge_loss(meshes)
                + hp.laplacian_weight * mesh_laplacian_smoothing(meshes)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            times.append(time.perf_counter() - t)
            if len(times) == steps:
                break
    return times


# google/t5-v1_1-base's architecture (its config.json), built with random weights
T5_BASE = {
    "vocab_size": 32128,
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 12,
    "num_heads": 12,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
}


def build(model: str, size: int, overrides: list[str] = ()) -> Otuken3D:
    """The model as ``train.py model=<model>`` builds it, trained at voxel size ``size`` only."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", [f"model={model}", *overrides])
    sizes = list(cfg.model.voxel_sizes)
    if size not in sizes:
        raise SystemExit(f"--size {size} is not one of the model's voxel_sizes {sizes}")
    schedule = [0 if s == size else 10_000 + i for i, s in enumerate(sizes)]
    torch.manual_seed(0)
    return instantiate(cfg.model, grow_schedule=schedule, text_dropout=0.0, points_dropout=0.0)


def real_size(args: argparse.Namespace) -> None:
    """One GPU, bf16-mixed: the real-size model with and without gradient checkpointing."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--real-size needs a CUDA GPU (or --device cpu: a slow check, no timing)")
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    size = args.size or 64
    config = "{" + ",".join(f"{k}:{v}" for k, v in T5_BASE.items()) + "}"
    results = {}
    for checkpointing in (False, True):
        model = build(
            "otuken3d",
            size,
            [
                "model.text_encoder.pretrained=null",
                f"+model.text_encoder.config={config}",
                "model.fid=null",  # a validation metric (DINO weights); training does not use it
                f"model.decoder.gradient_checkpointing={checkpointing}",
            ],
        )
        data_size = max(model.hparams.voxel_sizes)
        loader = DataLoader(Spheres(args.batch * 2, data_size), batch_size=args.batch, shuffle=True)
        timer = PeakTimer(device)
        trainer = bench_trainer(
            [timer],
            max_steps=args.steps + 3,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision=precision,
            gradient_clip_val=1.0,
        )
        trainer.fit(model, train_dataloaders=loader)
        step = median(timer.times[3:])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        results[checkpointing] = step
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        peak = "n/a" if timer.peak is None else f"{timer.peak:.2f} GiB"
        print(
            f"{name}: otuken3d real size, grid {size}^3, batch "
            f"{args.batch}, {precision}, decoder checkpointing {'on' if checkpointing else 'off'}: "
            f"{step * 1e3:.1f} ms/step median of {len(timer.times) - 3}, "
            f"{args.batch / step:.1f} samples/s, peak {peak}; "
            f"{total / 1e6:.1f} M parameters, {trainable / 1e6:.1f} M trainable",
            flush=True,
        )
        del model, trainer, loader
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"ratio: {results[True] / results[False]:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="otuken3d_tiny")
    p.add_argument(
        "--size", type=int, default=None, help="the active voxel size: 32 / real size 64"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="timed steps: 20 / real size 10")
    p.add_argument("--real-size", action="store_true", help="model=otuken3d on a CUDA GPU")
    p.add_argument("--device", default="cuda", help="--real-size only: cuda | cpu")
    args = p.parse_args()
    if args.real_size:
        args.steps = args.steps or 10
        real_size(args)
        return
    args.size, args.steps = args.size or 32, args.steps or 20
    model = build(args.model, args.size)
    sizes = list(model.hparams.voxel_sizes)
    plain_model = copy.deepcopy(model)
    loader = DataLoader(Spheres(args.batch * 4, sizes[-1]), batch_size=args.batch)

    warm = 3
    # the plain loop runs before and after the Lightning run (half the steps each), so a
    # change in machine load during the run weighs on both sides alike
    half = max(args.steps // 2, 1)
    plain = plain_loop(plain_model, loader, half + warm, args.size)[warm:]
    clock = StepClock()
    trainer = bench_trainer(
        [clock], max_steps=args.steps + warm, accelerator="cpu", gradient_clip_val=1.0
    )
    trainer.fit(model, train_dataloaders=loader)
    ours = clock.durations(skip=warm)
    plain += plain_loop(plain_model, loader, half + 1, args.size)[1:]
    print(
        f"model {args.model}, grid {args.size}^3, batch {args.batch}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"plain PyTorch loop: {median(plain) * 1e3:8.1f} ms/step (median of {len(plain)})")
    print(
        f"genlab Otuken3D:    {median(ours) * 1e3:8.1f} ms/step (median of {len(ours)}, Lightning)"
    )
    print(f"ratio: {median(ours) / median(plain):.3f}")


if __name__ == "__main__":
    main()
