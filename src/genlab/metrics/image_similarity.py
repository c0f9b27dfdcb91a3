"""Subject-driven generation scores as in DreamBooth: DINO, CLIP-I and CLIP-T.

- **DINO**: for each generated image, the mean cosine similarity of its self-supervised ViT
  (DINO) CLS feature to those of all reference photos of the subject; averaged over images.
  DINO features tell instances of one class apart, so this scores subject fidelity.
- **CLIP-I**: the same with CLIP image features.
- **CLIP-T**: cosine similarity between each generated image and its prompt with the
  identifier token removed ("a photo of sksToy toy on the beach" is scored as "a photo of
  toy on the beach"), so it scores prompt fidelity, not the rare token.

:class:`DinoImageEncoder` and :class:`ClipImageTextScorer` are frozen feature extractors;
both have a ``tiny=True`` variant with small, seeded random weights for tests and offline CPU
runs (the numbers are then meaningless, the code path is the real one). The aggregation is
a pure function of feature tensors, :func:`subject_fidelity_from_features`, and
:class:`SubjectFidelity` runs the encoders in batches and calls it.

Images are given as a list of Pillow images, ``(3,H,W)`` tensors or image files (read with
:func:`genlab.data.images.read_image`), or as one float tensor ``(B,3,H,W)`` in ``[0,1]``.
Both kinds go through the same tensor preprocessing, so a Pillow image and its
``to_tensor`` conversion give the same features.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from genlab.pretrained import local_path, weights_unavailable

__all__ = [
    "TINY_CLIP_CONFIG",
    "TINY_DINO_CONFIG",
    "ClipImageTextScorer",
    "DinoImageEncoder",
    "ImagePreprocess",
    "ReferenceFeatures",
    "SubjectFidelity",
    "SubjectFidelityScores",
    "mean_reference_similarity",
    "paired_similarity",
    "remove_identifier",
    "subject_fidelity_from_features",
]

ImageItem = Image.Image | torch.Tensor | str | os.PathLike
#: A list of images (Pillow, ``(3,H,W)`` tensors, files) or one ``(B,3,H,W)`` tensor in [0,1].
Images = torch.Tensor | Sequence[ImageItem]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: timm ``VisionTransformer`` kwargs of the tiny DINO stand-in: ViT-S/16's layout (224 px,
#: 16 px patches, CLS token pooling) at 64 dims, 2 blocks (~0.16 M parameters).
TINY_DINO_CONFIG: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 16,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
}

#: ``open_clip.CLIP`` kwargs of the tiny CLIP stand-in: ViT-B-32's layout (224 px, 32 px
#: patches, the 49,408-token BPE vocabulary, 77-token context) at 64 dims, 2 layers per tower.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePreprocess:
    """Eval preprocessing on float tensors: resize, centre crop (or pad), normalise.

    ``resize_mode``:
      - ``"shortest"``: scale so the image covers ``size / crop_pct``, then centre-crop ``size``
        (``crop_pct=1``: resize the shorter side to the input size, as open_clip does;
        timm's DINO config uses ``crop_pct=0.9``: 248 px, then a 224 px crop);
      - ``"longest"``: scale so the image fits in ``size``, then pad to it with ``fill``;
      - ``"squash"``: resize to ``size`` ignoring the aspect ratio.
    Resizing is antialiased; bicubic overshoot is clamped to [0,1] before normalising.
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    crop_pct: float = 1.0
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(
                f"interpolation must be bicubic or bilinear, not {self.interpolation!r}"
            )
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(
                f"resize_mode must be shortest, longest or squash, not {self.resize_mode!r}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B,3,H,W)`` or a list of ``(3,H,W)`` float images in [0,1] -> ``(B,3,h,w)``."""
        if isinstance(images, torch.Tensor):
            out = self._geometry(images)
        else:
            out = torch.cat([self._geometry(img.unsqueeze(0)) for img in images])
        out = out.clamp(0, 1)
        mean = torch.tensor(self.mean, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
        return (out - mean) / std

    def _resize(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == hw:
            return x
        return F.interpolate(
            x, size=hw, mode=self.interpolation, align_corners=False, antialias=True
        )

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        th, tw = self.size
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            return self._resize(x, (th, tw))
        if self.resize_mode == "longest":
            scale = min(th / h, tw / w)
            nh, nw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
            x = self._resize(x, (nh, nw))
            top, left = (th - nh) // 2, (tw - nw) // 2
            return F.pad(x, (left, tw - nw - left, top, th - nh - top), value=self.fill)
        sh, sw = math.floor(th / self.crop_pct), math.floor(tw / self.crop_pct)
        if h * sw <= w * sh:  # the height limits: it becomes sh, the width follows the ratio
            nh, nw = sh, max(sw, int(w * sh / h))
        else:
            nh, nw = max(sh, int(h * sw / w)), sw
        x = self._resize(x, (nh, nw))
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        return x[..., top : top + th, left : left + tw]


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB ``(3,H,W)`` float in [0,1]; transparent pixels are composited onto white."""
    from torchvision.transforms.functional import pil_to_tensor

    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB")
    return pil_to_tensor(img).float().div_(255.0)


def _check_range(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a float tensor in [0,1] or uint8, got {x.dtype}")
    x = x.float()
    if x.numel():
        lo, hi = x.min().item(), x.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3 or not math.isfinite(lo + hi):
            raise ValueError(
                f"{what}: expected values in [0,1], got [{lo:.3g}, {hi:.3g}] "
                "(map [-1,1] images with (x + 1) / 2, 8-bit values with x / 255)"
            )
    return x


def _item_to_tensor(item: ImageItem, index: int) -> torch.Tensor:
    if isinstance(item, Image.Image):
        return _pil_to_tensor(item)
    if isinstance(item, torch.Tensor):
        if item.dim() != 3 or item.shape[0] not in (1, 3):
            raise ValueError(f"image {index}: expected a (3,H,W) tensor, got {tuple(item.shape)}")
        return _check_range(item, f"image {index}").expand(3, -1, -1)
    if isinstance(item, (str, os.PathLike)):
        from genlab.data.images import read_image

        return _pil_to_tensor(read_image(Path(item)))
    raise TypeError(
        f"image {index}: expected a PIL image, a (3,H,W) tensor or an image file, "
        f"got {type(item).__name__}"
    )


def _num_images(images: Images) -> int:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"an image tensor must be (B,3,H,W) in [0,1], got shape {tuple(images.shape)}"
            )
        return images.shape[0]
    if isinstance(images, (str, os.PathLike, Image.Image)):
        raise TypeError("images must be a list (or a (B,3,H,W) tensor), not a single image")
    return len(images)


def _image_batches(images: Images, batch_size: int) -> Iterator[torch.Tensor | list[torch.Tensor]]:
    """Yield ``(b,3,H,W)`` float tensors or lists of ``(3,H,W)`` ones, ``batch_size`` at a time."""
    n = _num_images(images)
    for start in range(0, n, batch_size):
        if isinstance(images, torch.Tensor):
            chunk = images[start : start + batch_size]
            yield _check_range(chunk, f"images[{start}:{start + len(chunk)}]").expand(-1, 3, -1, -1)
        else:
            chunk = images[start : start + batch_size]
            yield [_item_to_tensor(item, start + i) for i, item in enumerate(chunk)]


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


def _seeded_build(seed: int, build):
    """Run ``build()`` with the global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class _FrozenImageEncoder(nn.Module):
    """Frozen image tower: ``forward(images) -> (B, feature_dim)`` unit-norm, float32, no grad."""

    feature_dim: int
    preprocess: ImagePreprocess

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> _FrozenImageEncoder:  # noqa: D102 - frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images: Images, batch_size: int | None = None) -> torch.Tensor:
        """Unit-norm features ``(B, feature_dim)`` on the model's device, ``batch_size`` at a time."""
        feats = [torch.empty(0, self.feature_dim, device=self.device)]
        for batch in _image_batches(images, batch_size or self.batch_size):
            if isinstance(batch, torch.Tensor):
                batch = batch.to(self.device)
            else:
                batch = [img.to(self.device) for img in batch]
            pixels = self.preprocess(batch).to(self.dtype)
            feats.append(F.normalize(self._encode_pixels(pixels).float(), dim=-1))
        return torch.cat(feats)


class DinoImageEncoder(_FrozenImageEncoder):
    """Self-supervised ViT (DINO, timm) whose CLS features score subject fidelity.

    ``pretrained``: None (random weights of ``model_name``), ``"hub"`` (the model's own
    weights through the Hugging Face hub cache) or a local ``.safetensors``/``.pth`` file of
    that architecture. ``tiny=True`` builds a small ViT (:data:`TINY_DINO_CONFIG`) with
    seeded random weights instead, for tests and offline runs. Preprocessing is timm's eval
    config of the model (DINO: bicubic resize of the shorter side to 248 px, 224 px centre
    crop, ImageNet mean/std). ``forward(images)`` gives unit-norm ``(B, D)`` features.

    When weights are asked for and cannot be loaded, raises
    :class:`~genlab.pretrained.WeightsUnavailableError` naming ``config_key``.
    """

    def __init__(
        self,
        model_name: str = "vit_small_patch16_224.dino",
        pretrained: str | None = "hub",
        tiny: bool = False,
        batch_size: int = 32,
        seed: int = 0,
        config_key: str = "metrics.dino.pretrained",
    ) -> None:
        super().__init__(batch_size)
        import timm

        if tiny and pretrained:
            raise ValueError(
                f"tiny=True builds random weights; set pretrained=null with it, not {pretrained!r}"
            )
        if tiny:
            from timm.models.vision_transformer import VisionTransformer

            model = _seeded_build(
                seed,
                lambda: VisionTransformer(num_classes=0, global_pool="token", **TINY_DINO_CONFIG),
            )
            size = TINY_DINO_CONFIG["img_size"]
            data_cfg = {
                "input_size": (3, size, size),
                "interpolation": "bicubic",
                "crop_pct": 0.9,
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
            }
        else:
            model = _seeded_build(
                seed, lambda: self._create(timm, model_name, pretrained, config_key)
            )
            data_cfg = timm.data.resolve_model_data_config(model)
        self.model = model.requires_grad_(False).eval()
        self.model_name = "tiny" if tiny else model_name
        self.feature_dim = int(model.num_features)
        self.preprocess = ImagePreprocess(
            size=tuple(data_cfg["input_size"][-2:]),
            mean=tuple(data_cfg["mean"]),
            std=tuple(data_cfg["std"]),
            interpolation="bilinear" if data_cfg["interpolation"] == "bilinear" else "bicubic",
            resize_mode="shortest",
            crop_pct=float(data_cfg.get("crop_pct") or 1.0),
        )

    @staticmethod
    def _create(timm, model_name: str, pretrained: str | None, config_key: str) -> nn.Module:
        if not model_name.startswith("hf-hub:") and not timm.is_model(model_name):
            raise ValueError(f"unknown timm model {model_name!r}")
        if pretrained is None:
            return timm.create_model(model_name, pretrained=False, num_classes=0)
        kwargs: dict[str, Any] = {}
        if pretrained != "hub":
            path = local_path(pretrained)
            if path is None or not path.is_file():
                err = FileNotFoundError(f"no such file: {pretrained}")
                raise weights_unavailable(
                    f"timm {model_name}", str(pretrained), config_key, err, _tiny_choice(config_key)
                ) from err
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        try:
            return timm.create_model(model_name, pretrained=True, num_classes=0, **kwargs)
        except Exception as err:  # noqa: BLE001 - any download/IO failure gets the same clear message
            raise weights_unavailable(
                f"timm {model_name}", str(pretrained), config_key, err, _tiny_choice(config_key)
            ) from err

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)  # num_classes=0, token pooling: the final-norm CLS feature

    def forward(self, images: Images) -> torch.Tensor:
        """Unit-norm CLS features ``(B, D)`` of ``images``."""
        return self.encode_images(images)


class ClipImageTextScorer(_FrozenImageEncoder):
    """open_clip model giving unit-norm image and text features in one embedding space.

    ``pretrained``: an open_clip tag (downloaded through the hub cache; tags trained with
    QuickGELU, such as ``openai``, get it automatically), a local checkpoint file (for a
    local copy of the OpenAI weights use ``model_name=ViT-B-32-quickgelu``) or None (random
    weights). ``tiny=True`` builds a small CLIP from :data:`TINY_CLIP_CONFIG` with seeded
    random weights and open_clip's own BPE tokenizer, for tests and offline runs.
    Preprocessing is the model's own (open_clip's size, resize mode, interpolation,
    mean/std). ``forward(images, prompts)`` is the cosine similarity of each image-prompt pair.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        tiny: bool = False,
        batch_size: int = 32,
        seed: int = 0,
        config_key: str = "metrics.clip.pretrained",
    ) -> None:
        super().__init__(batch_size)
        import open_clip

        if tiny and pretrained:
            raise ValueError(
                f"tiny=True builds random weights; set pretrained=null with it, not {pretrained!r}"
            )
        if tiny:
            from dataclasses import asdict

            from open_clip.tokenizer import SimpleTokenizer
            from open_clip.transform import PreprocessCfg

            model = _seeded_build(seed, lambda: open_clip.CLIP(**copy.deepcopy(TINY_CLIP_CONFIG)))
            size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
            open_clip.set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=size)))
            tokenizer = SimpleTokenizer(
                context_length=TINY_CLIP_CONFIG["text_cfg"]["context_length"]
            )
        else:
            model = _seeded_build(
                seed, lambda: self._create(open_clip, model_name, pretrained, config_key)
            )
            tokenizer = open_clip.get_tokenizer(model_name)
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.model_name = "tiny" if tiny else model_name
        self.feature_dim = int(model.text_projection.shape[-1])
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.preprocess = ImagePreprocess(
            size=(size, size) if isinstance(size, int) else tuple(size[-2:]),
            mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
            interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
            resize_mode=cfg.get("resize_mode", "shortest"),
            fill=float(cfg.get("fill_color", 0)) / 255.0,
        )

    @staticmethod
    def _create(open_clip, model_name: str, pretrained: str | None, config_key: str) -> nn.Module:
        has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
        if not has_schema and open_clip.get_model_config(model_name) is None:
            raise ValueError(f"unknown open_clip model {model_name!r}")
        if pretrained is None:
            return open_clip.create_model(model_name, pretrained=None)
        path = local_path(pretrained)
        tag_cfg = {} if path else open_clip.get_pretrained_cfg(model_name, pretrained)
        try:
            return open_clip.create_model(
                model_name,
                pretrained=str(path or pretrained),
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            )
        except Exception as err:  # noqa: BLE001 - any download/IO failure gets the same clear message
            raise weights_unavailable(
                f"open_clip {model_name}",
                str(pretrained),
                config_key,
                err,
                _tiny_choice(config_key),
            ) from err

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def image_features(self, images: Images, batch_size: int | None = None) -> torch.Tensor:
        """Unit-norm image features ``(B, D)`` on the model's device."""
        return self.encode_images(images, batch_size)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Unit-norm text features ``(len(prompts), D)`` on the model's device."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        step = batch_size or self.batch_size
        feats = [torch.empty(0, self.feature_dim, device=self.device)]
        for start in range(0, len(prompts), step):
            tokens = self.tokenizer(prompts[start : start + step]).to(self.device)
            feats.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(feats)

    def forward(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity ``(B,)`` of each image with its prompt."""
        if _num_images(images) != len(prompts):
            raise ValueError(f"{_num_images(images)} images but {len(prompts)} prompts")
        return paired_similarity(self.image_features(images), self.text_features(prompts))


def _tiny_choice(config_key: str) -> str:
    prefix = config_key.rsplit(".", 1)[0] if "." in config_key else ""
    return f"{prefix}.tiny=true" if prefix else "tiny=true"


# --------------------------------------------------------------------------------------------
# Scores (pure functions of features)
# --------------------------------------------------------------------------------------------


def remove_identifier(prompt: str, identifier: str | None) -> str:
    """``prompt`` without the whole-word ``identifier``, whitespace collapsed.

    ``"a photo of sksToy toy on the beach"`` -> ``"a photo of toy on the beach"``. Matching
    is case-sensitive and on word boundaries (``"sksToys"`` stays); a space left before
    punctuation is removed. ``identifier`` None or empty only collapses whitespace.
    """
    if identifier:
        prompt = re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", " ", prompt)
        prompt = re.sub(r"\s+([,.;:!?])", r"\1", prompt)
    return " ".join(prompt.split())


def mean_reference_similarity(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each row of ``features`` (N,D) to all ``references`` (M,D): (N,)."""
    _check_features(features, "features")
    _check_features(references, "references")
    a = F.normalize(features.detach().double().cpu(), dim=-1)
    b = F.normalize(references.detach().double().cpu(), dim=-1)
    return (a @ b.T).mean(dim=1)


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row ``i`` of ``a`` with row ``i`` of ``b`` (both (N,D)): (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"paired features differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a = F.normalize(a.detach().double().cpu(), dim=-1)
    b = F.normalize(b.detach().double().cpu(), dim=-1)
    return (a * b).sum(dim=-1)


def _check_features(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be (N,D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")


@dataclass(frozen=True)
class SubjectFidelityScores:
    """DINO, CLIP-I and CLIP-T means over all generated images, and per prompt.

    ``per_prompt[prompt]`` (prompts as given, in order of first appearance) holds the means
    over that prompt's images: ``{"dino", "clip_i", "clip_t", "num_images"}``.
    """

    dino: float
    clip_i: float
    clip_t: float
    per_prompt: dict[str, dict[str, float]] = field(default_factory=dict)
    num_images: int = 0
    num_references: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "dino": self.dino,
            "clip_i": self.clip_i,
            "clip_t": self.clip_t,
            "per_prompt": {p: dict(v) for p, v in self.per_prompt.items()},
            "num_images": self.num_images,
            "num_references": self.num_references,
        }


def subject_fidelity_from_features(
    prompts: Sequence[str],
    dino_images: torch.Tensor,
    dino_references: torch.Tensor,
    clip_images: torch.Tensor,
    clip_references: torch.Tensor,
    clip_texts: torch.Tensor,
) -> SubjectFidelityScores:
    """DreamBooth scores from features (rows are normalised here; computed in float64 on CPU).

    ``prompts[i]`` generated image ``i``; ``dino_images``/``clip_images`` are (N,D) features of
    the generated images, ``dino_references``/``clip_references`` (M,D) those of the reference
    photos, ``clip_texts`` (N,D) the CLIP text feature of each image's prompt (identifier
    removed). Per image: ``dino = mean_j cos(dino_images[i], dino_references[j])``, ``clip_i``
    likewise, ``clip_t = cos(clip_images[i], clip_texts[i])``; the scores are means over
    images, and per prompt over that prompt's images.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("no generated images to score")
    if dino_references.shape[0] == 0 or clip_references.shape[0] == 0:
        raise ValueError("no reference images of the subject")
    if dino_references.shape[0] != clip_references.shape[0]:
        raise ValueError(
            f"{dino_references.shape[0]} DINO reference features but "
            f"{clip_references.shape[0]} CLIP ones"
        )
    for name, feats in (("dino_images", dino_images), ("clip_images", clip_images)):
        if feats.shape[0] != n:
            raise ValueError(f"{n} prompts but {feats.shape[0]} rows in {name}")
    per_image = {
        "dino": mean_reference_similarity(dino_images, dino_references),
        "clip_i": mean_reference_similarity(clip_images, clip_references),
        "clip_t": paired_similarity(clip_images, clip_texts),
    }
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    per_prompt: dict[str, dict[str, float]] = {}
    for prompt, idx in groups.items():
        rows = torch.tensor(idx)
        entry = {name: float(values[rows].mean()) for name, values in per_image.items()}
        entry["num_images"] = len(idx)
        per_prompt[prompt] = entry
    means = {name: float(values.mean()) for name, values in per_image.items()}
    return SubjectFidelityScores(
        per_prompt=per_prompt,
        num_images=n,
        num_references=int(dino_references.shape[0]),
        **means,
    )


# --------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceFeatures:
    """DINO and CLIP image features ``(M, D)`` of the M reference photos of the subject."""

    dino: torch.Tensor
    clip: torch.Tensor

    def __post_init__(self) -> None:
        if self.dino.shape[0] == 0 or self.clip.shape[0] == 0:
            raise ValueError("no reference images of the subject")
        if self.dino.shape[0] != self.clip.shape[0]:
            raise ValueError(
                f"{self.dino.shape[0]} DINO reference features but {self.clip.shape[0]} CLIP ones"
            )

    def __len__(self) -> int:
        return int(self.dino.shape[0])


class SubjectFidelity(nn.Module):
    """DreamBooth's DINO, CLIP-I and CLIP-T scores of generated images of one subject.

    ``forward(images, prompts, references)`` encodes the generated ``images`` (and the
    reference photos, unless :class:`ReferenceFeatures` are given) in batches on the
    encoders' devices, without gradients, and returns :class:`SubjectFidelityScores`.
    ``prompts[i]`` is the prompt that generated ``images[i]``; for CLIP-T, ``identifier``
    (the rare token that names the subject) is removed from it first.

    The features of the last reference list (or tensor) are cached, keyed by the identity of
    that object: passing the same list again reuses them (do not change it in place in
    between), :meth:`reference_features` returns them to keep and reuse explicitly.
    """

    def __init__(
        self,
        dino: DinoImageEncoder,
        clip: ClipImageTextScorer,
        identifier: str | None = "sksToy",
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dino = dino
        self.clip = clip
        self.identifier = identifier
        self.batch_size = batch_size
        self._reference_cache: tuple[object, ReferenceFeatures] | None = None

    def reference_features(self, references: Images | ReferenceFeatures) -> ReferenceFeatures:
        """DINO and CLIP features of the reference photos (cached for the same object)."""
        if isinstance(references, ReferenceFeatures):
            return references
        cached = self._reference_cache
        if cached is not None and cached[0] is references:
            return cached[1]
        if _num_images(references) == 0:
            raise ValueError("no reference images of the subject")
        feats = ReferenceFeatures(
            dino=self.dino.encode_images(references, self.batch_size),
            clip=self.clip.image_features(references, self.batch_size),
        )
        self._reference_cache = (references, feats)
        return feats

    def clip_t_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The texts CLIP-T scores: ``prompts`` with the identifier removed."""
        return [remove_identifier(p, self.identifier) for p in prompts]

    def forward(
        self,
        images: Images,
        prompts: Sequence[str],
        references: Images | ReferenceFeatures,
    ) -> SubjectFidelityScores:
        """Score generated ``images`` (made from ``prompts``) against the subject's references."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per image, not one string")
        prompts = list(prompts)
        n = _num_images(images)
        if n == 0:
            raise ValueError("no generated images to score")
        if len(prompts) != n:
            raise ValueError(f"{n} generated images but {len(prompts)} prompts (one per image)")
        refs = self.reference_features(references)
        texts = self.clip_t_prompts(prompts)
        unique = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        text_feats = self.clip.text_features(list(unique), self.batch_size)
        rows = torch.tensor([unique[t] for t in texts], device=text_feats.device)
        return subject_fidelity_from_features(
            prompts,
            dino_images=self.dino.encode_images(images, self.batch_size),
            dino_references=refs.dino,
            clip_images=self.clip.image_features(images, self.batch_size),
            clip_references=refs.clip,
            clip_texts=text_feats[rows],
        )
