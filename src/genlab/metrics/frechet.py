"""Fréchet distance between two image sets over a pluggable feature extractor (FID, FD_DINO).

Both sets are embedded by one frozen feature extractor, a Gaussian is fitted to each set's
features (mean, unbiased covariance), and the distance between the Gaussians is

    ``FD = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``.

:class:`FrechetDistance` is torchmetrics' ``FrechetInceptionDistance`` (its feature sums,
its covariance maths in float64 and its sync of the sums across DDP processes) with the
extractor chosen by config:

- ``features="inception"``: the FID InceptionV3 of torch-fidelity (``inception_dim`` 64,
  192, 768 or 2048), weights downloaded by torch-fidelity (:data:`INCEPTION_URL`) or read
  from ``inception_weights``, a local copy of that file. Needs ``torch-fidelity``.
- any genlab image encoder (a module with ``feature_dim`` and ``encode_images(images)`` or
  ``forward(images) -> (B, D)``), e.g.
  :class:`genlab.metrics.image_similarity.DinoImageEncoder` (``tiny=True``: random weights,
  for tests). FD over DINO features is the recommended alternative to Inception FID: Stein
  et al. 2023 ("Exposing flaws of generative model evaluation metrics and their unfair
  treatment of diffusion models") find that Inception features miss much of what people
  judge, while self-supervised DINOv2 ViT-L/14 features track it far better
  (``model_name: vit_large_patch14_dinov2.lvd142m``; ViT-S/16 DINO is the cheaper default
  here).

Values are comparable only within one feature extractor (and one preprocessing, one
sample count): an FD over DINO features (unit-norm, so values below 4) is not an FID, and
neither is comparable with published FIDs of other pipelines. ``feature_name`` says which
extractor a value came from. The estimate is biased upwards at small sample counts, so
below ``min_samples`` images in either set :meth:`compute` returns None (and says so once).

Images: ``(B, 3, H, W)`` float in [0, 1] or uint8 in [0, 255] (``(B, 1, H, W)`` is
repeated to RGB), resized by the extractor's own preprocessing.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from genlab.pretrained import local_path, weights_unavailable

__all__ = ["INCEPTION", "INCEPTION_URL", "FrechetDistance", "ImageFeatures"]

log = logging.getLogger(__name__)

#: ``features`` value that selects torchmetrics' InceptionV3 (classic FID).
INCEPTION = "inception"
_INCEPTION_DIMS = (64, 192, 768, 2048)
#: Where torch-fidelity downloads the FID InceptionV3 weights from (the file to copy for offline use).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
_TINY_DINO = (
    "features={_target_: genlab.metrics.image_similarity.DinoImageEncoder, "
    "pretrained: null, tiny: true}"
)


class ImageFeatures(nn.Module):
    """A genlab image encoder as torchmetrics' feature extractor: ``(B,3,H,W) -> (B, D)`` float32.

    Uses the encoder's ``encode_images`` when it has one (DINO and CLIP encoders), else its
    ``forward``; the feature size is its ``feature_dim`` (or ``num_features``).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        dim = getattr(encoder, "feature_dim", getattr(encoder, "num_features", None))
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise TypeError(
                f"{type(encoder).__name__} is not an image encoder: it needs an int "
                f"feature_dim (or num_features), got {dim!r}"
            )
        self.encoder = encoder.requires_grad_(False).eval()
        self.num_features = int(dim)

    def train(self, mode: bool = True) -> ImageFeatures:  # noqa: D102 - frozen: always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        encode = getattr(self.encoder, "encode_images", None)
        feats = encode(images) if callable(encode) else self.encoder(images)
        if feats.shape != (images.shape[0], self.num_features):
            raise ValueError(
                f"{type(self.encoder).__name__} gave features of shape {tuple(feats.shape)}, "
                f"expected ({images.shape[0]}, {self.num_features})"
            )
        return feats.float()


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class FrechetDistance(FrechetInceptionDistance):
    """Fréchet distance between "real" and "fake" images over ``features`` (see the module doc).

    ``update(images, real)`` adds a batch to one set (feature sums only: memory does not
    grow with the number of images), ``compute()`` gives the distance as a float32 scalar
    tensor (clamped at 0) or None when either set has fewer than ``min_samples`` images,
    ``reset()`` clears both sets. Under DDP every process updates with its own images and
    ``compute()`` (called on all processes) sums the statistics of all of them first.

    ``features``: ``"inception"`` or an image encoder module. ``inception_dim`` and
    ``inception_weights`` (None: torch-fidelity's download; a path: a local copy) only apply
    to Inception; when its weights cannot be had, a one-line
    :class:`~genlab.pretrained.WeightsUnavailableError` names ``config_key``.
    """

    def __init__(
        self,
        features: str | nn.Module = INCEPTION,
        min_samples: int = 2,
        inception_dim: int = 2048,
        inception_weights: str | None = None,
        config_key: str = "model.fid",
        **kwargs,
    ) -> None:
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 2:
            raise ValueError(f"min_samples must be an int >= 2, got {min_samples!r}")
        if isinstance(features, str):
            if features != INCEPTION:
                raise ValueError(
                    f"features must be {INCEPTION!r} or an image encoder module, not {features!r}"
                )
            self._init_inception(inception_dim, inception_weights, config_key, kwargs)
            feature_name = f"inception_v3/{inception_dim}"
        elif isinstance(features, nn.Module):
            extractor = ImageFeatures(features)
            super().__init__(feature=extractor, normalize=True, **kwargs)
            feature_name = str(getattr(features, "model_name", type(features).__name__))
        else:
            raise TypeError(
                f"features must be {INCEPTION!r} or an nn.Module, got {type(features).__name__}"
            )
        self.min_samples = min_samples
        self.feature_name = feature_name
        self._said_too_few = False

    def _init_inception(self, dim: int, weights: str | None, config_key: str, kwargs: dict) -> None:
        if dim not in _INCEPTION_DIMS:
            raise ValueError(f"inception_dim must be one of {_INCEPTION_DIMS}, got {dim}")
        key, choice = f"{config_key}.inception_weights", f"{config_key}.{_TINY_DINO}"
        spec = INCEPTION_URL if weights is None else str(weights)
        if weights is not None:
            path = local_path(weights)
            if path is None or not path.is_file():
                err = FileNotFoundError(f"no such file: {weights}")
                raise weights_unavailable("FID InceptionV3", spec, key, err, choice) from err
        try:
            super().__init__(
                feature=dim,
                normalize=False,
                feature_extractor_weights_path=None if weights is None else str(weights),
                **kwargs,
            )
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"{config_key}.features={INCEPTION} needs torch-fidelity (pip install "
                f"torch-fidelity), which is not installed; or use {choice}."
            ) from err
        except Exception as err:  # noqa: BLE001 - any download/IO failure gets the same clear message
            raise weights_unavailable("FID InceptionV3", spec, key, err, choice) from err

    @property
    def num_real(self) -> int:
        """Images in the real set (this process's own until :meth:`compute` syncs)."""
        return int(self.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        """Images in the fake set (this process's own until :meth:`compute` syncs)."""
        return int(self.fake_features_num_samples)

    def _prepare(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
        images = images.to(self.device).expand(-1, 3, -1, -1)
        if images.dtype == torch.uint8:
            return images if not self.used_custom_model else images.float().div(255.0)
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
        if images.numel():
            lo, hi = images.min().item(), images.max().item()
            if not (math.isfinite(lo + hi) and lo >= -1e-3 and hi <= 1 + 1e-3):
                raise ValueError(f"float images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        if self.used_custom_model:
            return images.float()
        return images.clamp(0, 1).mul(255.0).round().to(torch.uint8)

    def update(self, images: Tensor, real: bool) -> None:
        """Add ``images`` ``(B, 3, H, W)`` (float in [0, 1] or uint8) to the real or fake set."""
        if images.shape[0] == 0:
            return
        super().update(self._prepare(images), real=real)

    def compute(self) -> Tensor | None:
        """The Fréchet distance, or None while either set has fewer than ``min_samples`` images."""
        n_real, n_fake = self.num_real, self.num_fake
        if min(n_real, n_fake) < self.min_samples:
            if not self._said_too_few and _is_rank_zero():
                log.warning(
                    "Fréchet distance (%s): %d real and %d fake images, fewer than "
                    "min_samples=%d; no value (said once)",
                    self.feature_name,
                    n_real,
                    n_fake,
                    self.min_samples,
                )
            self._said_too_few = True
            return None
        return super().compute().clamp_min(0.0)
