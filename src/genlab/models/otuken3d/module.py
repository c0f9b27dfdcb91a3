"""otuken3d: text (T5) + point cloud -> latent -> progressive styled voxel decoder -> voxels and mesh."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from genlab.distributed import gradient_norm
from genlab.geometry.marching_cubes import IsoLevelWarning, MeshExtractor
from genlab.geometry.mesh_batch import MeshBatch
from genlab.geometry.mesh_losses import (
    chamfer_distance,
    mesh_edge_loss,
    mesh_laplacian_smoothing,
    sample_points_from_meshes,
)
from genlab.geometry.render import render_mesh_preview
from genlab.metrics.frechet import FrechetDistance
from genlab.metrics.voxel import voxel_iou
from genlab.models.base import GenerativeModule
from genlab.models.otuken3d.networks import (
    LatentFusion,
    ProgressiveVoxelDecoder,
    StyleCodes,
    StyleEncoder,
    TemplateMeshHead,
)
from genlab.nn.adain import mix_styles
from genlab.nn.losses import soft_dice_loss
from genlab.nn.point_encoder import PointNet2Encoder
from genlab.nn.text import T5TextEncoder
from genlab.samples import Sample

log = logging.getLogger(__name__)

MIX_SCOPES = ("all", "global", "local")


def parse_grow_schedule(
    schedule: Mapping[Any, Any] | Sequence[int], voxel_sizes: Sequence[int]
) -> list:
    """Sorted ``[(first epoch, size), ...]`` from ``{first epoch: size}`` or from a list of first
    epochs, one per entry of ``voxel_sizes`` (``[0, 10, 20]`` with sizes ``[32, 48, 64]``)."""
    if isinstance(schedule, Mapping):
        pairs = dict(schedule).items()
    else:
        epochs = list(schedule)
        if len(epochs) != len(voxel_sizes):
            raise ValueError(
                f"grow_schedule {epochs} needs one first epoch per voxel size {list(voxel_sizes)}"
            )
        pairs = zip(epochs, voxel_sizes, strict=True)
    items = sorted((int(e), int(s)) for e, s in pairs)
    if not items or items[0][0] != 0:
        raise ValueError(f"grow_schedule must start at epoch 0, got {schedule}")
    for _, size in items:
        if size not in voxel_sizes:
            raise ValueError(f"grow_schedule size {size} is not one of voxel_sizes {voxel_sizes}")
    return items


def downsample_occupancy(voxels: torch.Tensor, size: int) -> torch.Tensor:
    """Occupied fraction of each cell when ``(B, 1, R, R, R)`` occupancy is pooled to ``size``^3.

    Area (average) pooling: for ``R`` a multiple of ``size`` the exact fraction of fine voxels
    that fall in each coarse cell; otherwise (64 -> 48) PyTorch's adaptive pooling windows.
    The soft fraction is the BCE/Dice target; IoU thresholds it at 0.5 (majority occupied).
    """
    if voxels.shape[-1] == size:
        return voxels
    return F.adaptive_avg_pool3d(voxels, size)


class Otuken3D(GenerativeModule):
    """Text and/or points -> shared latent -> styled progressive voxel decoder + template mesh head.

    Training loss: ``voxel_weight`` x [BCE + ``dice_weight`` x Dice] at the active grid size +
    ``chamfer_weight`` x Chamfer(points sampled on the deformed template, target points) +
    ``edge_weight`` x mesh edge length + ``laplacian_weight`` x uniform Laplacian smoothing.
    The active size follows ``grow_schedule`` (the first epoch of each of ``voxel_sizes``, or
    ``{first epoch: size}``); every size's parameters exist from the start, so the optimizer
    (and its state) is built once; with ``inherit_heads`` a newly active size's head starts as
    a copy of the previous size's, so its first output is the resized previous output
    (``fade_in_epochs`` blends further). Modality dropout trains text-only and points-only
    conditioning so that inference works from text alone.
    With ``fid`` (a :class:`~genlab.metrics.frechet.FrechetDistance`), validation renders
    previews (``fid_render_size`` px, the samples' preview renderer) of the marching-cubes
    meshes of the predicted and of the target occupancy at the active size, feeds them as
    fake and real images and logs ``val/fid`` at epoch end once ``fid.min_samples`` objects
    were seen (summed over DDP processes by the metric itself).
    The frozen text encoder stays out of checkpoints; ``text_unfreeze_epoch`` unfreezes it
    (its own parameter group at ``text_lr_scale`` x the learning rate, present from the start)
    and from then on it is saved.
    """

    def __init__(
        self,
        text_encoder: T5TextEncoder,
        point_encoder: PointNet2Encoder,
        fusion: LatentFusion,
        style_encoder: StyleEncoder,
        decoder: ProgressiveVoxelDecoder,
        mesh_head: TemplateMeshHead,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        latent_dim: int = 512,
        style_dim: int = 256,
        voxel_sizes: Sequence[int] = (32, 48, 64),
        voxel_size: int = 64,
        grow_schedule: Mapping[Any, Any] | Sequence[int] | None = None,
        fade_in_epochs: float = 0.0,
        inherit_heads: bool = True,
        text_unfreeze_epoch: int | None = None,
        text_lr_scale: float = 0.1,
        text_dropout: float = 0.3,
        points_dropout: float = 0.3,
        voxel_weight: float = 1.0,
        dice_weight: float = 1.0,
        chamfer_weight: float = 1.0,
        edge_weight: float = 0.1,
        laplacian_weight: float = 0.1,
        num_mesh_samples: int = 2048,
        threshold: float = 0.5,
        fscore_threshold: float = 0.01,
        mesh_extraction: MeshExtractor | None = None,
        fid: FrechetDistance | None = None,
        fid_render_size: int = 256,
        main_metric: str = "val/loss",
        main_metric_mode: str = "min",
    ) -> None:
        super().__init__()
        # plain Python values: hyperparameters go into checkpoints loaded with weights_only=True
        voxel_sizes = sizes = [int(s) for s in voxel_sizes]
        if grow_schedule is not None:
            grow_schedule = (
                {int(e): int(s) for e, s in grow_schedule.items()}
                if isinstance(grow_schedule, Mapping)
                else [int(e) for e in grow_schedule]
            )
        if list(decoder.voxel_sizes) != sizes:
            raise ValueError(
                f"decoder.voxel_sizes {decoder.voxel_sizes} differ from voxel_sizes {sizes}"
            )
        if int(voxel_size) != sizes[-1]:
            raise ValueError(
                f"voxel_size={voxel_size} must be the largest of voxel_sizes {sizes} "
                "(the data grid and the export size)"
            )
        dims = {
            "fusion.text_dim": (fusion.text_dim, text_encoder.embed_dim),
            "fusion.point_dim": (fusion.point_dim, point_encoder.out_dim),
            "fusion.latent_dim": (fusion.latent_dim, latent_dim),
            "decoder.latent_dim": (decoder.latent_dim, latent_dim),
            "style_encoder.style_dim": (style_encoder.style_dim, style_dim),
            "decoder.style_dim": (decoder.style_dim, style_dim),
        }
        wrong = {k: v for k, v in dims.items() if v[0] != v[1]}
        if wrong:
            raise ValueError(f"network sizes do not fit together (got, expected): {wrong}")
        if not 0 <= text_dropout + points_dropout <= 1:
            raise ValueError("text_dropout + points_dropout must lie in [0, 1]")
        self.save_hyperparameters(
            ignore=[
                "text_encoder",
                "point_encoder",
                "fusion",
                "style_encoder",
                "decoder",
                "mesh_head",
                "optimizer",
                "scheduler",
                "mesh_extraction",
                "fid",
            ]
        )
        self.text_encoder = text_encoder
        self.text_encoder.set_trainable(False)
        self.point_encoder = point_encoder
        self.fusion = fusion
        self.style_encoder = style_encoder
        self.decoder = decoder
        self.mesh_head = mesh_head
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.mesh_extraction = mesh_extraction or MeshExtractor()
        self.fid = fid
        self.main_metric = main_metric
        self.voxel_sizes = sizes
        self.grow_schedule = parse_grow_schedule(grow_schedule or {0: sizes[-1]}, sizes)
        # the size trained last: saved with the weights, the default size at inference
        self.register_buffer("trained_size", torch.tensor(self.grow_schedule[0][1]))
        self.alpha = 1.0

    # ---- frozen parts ----------------------------------------------------------------------
    @property
    def frozen_modules(self) -> tuple[str, ...]:  # type: ignore[override]
        """The FID feature extractor, and the text encoder while it is frozen (both rebuilt from
        config, so not checkpointed)."""
        return ("fid",) if self.text_encoder.trainable else ("fid", "text_encoder")

    # ---- progressive growth ----------------------------------------------------------------
    def size_at(self, epoch: int) -> tuple[int, int]:
        """``(size, first epoch of that size)`` active at ``epoch``."""
        start, size = self.grow_schedule[0]
        for e, s in self.grow_schedule:
            if epoch >= e:
                start, size = e, s
        return size, start

    @property
    def active_size(self) -> int:
        return int(self.trained_size)

    def fade_alpha(self, epoch: int, fraction: float = 0.0) -> float:
        """Weight of the newest size's head: ramps 0 -> 1 over ``fade_in_epochs`` after a switch."""
        size, start = self.size_at(epoch)
        fade = self.hparams.fade_in_epochs
        if fade <= 0 or size == self.grow_schedule[0][1]:
            return 1.0
        return min(1.0, (epoch - start + fraction) / fade)

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        size, _ = self.size_at(epoch)
        previous = self.active_size
        if size != previous:
            log.info("epoch %d: voxel grid grows %d -> %d", epoch, previous, size)
            if self.hparams.inherit_heads and size > previous:
                for a, b in zip(self.voxel_sizes, self.voxel_sizes[1:], strict=False):
                    if previous <= a and b <= size:
                        self.decoder.inherit_head(b, a)
        self.trained_size.fill_(size)
        unfreeze = self.hparams.text_unfreeze_epoch
        if unfreeze is not None and epoch >= unfreeze and not self.text_encoder.trainable:
            log.info("epoch %d: the text encoder is unfrozen", epoch)
            self.text_encoder.set_trainable(True)
            self.text_encoder.train()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        num = self.trainer.num_training_batches
        fraction = batch_idx / num if isinstance(num, int) and num > 0 else 0.0
        self.alpha = self.fade_alpha(self.current_epoch, fraction)

    # ---- conditioning ----------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled text vectors ``(B, D)`` and which prompts are non-empty ``(B,)``."""
        has = torch.tensor([bool(t and t.strip()) for t in texts], device=self.device)
        return self.text_encoder(list(texts)).to(self.device), has

    def styles(self, style_texts: Sequence[str]) -> StyleCodes:
        vec, has = self.encode_texts(style_texts)
        return self.style_encoder(vec, has)

    def latent(
        self, texts: Sequence[str], points: torch.Tensor | None, has_points: torch.Tensor | None
    ) -> torch.Tensor:
        """Fused latent ``(B, latent_dim)`` of prompts and (optionally) point clouds."""
        text_vec, has_text = self.encode_texts(texts)
        return self.fuse(text_vec, has_text, points, has_points)

    def fuse(
        self,
        text_vec: torch.Tensor,
        has_text: torch.Tensor,
        points: torch.Tensor | None,
        has_points: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latent from encoded text and raw points (None: text-only conditioning)."""
        b = len(text_vec)
        if points is None:
            point_vec = text_vec.new_zeros(b, self.point_encoder.out_dim)
            has_points = torch.zeros(b, dtype=torch.bool, device=self.device)
        else:
            point_vec = self.point_encoder(points)
            if has_points is None:
                has_points = torch.ones(b, dtype=torch.bool, device=self.device)
        return self.fusion(text_vec, point_vec, has_text, has_points)

    def _modality_masks(self, texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        """Modality dropout: drop the text (prompt -> "") or the points of random samples, never both."""
        b = len(texts)
        r = torch.rand(b)
        drop_text = r < self.hparams.text_dropout
        drop_points = (r >= self.hparams.text_dropout) & (
            r < self.hparams.text_dropout + self.hparams.points_dropout
        )
        no_text = torch.tensor([not (t and t.strip()) for t in texts])
        drop_points &= ~no_text  # a sample without a caption keeps its points
        kept = ["" if d else t for t, d in zip(texts, drop_text.tolist(), strict=True)]
        return kept, (~drop_points).to(self.device)

    # ---- forward + losses ------------------------------------------------------------------
    def _check_batch(self, batch: Mapping[str, Any], size: int) -> None:
        pts, vox = batch["points"], batch["voxels"]
        if pts.ndim != 3 or pts.shape[-1] != 3 or pts.shape[1] == 0:
            raise ValueError(f"batch['points'] must be (B, N>0, 3), got {tuple(pts.shape)}")
        if vox.ndim != 5 or vox.shape[1] != 1 or vox.shape[-1] < size:
            raise ValueError(
                f"batch['voxels'] must be (B, 1, R, R, R) with R >= {size}, got {tuple(vox.shape)}"
            )
        if not (len(batch["text"]) == len(batch["style_text"]) == len(pts) == len(vox)):
            raise ValueError(
                "batch['text'], ['style_text'], ['points'], ['voxels'] differ in length"
            )

    @staticmethod
    def target_points(batch: Mapping[str, Any]) -> torch.Tensor:
        """Chamfer target: the clean ``target_points`` when the batch has them (the encoder's
        ``points`` may carry augmentation noise), else ``points``."""
        target = batch.get("target_points")
        return (batch["points"] if target is None else target).float()

    def forward_batch(
        self, batch: Mapping[str, Any], size: int, dropout: bool, alpha: float = 1.0
    ) -> dict[str, Any]:
        """Logits at ``size`` and template vertices for a batch (prompts and styles share one
        text-encoder call); also the text encoding and styles, for text-only evaluation."""
        self._check_batch(batch, size)
        texts, points = list(batch["text"]), batch["points"]
        has_points = None
        if dropout:
            texts, has_points = self._modality_masks(texts)
        b = len(texts)
        vec, has = self.encode_texts(texts + list(batch["style_text"]))
        z = self.fuse(vec[:b], has[:b], points, has_points)
        style = self.style_encoder(vec[b:], has[b:])
        out = self.decoder(z, style.global_, style.local, size=size, alpha=alpha)
        verts = self.mesh_head(z, out.trunk_features)
        return {
            "logits": out.logits,
            "verts": verts,
            "text": (vec[:b], has[:b]),
            "style": style,
        }

    def losses(
        self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor], generator=None
    ) -> dict[str, torch.Tensor]:
        hp = self.hparams
        logits = out["logits"].float()
        target = downsample_occupancy(batch["voxels"].float(), logits.shape[-1])
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = soft_dice_loss(torch.sigmoid(logits), target)
        meshes = MeshBatch.from_padded(out["verts"].float(), self.mesh_head.faces)
        pred_points = sample_points_from_meshes(meshes, hp.num_mesh_samples, generator=generator)
        chamfer = chamfer_distance(pred_points, self.target_points(batch))
        edge = mesh_edge_loss(meshes)
        laplacian = mesh_laplacian_smoothing(meshes, method="uniform")
        voxel = bce + hp.dice_weight * dice
        total = (
            hp.voxel_weight * voxel
            + hp.chamfer_weight * chamfer
            + hp.edge_weight * edge
            + hp.laplacian_weight * laplacian
        )
        return {
            "loss": total,
            "loss_voxel": voxel,
            "loss_bce": bce,
            "loss_dice": dice,
            "loss_chamfer": chamfer,
            "loss_edge": edge,
            "loss_laplacian": laplacian,
            "pred_points": pred_points.detach(),
            "target": target,
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.forward_batch(batch, self.active_size, dropout=True, alpha=self.alpha)
        parts = self.losses(batch, out)
        b = len(batch["points"])
        logs = {f"train/{k}": v for k, v in parts.items() if k.startswith("loss")}
        logs["train/iou"] = voxel_iou(
            torch.sigmoid(out["logits"].detach().float()), parts["target"] > 0.5
        ).mean()
        self.log_dict(logs, on_step=True, on_epoch=True, batch_size=b, sync_dist=True)
        self.log_dict(
            {"train/voxel_size": float(self.active_size), "train/fade_alpha": self.alpha},
            on_step=False,
            on_epoch=True,
            batch_size=b,
        )
        self.log("loss", parts["loss"].detach(), prog_bar=True, logger=False, batch_size=b)
        return parts["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm = gradient_norm(self, self.trainer.strategy)  # before clipping, over all shards
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def _evaluate(self, batch: dict, stage: str) -> None:
        from genlab.metrics.point_cloud import chamfer_l2, fscore

        size = self.active_size
        gen = torch.Generator(device=self.device).manual_seed(0)
        out = self.forward_batch(batch, size, dropout=False, alpha=self.alpha)
        parts = self.losses(batch, out, generator=gen)
        target_occ = parts["target"] > 0.5
        probs = torch.sigmoid(out["logits"].float())
        pred_pts, target_pts = parts["pred_points"], self.target_points(batch)
        f = fscore(pred_pts, target_pts, threshold=self.hparams.fscore_threshold)
        style = out["style"]
        text_only = self.decoder(
            self.fuse(*out["text"], None),
            style.global_,
            style.local,
            size=size,
            alpha=self.alpha,
        )
        logs = {f"{stage}/{k}": v for k, v in parts.items() if k.startswith("loss")}
        logs |= {
            f"{stage}/iou": voxel_iou(probs, target_occ, self.hparams.threshold).mean(),
            f"{stage}/iou_text_only": voxel_iou(
                torch.sigmoid(text_only.logits.float()), target_occ, self.hparams.threshold
            ).mean(),
            f"{stage}/chamfer": chamfer_l2(pred_pts, target_pts).mean(),
            f"{stage}/fscore": torch.as_tensor(f["fscore"]).float().mean(),
            f"{stage}/precision": torch.as_tensor(f["precision"]).float().mean(),
            f"{stage}/recall": torch.as_tensor(f["recall"]).float().mean(),
        }
        shown = {f"{stage}/loss", f"{stage}/iou", f"{stage}/chamfer"}
        for on_bar in (True, False):
            self.log_dict(
                {k: v for k, v in logs.items() if (k in shown) == on_bar},
                prog_bar=on_bar and stage == "val",
                batch_size=len(batch["points"]),
                sync_dist=True,
            )
        if stage == "val":
            self._update_fid(probs, parts["target"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    # ---- FID over previews -----------------------------------------------------------------
    @torch.no_grad()
    def render_previews(self, grids: torch.Tensor) -> torch.Tensor:
        """Previews ``(B, 3, S, S)`` uint8 (``S = fid_render_size``) of occupancy ``(B, 1, R, R, R)``:
        the meshes :meth:`sample` would export (``mesh_extraction``), drawn by the samples'
        preview renderer; a grid without a surface gives the "no surface" picture."""
        size = self.hparams.fid_render_size
        with warnings.catch_warnings():  # an untrained model's grids rarely reach the iso-level
            warnings.simplefilter("ignore", IsoLevelWarning)
            meshes = [self.mesh_extraction(g) for g in grids.detach().float().squeeze(1).cpu()]
        images = np.stack([np.asarray(render_mesh_preview(m, size=size)) for m in meshes])
        return torch.from_numpy(images).permute(0, 3, 1, 2)

    def _fid_active(self) -> bool:
        return self.fid is not None and not (self._trainer and self.trainer.sanity_checking)

    def _update_fid(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        if self._fid_active():
            self.fid.update(self.render_previews(target), real=True)
            self.fid.update(self.render_previews(probs), real=False)

    def on_validation_epoch_start(self) -> None:
        if self.fid is not None:
            self.fid.reset()

    def on_validation_epoch_end(self) -> None:
        if not self._fid_active():
            return
        value = self.fid.compute()  # on every process: torchmetrics sums their statistics first
        self.fid.reset()
        if value is not None:
            # the same value on every process: sync_dist only averages identical numbers
            self.log("val/fid", value, sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ---- sampling --------------------------------------------------------------------------
    def mixed_styles(
        self,
        n: int,
        style: str = "",
        style_b: str | None = None,
        style_mix: float = 0.0,
        mix_scope: str = "all",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global and local style vectors ``(n, style_dim)`` for ``style``, mixed toward ``style_b``.

        ``mix_scope``: ``all`` mixes both, ``global`` only the coarse blocks' style (overall
        form from ``style_b``, detail from ``style``), ``local`` only the fine blocks' style.
        """
        if mix_scope not in MIX_SCOPES:
            raise ValueError(f"mix_scope must be one of {MIX_SCOPES}, got {mix_scope!r}")
        a = self.styles([style or ""])
        g, loc = a.global_, a.local
        if style_b is not None and style_mix > 0:
            b = self.styles([style_b])
            if mix_scope in ("all", "global"):
                g = mix_styles(g, b.global_, style_mix)
            if mix_scope in ("all", "local"):
                loc = mix_styles(loc, b.local, style_mix)
        elif not 0 <= style_mix <= 1:
            raise ValueError(f"style_mix must lie in [0, 1], got {style_mix}")
        return g.expand(n, -1), loc.expand(n, -1)

    @torch.no_grad()
    def sample_grids(
        self,
        prompts: Sequence[str],
        num_per_prompt: int = 1,
        style: str = "",
        style_b: str | None = None,
        style_mix: float = 0.0,
        mix_scope: str = "all",
        voxel_size: int | None = None,
        points: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Occupancy probabilities ``(len(prompts) * num_per_prompt, S, S, S)``, prompt-major.

        ``voxel_size``: one of ``voxel_sizes`` (that size's head), another size (the finest
        trained head resampled trilinearly), or None (the size trained last). ``points``
        ``(len(prompts), N, 3)`` adds point-cloud conditioning. The model is deterministic:
        copies of one prompt are identical.
        """
        was_training = self.training
        self.eval()
        try:
            expanded = [p for p in prompts for _ in range(num_per_prompt)]
            if points is not None:
                points = points.to(self.device).repeat_interleave(num_per_prompt, 0)
            size = self.active_size if voxel_size is None else int(voxel_size)
            if size < 2:
                raise ValueError(f"voxel_size must be >= 2, got {voxel_size}")
            head = size if size in self.voxel_sizes else self.active_size
            z = self.latent(expanded, points, None)
            g, loc = self.mixed_styles(len(expanded), style, style_b, style_mix, mix_scope)
            probs = torch.sigmoid(self.decoder(z, g, loc, size=head).logits.float())
            if head != size:
                probs = F.interpolate(probs, size=(size,) * 3, mode="trilinear")
            return probs.squeeze(1)
        finally:
            self.train(was_training)

    def sample(
        self,
        prompts: Sequence[str],
        num_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        **style: Any,
    ) -> list[Sample]:
        """Meshes (marching cubes of the occupancy) for each prompt; ``style`` as in :meth:`sample_grids`.

        ``generator`` is accepted for the shared sampling interface; nothing here is random.
        """
        grids = self.sample_grids(prompts, num_per_prompt, **style).cpu().numpy()
        expanded = [(p, i) for p in prompts for i in range(num_per_prompt)]
        return [
            Sample(p, i, mesh=self.mesh_extraction(g))
            for (p, i), g in zip(expanded, grids, strict=True)
        ]

    # ---- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        own = [p for n, p in self.named_parameters() if not n.startswith(("text_encoder.", "fid."))]
        groups: list[dict] = [{"params": own, "name": "otuken3d"}]
        if self.hparams.text_unfreeze_epoch is not None:
            groups.append({"params": list(self.text_encoder.parameters()), "name": "text_encoder"})
        optimizer = self.optimizer_factory(groups)
        if len(groups) > 1:
            optimizer.param_groups[1]["lr"] = (
                optimizer.param_groups[0]["lr"] * self.hparams.text_lr_scale
            )
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(optimizer),
                "monitor": self.main_metric,
                "interval": "epoch",
                "strict": False,
            },
        }
