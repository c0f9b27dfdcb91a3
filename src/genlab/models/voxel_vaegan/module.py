"""Text-conditioned voxel VAE-GAN as a LightningModule (manual optimisation: generator, then discriminator)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from genlab.geometry.marching_cubes import MeshExtractor
from genlab.metrics.voxel import pairwise_voxel_iou, voxel_iou
from genlab.models.base import GenerativeModule
from genlab.models.voxel_vaegan.networks import ConditionalVAE, Discriminator
from genlab.nn.losses import soft_dice_loss
from genlab.nn.text import TextEncoder
from genlab.samples import Sample

log = logging.getLogger(__name__)


class VoxelVAEGAN(GenerativeModule):
    """Conditional VAE + conditional discriminator on occupancy grids, conditioned on text embeddings.

    Losses: ``recon_weight`` x [BCE(recon, x) + ``dice_weight`` x soft Dice] + ``kl_weight`` x
    KL(q(z|x,c) || N(0, I)) +
    ``lambda_adv`` x non-saturating GAN loss on reconstructions and prior samples. The discriminator
    learns at ``optimizer.lr * disc_lr_ratio``.
    """

    frozen_modules = ("text_encoder",)

    def __init__(
        self,
        generator: ConditionalVAE,
        discriminator: Discriminator,
        text_encoder: TextEncoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        mesh_extraction: MeshExtractor | None = None,
        voxel_size: int = 32,
        disc_lr_ratio: float = 0.1,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        lambda_adv: float = 0.001,
        recon_weight: float = 10.0,
        kl_weight: float = 1.0,
        dice_weight: float = 1.0,
        adv_start_epoch: int = 0,
        threshold: float = 0.5,
        main_metric: str = "val/iou",
        main_metric_mode: str = "max",
    ) -> None:
        super().__init__()
        if generator.voxel_size != voxel_size or generator.cond_dim != text_encoder.embed_dim:
            raise ValueError(
                f"generator is {generator.voxel_size}^3 with cond_dim {generator.cond_dim}, but "
                f"voxel_size={voxel_size} and the text encoder gives {text_encoder.embed_dim}-dim embeddings"
            )
        self.save_hyperparameters(
            ignore=[
                "generator",
                "discriminator",
                "text_encoder",
                "optimizer",
                "scheduler",
                "mesh_extraction",
            ]
        )
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator = discriminator
        self.text_encoder = text_encoder.requires_grad_(False)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.mesh_extraction = mesh_extraction or MeshExtractor()
        self.main_metric = main_metric
        self._test_grids: dict[str, list[torch.Tensor]] = {}

    # ---- helpers -------------------------------------------------------------------------
    def _check_batch(self, voxels: torch.Tensor) -> None:
        r = self.hparams.voxel_size
        if voxels.ndim != 5 or voxels.shape[1:] != (1, r, r, r):
            raise ValueError(
                f"expected voxels of shape (B, 1, {r}, {r}, {r}), got {tuple(voxels.shape)}"
            )

    def condition(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(list(prompts)).to(self.device)

    @staticmethod
    def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dims, averaged over the batch."""
        return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()

    def reconstruction_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE on occupancy logits, plus soft Dice (``dice_weight``; 0 gives plain BCE)."""
        loss = F.binary_cross_entropy_with_logits(logits, target)
        if self.hparams.dice_weight > 0:
            loss = loss + self.hparams.dice_weight * soft_dice_loss(torch.sigmoid(logits), target)
        return loss

    def _adversarial_on(self) -> bool:
        return self.hparams.lambda_adv > 0 and self.current_epoch >= self.hparams.adv_start_epoch

    # ---- training ------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["voxels"]
        self._check_batch(x)
        cond = self.condition(batch["caption"])
        opt_g, opt_d = self.optimizers()
        hp = self.hparams

        logits, mu, logvar = self.generator(x, cond)
        loss_recon = self.reconstruction_loss(logits, x)
        loss_kl = self.kl_divergence(mu, logvar)
        loss_g = hp.recon_weight * loss_recon + hp.kl_weight * loss_kl
        adversarial = self._adversarial_on()
        if adversarial:
            z = torch.randn_like(mu)
            fakes = torch.cat(
                [torch.sigmoid(logits), torch.sigmoid(self.generator.decode(z, cond))]
            )
            cond2 = torch.cat([cond, cond])
            d_fake = self.discriminator(fakes, cond2)
            loss_adv = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
            loss_g = loss_g + hp.lambda_adv * loss_adv
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()

        logs = {"train/loss_recon": loss_recon, "train/loss_kl": loss_kl, "train/loss_g": loss_g}
        if adversarial:
            d_real = self.discriminator(x, cond)
            d_fake = self.discriminator(fakes.detach(), cond2)
            loss_d = 0.5 * (
                F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            )
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            opt_d.step()
            logs |= {"train/loss_adv": loss_adv, "train/loss_d": loss_d}
        with torch.no_grad():
            logs["train/iou"] = voxel_iou(torch.sigmoid(logits), x, hp.threshold).mean()
        self.log_dict(
            logs, prog_bar=False, on_step=True, on_epoch=True, batch_size=len(x), sync_dist=True
        )
        self.log("loss", loss_g.detach(), prog_bar=True, logger=False, batch_size=len(x))

    def on_train_epoch_end(self) -> None:
        for sched in self._schedulers():
            sched.step()

    def _schedulers(self) -> list:
        scheds = self.lr_schedulers()
        if scheds is None:
            return []
        return scheds if isinstance(scheds, list) else [scheds]

    # ---- evaluation ----------------------------------------------------------------------
    def _reconstruct_metrics(self, batch: dict, stage: str) -> None:
        x = batch["voxels"]
        self._check_batch(x)
        logits, mu, logvar = self.generator(x, self.condition(batch["caption"]), sample=False)
        self.log_dict(
            {
                f"{stage}/iou": voxel_iou(torch.sigmoid(logits), x, self.hparams.threshold).mean(),
                f"{stage}/loss_recon": self.reconstruction_loss(logits, x),
                f"{stage}/loss_kl": self.kl_divergence(mu, logvar),
            },
            prog_bar=stage == "val",
            batch_size=len(x),
            sync_dist=True,
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._reconstruct_metrics(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._reconstruct_metrics(batch, "test")
        for grid, name in zip(batch["voxels"], batch["class_name"], strict=True):
            self._test_grids.setdefault(name, []).append(grid[0].detach().cpu() > 0.5)

    def _gathered_test_grids(self) -> dict[str, list[torch.Tensor]]:
        """The test grids of every rank (each rank saw its own shard of the test set)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self._test_grids
        local = {k: [g.cpu() for g in v] for k, v in self._test_grids.items()}
        parts: list[dict[str, list[torch.Tensor]] | None] = [
            None
        ] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
        merged: dict[str, list[torch.Tensor]] = {}
        for part in parts:
            for name, grids in (part or {}).items():
                merged.setdefault(name, []).extend(grids)
        return merged

    def on_test_epoch_end(self) -> None:
        grids = self._gathered_test_grids()
        if grids:
            # every rank scores the same gathered shapes with the same seeded samples
            report = self.conditioning_report(grids)
            self.log_dict({f"test/{k}": v for k, v in report.summary.items()})
            if self.trainer.is_global_zero:
                out = Path(self.trainer.default_root_dir) / "conditioning.csv"
                report.write_csv(out)
                log.info(
                    "conditioning (mean best IoU of samples vs test shapes, by prompt x class):\n%s",
                    report.table(),
                )
        self._test_grids = {}

    @torch.no_grad()
    def conditioning_report(
        self, grids_by_class: dict[str, list[torch.Tensor]], num_per_prompt: int = 8, seed: int = 0
    ) -> ConditioningReport:
        """Sample ``num_per_prompt`` grids for "a <class>" and score them against each class's real shapes."""
        classes = sorted(grids_by_class)
        prompts = [f"a {c.replace('_', ' ')}" for c in classes]
        probs = self.sample_grids(
            prompts, num_per_prompt, torch.Generator().manual_seed(seed)
        ).cpu()
        real = {c: torch.stack(grids_by_class[c]).float() for c in classes}
        iou = torch.zeros(len(classes), len(classes))
        hits = torch.zeros(len(classes))
        for i, _ in enumerate(classes):
            samples = probs[i * num_per_prompt : (i + 1) * num_per_prompt]
            best = torch.stack(
                [
                    pairwise_voxel_iou(samples, real[c], self.hparams.threshold).max(1).values
                    for c in classes
                ],
                1,
            )
            iou[i] = best.mean(0)
            hits[i] = (best.argmax(1) == i).float().mean()
        return ConditioningReport(classes, prompts, iou, hits)

    # ---- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grids(
        self, prompts: Sequence[str], num_per_prompt: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Occupancy probabilities (len(prompts) * num_per_prompt, R, R, R), prompt-major order."""
        was_training = self.training
        self.eval()
        try:
            expanded = [p for p in prompts for _ in range(num_per_prompt)]
            cond = self.condition(expanded)
            z = torch.randn(len(expanded), self.generator.latent_dim, generator=generator).to(
                self.device
            )
            return torch.sigmoid(self.generator.decode(z, cond)).squeeze(1).float()
        finally:
            self.train(was_training)

    def sample(
        self,
        prompts: Sequence[str],
        num_per_prompt: int = 1,
        generator: torch.Generator | None = None,
    ) -> list[Sample]:
        """Meshes for each prompt (marching cubes of the sampled occupancy grids)."""
        grids = self.sample_grids(prompts, num_per_prompt, generator).cpu().numpy()
        expanded = [(p, i) for p in prompts for i in range(num_per_prompt)]
        return [
            Sample(p, i, mesh=self.mesh_extraction(g))
            for (p, i), g in zip(expanded, grids, strict=True)
        ]

    # ---- optimisers ----------------------------------------------------------------------
    def configure_optimizers(self):
        opt_g = self.optimizer_factory(self.generator.parameters())
        base_lr = opt_g.param_groups[0]["lr"]
        opt_d = self.optimizer_factory(
            self.discriminator.parameters(), lr=base_lr * self.hparams.disc_lr_ratio
        )
        if self.scheduler_factory is None:
            return [opt_g, opt_d]
        return [opt_g, opt_d], [self.scheduler_factory(opt_g), self.scheduler_factory(opt_d)]


class ConditioningReport:
    """Prompt x class matrix of mean best-match IoU, and how often samples land nearest their own class."""

    def __init__(
        self, classes: list[str], prompts: list[str], iou: torch.Tensor, hits: torch.Tensor
    ) -> None:
        self.classes, self.prompts, self.iou, self.hits = classes, prompts, iou, hits

    @property
    def summary(self) -> dict[str, float]:
        n = len(self.classes)
        diag = self.iou.diagonal().mean().item()
        off = ((self.iou.sum() - self.iou.diagonal().sum()) / max(n * n - n, 1)).item()
        return {
            "cond_accuracy": self.hits.mean().item(),
            "cond_iou_own_class": diag,
            "cond_iou_other_classes": off,
        }

    def table(self) -> str:
        head = (
            "prompt".ljust(16) + "".join(c[:10].rjust(11) for c in self.classes) + "   nearest-own"
        )
        rows = [
            p[:16].ljust(16)
            + "".join(f"{v:11.3f}" for v in self.iou[i].tolist())
            + f"{self.hits[i].item():14.2f}"
            for i, p in enumerate(self.prompts)
        ]
        return "\n".join([head, *rows])

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", *self.classes, "nearest_is_own_class"])
            for i, p in enumerate(self.prompts):
                w.writerow(
                    [p, *(f"{v:.4f}" for v in self.iou[i].tolist()), f"{self.hits[i].item():.4f}"]
                )
