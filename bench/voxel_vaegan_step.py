"""Training-step time of the voxel VAE-GAN LightningModule (through a Lightning Trainer) against a
plain PyTorch loop doing the same generator + discriminator updates on the same networks and batch.

    python bench/voxel_vaegan_step.py [--voxel-size 32] [--hidden 8] [--batch 32] [--steps 20]

Prints per-step times and, last, ``ratio: <ours / plain>`` (lower is better; 1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial

import torch
import torch.nn.functional as F
from _common import RandomGrids, StepClock, bench_trainer, median
from torch.utils.data import DataLoader

from genlab.models.voxel_vaegan import VoxelVAEGAN
from genlab.models.voxel_vaegan.networks import ConditionalVAE, Discriminator
from genlab.nn.losses import soft_dice_loss
from genlab.nn.text import HashedBagOfWordsEncoder


def build(r: int, hidden: int) -> VoxelVAEGAN:
    return VoxelVAEGAN(
        generator=ConditionalVAE(r, 64, 512, hidden, 4, 4),
        discriminator=Discriminator(r, 512, hidden, 4),
        text_encoder=HashedBagOfWordsEncoder(512),
        optimizer=partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999)),
        voxel_size=r,
    )


def plain_loop(model: VoxelVAEGAN, loader: DataLoader, steps: int) -> list[float]:
    """What a hand-written script does: same losses, same order of updates."""
    g, d, enc = model.generator, model.discriminator, model.text_encoder
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.5, 0.999))
    g.train()
    d.train()
    times: list[float] = []
    while len(times) < steps:
        for batch in loader:
            t = time.perf_counter()
            x, cond = batch["voxels"], enc(batch["caption"])
            logits, mu, logvar = g(x, cond)
            recon = F.binary_cross_entropy_with_logits(logits, x) + soft_dice_loss(
                torch.sigmoid(logits), x
            )
            kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
            fakes = torch.cat(
                [torch.sigmoid(logits), torch.sigmoid(g.decode(torch.randn_like(mu), cond))]
            )
            cond2 = torch.cat([cond, cond])
            d_fake = d(fakes, cond2)
            loss_g = (
                10 * recon
                + kl
                + 1e-3 * F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
            )
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            d_real, d_fake = d(x, cond), d(fakes.detach(), cond2)
            loss_d = 0.5 * (
                F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            )
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            times.append(time.perf_counter() - t)
            if len(times) == steps:
                break
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voxel-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(args.voxel_size, args.hidden)
    plain_model = copy.deepcopy(model)
    loader = DataLoader(
        RandomGrids(args.batch * 4, args.voxel_size), batch_size=args.batch, shuffle=False
    )

    warm = 3
    plain = plain_loop(plain_model, loader, args.steps + warm)[warm:]
    clock = StepClock()
    trainer = bench_trainer(
        [clock],
        max_steps=2 * (args.steps + warm),  # manual optimisation counts both optimisers' steps
        accelerator="cpu",
    )
    trainer.fit(model, train_dataloaders=loader)
    ours = clock.durations(skip=warm)
    print(
        f"grid {args.voxel_size}^3, hidden {args.hidden}, batch {args.batch}, {torch.get_num_threads()} threads"
    )
    print(f"plain PyTorch loop: {median(plain) * 1e3:8.1f} ms/step (median of {len(plain)})")
    print(
        f"genlab VoxelVAEGAN: {median(ours) * 1e3:8.1f} ms/step (median of {len(ours)}, Lightning manual optimisation)"
    )
    print(f"ratio: {median(ours) / median(plain):.3f}")


if __name__ == "__main__":
    main()
