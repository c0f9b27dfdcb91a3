"""A Shap-E-style encoder (point cloud + optional views -> latent) and its training module.

:class:`ShapEEncoder` is a perceiver: ``num_latents`` learned queries cross-attend to one token
per input point (xyz Fourier features + RGB) and, optionally, to image patches of rendered views
(patch embedding + a camera-pose embedding), then go through a few self-attention layers; a
linear head gives the ``(num_latents, latent_dim)`` latent that ``ShapERenderer`` decodes, and
a ``tanh`` bottleneck keeps it in [-1, 1] like Shap-E's latents (the released scheduler clips
samples to that range). Point tokens carry no index, so the latent does not depend on the
order of the points.

It is *not* OpenAI's transmitter (``shap_e.models.transmitter`` of the ``openai/shap-e``
repository, whose weights are not part of the diffusers release and whose layer names differ):
:func:`load_encoder_checkpoint` loads this class's own state dicts (``.pt`` / ``.safetensors``,
or a genlab run's ``model.safetensors`` / Lightning ``.ckpt``), with a precise error for any
other key set.

:class:`ShapEEncoderModule` trains it through the decoder (:func:`.decode.query_fields`):

- occupancy: binary cross-entropy between the SDF logit (positive inside) and labels at query
  points drawn uniformly in ``[-1, 1]^3`` and near the surface (surface samples + Gaussian
  noise). Labels come from the object's mesh in ``<root>/meshes/`` (``trimesh`` ``contains``);
  for an object without a mesh, the point cloud gives weaker labels: 0.5 (on the surface) at
  the points themselves and 0 (outside) at points beyond the cloud's bounding box;
- colour: mean squared error between the STF colour at surface points and the points' colours;
- views (``view_weight`` > 0): mean squared error between a rendered view (``images/`` with its
  ``cameras/`` file) and the latent's occupancy-composited render along the same camera rays
  (:func:`.decode.render_rays`, differentiable).

The renderer is frozen by default (the released one, or the seeded tiny one), so the latents
stay decodable by the renderer that the prior is trained with; ``train_renderer=True`` trains
it jointly (then it is saved in the checkpoint too).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genlab.models.base import GenerativeModule
from genlab.models.shape_e.components import LatentShapeError, renderer_latent_shape
from genlab.models.shape_e.decode import camera_rays, decode_meshes, query_fields, render_rays

__all__ = [
    "EncoderCheckpointError",
    "OccupancyLabels",
    "ViewTargets",
    "ShapEEncoder",
    "ShapEEncoderModule",
    "camera_poses",
    "load_encoder_checkpoint",
]

log = logging.getLogger(__name__)


class EncoderCheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the encoder; names the file and keys."""


# ------------------------------------------------------------------------------ network


