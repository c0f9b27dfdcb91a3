"""Training-step time of the otuken3d LightningModule (through a Lightning Trainer, with gradient
clipping and grad-norm logging) against a plain PyTorch loop doing the same forward, losses,
clipping and AdamW update on the same networks and batches.

    python bench/otuken3d_step.py [--model otuken3d_tiny] [--size 32] [--batch 8] [--steps 20]

Prints per-step times and, last, ``ratio: <ours / plain>`` (lower is better; 1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import StepClock, bench_trainer, median
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="otuken3d_tiny")
    p.add_argument(
        "--size", type=int, default=32, help="the active voxel size (one of the model's)"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", [f"model={args.model}"])
    sizes = list(cfg.model.voxel_sizes)
    if args.size not in sizes:
        raise SystemExit(f"--size {args.size} is not one of the model's voxel_sizes {sizes}")
    schedule = [0 if s == args.size else 10_000 + i for i, s in enumerate(sizes)]
    torch.manual_seed(0)
    model: Otuken3D = instantiate(
        cfg.model, grow_schedule=schedule, text_dropout=0.0, points_dropout=0.0
    )
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