def fourier_features(xyz: torch.Tensor, degrees: int) -> torch.Tensor:
    """``[xyz, sin(2^k pi xyz), cos(2^k pi xyz)]`` for k < ``degrees``: ``(..., 3 + 6 degrees)``."""
    scales = (2.0 ** torch.arange(degrees, device=xyz.device, dtype=xyz.dtype)) * math.pi
    angles = (xyz.unsqueeze(-1) * scales).flatten(-2)
    return torch.cat([xyz, angles.sin(), angles.cos()], dim=-1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention of queries to tokens, then an MLP; both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(tokens)
        attended, _ = self.attention(self.norm_q(queries), kv, kv, need_weights=False)
        queries = queries + attended
        return queries + self.mlp(self.norm_mlp(queries))


class ShapEEncoder(nn.Module):
    """Perceiver encoder: points ``(B, N, 3)`` (+ colours, + views) -> latent ``(B, E, D)``.

    ``latent_shape``: ``(E, D)`` = the renderer's (sum of ``param_shapes`` vectors,
    ``d_latent``). ``max_points``: in training a random subset of this many points is encoded
    (all points in eval mode). ``patch_size`` > 0 enables view tokens: images
    ``(B, V, 3, S, S)`` or ``(B, 3, S, S)`` in [0, 1], patches of ``patch_size`` pixels, with an
    optional camera ``(B, V, 3, 4)`` world-to-camera pose each (zeros when unknown).
    """

    def __init__(
        self,
        latent_shape: Sequence[int] = (64, 32),
        width: int = 64,
        heads: int = 4,
        num_layers: int = 2,
        fourier_degrees: int = 6,
        max_points: int | None = 1024,
        patch_size: int = 0,
        tanh_bottleneck: bool = True,
    ) -> None:
        super().__init__()
        num_latents, latent_dim = (int(v) for v in latent_shape)
        self.latent_shape = (num_latents, latent_dim)
        self.fourier_degrees = int(fourier_degrees)
        self.max_points = max_points
        self.patch_size = int(patch_size)
        self.tanh_bottleneck = tanh_bottleneck
        self.queries = nn.Parameter(torch.randn(num_latents, width) * width**-0.5)
        self.point_embed = nn.Linear(3 + 6 * self.fourier_degrees + 3, width)
        if self.patch_size > 0:
            self.patch_embed = nn.Conv2d(3, width, self.patch_size, stride=self.patch_size)
            self.camera_embed = nn.Linear(12, width)
            self.view_type = nn.Parameter(torch.zeros(width))
        self.cross = CrossAttentionBlock(width, heads)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                heads,
                4 * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, latent_dim)

    def point_tokens(self, points: torch.Tensor, colors: torch.Tensor | None) -> torch.Tensor:
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[1] == 0:
            raise ValueError(f"points must be (batch, N > 0, 3), got {tuple(points.shape)}")
        if colors is None:
            colors = torch.full_like(points, 0.5)
        if colors.shape != points.shape:
            raise ValueError(
                f"colors {tuple(colors.shape)} must match points {tuple(points.shape)}"
            )
        if self.training and self.max_points and points.shape[1] > self.max_points:
            keep = torch.rand(points.shape[:2], device=points.device).argsort(dim=1)
            keep = keep[:, : self.max_points, None].expand(-1, -1, 3)
            points, colors = points.gather(1, keep), colors.gather(1, keep)
        features = torch.cat([fourier_features(points, self.fourier_degrees), colors], dim=-1)
        return self.point_embed(features)

    def view_tokens(self, images: torch.Tensor, cameras: torch.Tensor | None) -> torch.Tensor:
        if self.patch_size <= 0:
            raise ValueError("this encoder takes no views (patch_size=0)")
        if images.ndim == 4:
            images = images.unsqueeze(1)
        batch, views = images.shape[:2]
        patches = self.patch_embed(images.flatten(0, 1) * 2 - 1)  # (B*V, W, h, w)
        tokens = patches.flatten(2).transpose(1, 2).reshape(batch, views, -1, patches.shape[1])
        pose = (
            cameras.reshape(batch, views, 12).to(tokens.dtype)
            if cameras is not None
            else tokens.new_zeros(batch, views, 12)
        )
        tokens = tokens + self.camera_embed(pose).unsqueeze(2) + self.view_type
        return tokens.flatten(1, 2)

    def forward(
        self,
        points: torch.Tensor,
        colors: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        cameras: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens = self.point_tokens(points, colors)
        if images is not None:
            tokens = torch.cat([tokens, self.view_tokens(images, cameras)], dim=1)
        h = self.cross(self.queries.unsqueeze(0).expand(points.shape[0], -1, -1), tokens)
        for layer in self.layers:
            h = layer(h)
        latent = self.head(self.norm_out(h))
        return torch.tanh(latent) if self.tanh_bottleneck else latent


def camera_poses(cameras: Sequence[Any]) -> torch.Tensor:
    """``(V, 3, 4)`` world-to-camera poses of :class:`genlab.data.cameras.Camera` objects.

    The rows are the camera's right / down / forward axes in world coordinates plus the
    translation (OpenCV frame, see :mod:`genlab.data.cameras`): the ``cameras`` input of
    :meth:`ShapEEncoder.forward` for one object's views.
    """
    return torch.tensor(np.stack([c.world_to_camera[:3] for c in cameras]), dtype=torch.float32)


# ------------------------------------------------------------------------------ checkpoints


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise EncoderCheckpointError(f"{path}: not a readable checkpoint ({reason})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderCheckpointError(f"{path}: expected a state dict of tensors")
    if any(k.startswith("encoder.") for k in state):  # a ShapEEncoderModule's weights
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def _listed(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_encoder_checkpoint(encoder: ShapEEncoder, path: str | Path) -> ShapEEncoder:
    """Load ``path`` into ``encoder``; a key or shape mismatch raises naming the keys.

    Accepts a plain state dict (``.pt``/``.pth`` loaded weights-only, or ``.safetensors``),
    a Lightning checkpoint or a genlab ``model.safetensors`` of :class:`ShapEEncoderModule`
    (``encoder.`` prefix).
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches (checkpoint vs encoder): {_listed(wrong)}")
    if problems:
        raise EncoderCheckpointError(
            f"{path} does not fit this ShapEEncoder ({'; '.join(problems)}). It loads genlab "
            "ShapEEncoder weights of the same configuration only (OpenAI's transmitter is "
            "another architecture)"
        )
    encoder.load_state_dict(state)
    return encoder


# ------------------------------------------------------------------------------ labels


class OccupancyLabels:
    """Query points in ``[-1, 1]^3`` and occupancy targets per object, computed once and kept.

    ``pool_size`` points per object: half uniform in the box, half surface samples moved by
    Gaussian noise of ``near_sigma``. With a mesh the targets are ``mesh.contains`` (0/1);
    without one, see the module docstring (0.5 on the surface, 0 beyond the bounding box).
    The pools of the ``max_cached`` most recently used objects are kept (``pool_size * 16``
    bytes each); others are recomputed (seeded: the same points and labels) when seen again.
    """

    def __init__(
        self,
        mesh_dir: str | Path | None,
        pool_size: int = 8192,
        near_sigma: float = 0.02,
        seed: int = 0,
        max_cached: int = 4096,
    ) -> None:
        self.mesh_dir = Path(mesh_dir) if mesh_dir else None
        self.pool_size = int(pool_size)
        self.near_sigma = float(near_sigma)
        self.seed = seed
        self.max_cached = int(max_cached)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def mesh_path(self, object_id: str) -> Path | None:
        from genlab.data.meshes import MESH_EXTENSIONS

        if self.mesh_dir is None:
            return None
        for ext in MESH_EXTENSIONS:
            path = self.mesh_dir / f"{object_id}{ext}"
            if path.is_file():
                return path
        return None

    def __call__(self, object_id: str, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pool_size, 3)`` query points and ``(pool_size,)`` targets of ``object_id``."""
        if object_id in self._cache:
            self._cache.move_to_end(object_id)
        else:
            self._cache[object_id] = self._compute(object_id, np.asarray(points, np.float64))
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)  # least recently used
        return self._cache[object_id]

    def _compute(self, object_id: str, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, *object_id.encode()])
        half = self.pool_size // 2
        uniform = rng.uniform(-1.0, 1.0, size=(self.pool_size - half, 3))
        path = self.mesh_path(object_id)
        if path is not None:
            from genlab.data.meshes import load_mesh

            mesh = load_mesh(path)
            if not mesh.is_watertight:
                warnings.warn(
                    f"{path}: mesh is not watertight, inside/outside labels may be wrong",
                    stacklevel=2,
                )
            surface, _ = _surface_samples(mesh, half, rng)
            near = surface + rng.normal(scale=self.near_sigma, size=surface.shape)
            queries = np.concatenate([uniform, near])
            targets = mesh.contains(queries).astype(np.float32)
        else:
            surface = points[rng.integers(len(points), size=half)]
            lo, hi = points.min(0), points.max(0)
            margin = 0.05 * float((hi - lo).max())
            outside = np.any((uniform < lo - margin) | (uniform > hi + margin), axis=1)
            queries = np.concatenate([uniform[outside], surface])
            targets = np.concatenate(
                [np.zeros(int(outside.sum()), np.float32), np.full(half, 0.5, np.float32)]
            )
        return torch.from_numpy(queries.astype(np.float32)), torch.from_numpy(targets)


def _surface_samples(mesh: Any, count: int, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    import trimesh

    return trimesh.sample.sample_surface(mesh, count, seed=int(rng.integers(2**31)))


class ViewTargets:
    """Rays and target colours of an object's rendered views, at ``size x size``, kept in memory.

    Reads ``<root>/images/<id>/<view>.*`` with ``<root>/cameras/<id>/<view>.json`` (views without
    a camera file are left out; objects without any give ``[]``). Images are composited on
    ``background`` and resized to ``size`` (square images only: the camera's intrinsics are
    scaled, not cropped).
    """

    def __init__(
        self, root: str | Path | None, size: int = 16, background: Sequence[int] = (255, 255, 255)
    ) -> None:
        self.root = Path(root) if root else None
        self.size = int(size)
        self.background = tuple(int(c) for c in background)
        self._cache: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, object_id: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``[(origins (R, 3), directions (R, 3), rgb (R, 3) in [0, 1]), ...]`` one per view."""
        if object_id not in self._cache:
            self._cache[object_id] = self._load(object_id)
        return self._cache[object_id]

    def _load(self, object_id: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from PIL import Image

        from genlab.data.cameras import read_camera_json
        from genlab.data.images import IMAGE_EXTENSIONS, read_image

        if self.root is None:
            return []
        folder, cameras = self.root / "images" / object_id, self.root / "cameras" / object_id
        if not folder.is_dir():
            return []
        views = []
        for path in sorted(folder.iterdir()):
            camera_file = cameras / f"{path.stem}.json"
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not camera_file.is_file():
                continue
            image = read_image(path, "RGB", self.background)
            if image.width != image.height:
                raise ValueError(f"{path}: view images must be square, got {image.size}")
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
            rgb = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).reshape(-1, 3)
            origins, directions = camera_rays(read_camera_json(camera_file), self.size)
            views.append((origins, directions, rgb))
        return views


# ------------------------------------------------------------------------------ module


class ShapEEncoderModule(GenerativeModule):
    """Trains :class:`ShapEEncoder` on objaverse-layout objects with losses through the renderer.

    Batches need ``object_id``, ``points`` and ``point_colors`` (``data.load: [points]``);
    ``image`` is used when present and the encoder takes views. ``mesh_dir`` (default: the
    datamodule's ``<root>/meshes``) holds the meshes for the occupancy labels.
    ``encoder_checkpoint`` loads encoder weights first (:func:`load_encoder_checkpoint`).
    """

    main_metric = "val/occupancy_iou"

    def __init__(
        self,
        encoder: ShapEEncoder,
        renderer: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        train_renderer: bool = False,
        encoder_checkpoint: str | None = None,
        mesh_dir: str | None = None,
        num_queries: int = 2048,
        num_color_points: int = 512,
        pool_size: int = 8192,
        near_sigma: float = 0.02,
        occupancy_weight: float = 1.0,
        color_weight: float = 1.0,
        view_weight: float = 0.0,
        view_size: int = 16,
        view_samples: int = 32,
        view_sharpness: float = 1.0,
        sample_grid_size: int = 64,
        main_metric: str = "val/occupancy_iou",
        main_metric_mode: str = "max",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "renderer", "optimizer"])
        self.main_metric = main_metric
        if tuple(encoder.latent_shape) != renderer_latent_shape(renderer):
            raise LatentShapeError(
                f"encoder makes latents of shape {tuple(encoder.latent_shape)} but the renderer "
                f"decodes {renderer_latent_shape(renderer)} (param_shapes vectors, d_latent)"
            )
        if encoder_checkpoint:
            load_encoder_checkpoint(encoder, encoder_checkpoint)
        self.encoder = encoder
        self.renderer = renderer
        self.optimizer_factory = optimizer
        self.train_renderer = train_renderer
        if not train_renderer:
            self.renderer.requires_grad_(False)
            self.frozen_modules = ("renderer",)
        self.labels = OccupancyLabels(mesh_dir, pool_size, near_sigma)
        self.num_queries = num_queries
        self.num_color_points = num_color_points
        self.occupancy_weight = occupancy_weight
        self.color_weight = color_weight
        self.view_weight = view_weight
        self.views = ViewTargets(None, view_size)
        self.view_samples = view_samples
        self.view_sharpness = view_sharpness
        self.sample_grid_size = sample_grid_size
        self._preview: dict[str, Any] | None = None

    @property
    def latent_shape(self) -> tuple[int, int]:
        return tuple(self.encoder.latent_shape)  # type: ignore[return-value]

    def setup(self, stage: str | None = None) -> None:
        root = getattr(getattr(self.trainer, "datamodule", None), "root", None)
        if self.labels.mesh_dir is None and root is not None and (Path(root) / "meshes").is_dir():
            self.labels.mesh_dir = Path(root) / "meshes"
        if self.views.root is None and root is not None:
            self.views.root = Path(root)
        if self.labels.mesh_dir is None:
            log.warning(
                "no meshes folder: occupancy labels come from the point clouds only "
                "(surface and outside-the-bounding-box points)"
            )

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        """Latents ``(B, E, D)`` of a batch (points, point_colors, optional image)."""
        images = batch.get("image") if self.encoder.patch_size > 0 else None
        return self.encoder(batch["points"], batch.get("point_colors"), images)

    def _queries(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        queries, targets = [], []
        for object_id, points in zip(batch["object_id"], batch["points"], strict=True):
            pool, labels = self.labels(object_id, points.detach().cpu().numpy())
            pick = torch.randint(len(pool), (self.num_queries,))
            queries.append(pool[pick])
            targets.append(labels[pick])
        device = batch["points"].device
        return torch.stack(queries).to(device), torch.stack(targets).to(device)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Occupancy BCE, colour MSE, their weighted sum and the occupancy IoU of a batch."""
        latents = self.encode(batch)
        queries, targets = self._queries(batch)
        points, colors = batch["points"], batch["point_colors"]
        pick = torch.randint(points.shape[1], (self.num_color_points,), device=points.device)
        surface = points[:, pick]
        fields = query_fields(self.renderer, latents, torch.cat([queries, surface], dim=1))
        logits = fields["sdf_logit"][:, : self.num_queries]
        occupancy = F.binary_cross_entropy_with_logits(logits, targets)
        color = F.mse_loss(fields["rgb"][:, self.num_queries :], colors[:, pick])
        known = (targets == 0) | (targets == 1)
        inside, truth = (logits > 0) & known, (targets == 1) & known
        union = (inside | truth).sum()
        iou = (inside & truth).sum() / union if union > 0 else logits.new_tensor(1.0)
        loss = self.occupancy_weight * occupancy + self.color_weight * color
        out = {"loss": loss, "occupancy": occupancy, "color": color, "occupancy_iou": iou}
        if self.view_weight > 0:
            view = self.view_loss(batch["object_id"], latents)
            if view is not None:
                out["view"] = view
                out["loss"] = loss + self.view_weight * view
        return out

    def view_loss(self, object_ids: Sequence[str], latents: torch.Tensor) -> torch.Tensor | None:
        """MSE between one random rendered view per object and its occupancy-composited render
        (:func:`.decode.render_rays`); ``None`` when no object of the batch has views + cameras."""
        picked, rays = [], []
        for index, object_id in enumerate(object_ids):
            views = self.views(object_id)
            if views:
                picked.append(index)
                rays.append(views[int(torch.randint(len(views), (1,)))])
        if not picked:
            return None
        origins, directions, target = (
            torch.stack(parts).to(latents.device) for parts in zip(*rays, strict=True)
        )
        rendered = render_rays(
            self.renderer,
            latents[picked],
            origins,
            directions,
            num_samples=self.view_samples,
            sharpness=self.view_sharpness,
            background=torch.tensor(self.views.background, device=latents.device) / 255.0,
        )
        return F.mse_loss(rendered["rgb"], target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        batch_size = len(batch["object_id"])
        for name, value in out.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._preview is None:
            self._preview = {k: v for k, v in batch.items() if k != "image"}
        out = self.losses(batch)
        for name, value in out.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", batch_size=len(batch["points"]))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.losses(batch)
        for name, value in out.items():
            self.log(f"test/{name}", value, batch_size=len(batch["points"]))

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._preview is None:
            self._preview = {k: v for k, v in batch.items() if k != "image"}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return self.optimizer_factory(params)

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[str], num_per_prompt: int = 1, generator: Any = None
    ) -> list[Any]:
        """Reconstructions (encode -> decode to a mesh) of up to ``len(prompts) * num_per_prompt``
        objects of the first validation (else training) batch; the prompts are not used."""
        from genlab.samples import Sample

        if self._preview is None:
            return []
        count = max(1, len(prompts) * num_per_prompt)
        batch = {k: v[:count] for k, v in self._preview.items()}
        was_training = self.training
        self.eval()
        latents = self.encode(batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meshes = decode_meshes(self.renderer, latents, grid_size=self.sample_grid_size)
        self.train(was_training)
        return [
            Sample(prompt=f"{object_id} reconstruction", index=0, mesh=mesh)
            for object_id, mesh in zip(batch["object_id"], meshes, strict=True)
        ]
