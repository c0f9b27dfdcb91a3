"""``python inference.py task=generate_views image=photo.png``: N RGB views + N normal maps of an object.

The model is rebuilt from the training run's ``.hydra/config.yaml`` (as for ``generate``) and
must be a multi-view diffusion model (``model=mv_diffusion`` / ``mv_diffusion_tiny``). The
photo is read with :func:`genlab.data.images.read_image` (PNG, JPEG, WebP, HEIC, ...); when it
has an alpha channel its background is removed by it: composited onto ``background`` (and,
with ``recenter``, the object cropped, centred and scaled to ``object_scale`` of the frame).
A photo without alpha is used as it is, so remove its background first for best results.

Writes to ``<run>/samples/``: ``<stem>_input.png`` (the conditioning image as the model sees
it), ``<stem>_rgb_XX.png`` and ``<stem>_normal_XX.png`` for the N views, and ``grid.png``
(input column, then the views; an RGB row and a normal row per image).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from genlab.data.mvds import BACKGROUNDS
from genlab.tasks.model_loading import build_model

log = logging.getLogger(__name__)


def images_of(cfg: DictConfig) -> list[Path]:
    """``image=...`` (one) or ``images=[...]``."""
    one, many = cfg.get("image"), cfg.get("images")
    if one is not None and many:
        raise ValueError("give either image=... or images=[...], not both")
    paths = [one] if one is not None else list(many or [])
    if not paths:
        raise ValueError("no input image: pass image=path/to/photo.png (or images=[a.png,b.jpg])")
    return [Path(str(p)).expanduser() for p in paths]


def background_rgb(background: str | Sequence[float]) -> tuple[float, float, float]:
    """A colour name of :data:`genlab.data.mvds.BACKGROUNDS` or 3 numbers in [0, 1]."""
    if isinstance(background, str):
        if background not in BACKGROUNDS:
            raise ValueError(
                f"background must be one of {sorted(BACKGROUNDS)} or [r, g, b] in [0, 1], "
                f"got {background!r}"
            )
        return BACKGROUNDS[background]
    values = tuple(float(c) for c in background)
    if len(values) != 3 or not all(0.0 <= c <= 1.0 for c in values):
        raise ValueError(f"background must be 3 numbers in [0, 1], got {list(background)}")
    return values  # type: ignore[return-value]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def generate_views(
    cfg: DictConfig,
    background: str | Sequence[float] = "white",
    recenter: bool = True,
    object_scale: float = 0.85,
    input_elevation: float | None = None,
    elevations: Sequence[float] | None = None,
    azimuths: Sequence[float] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    device: str = "auto",
) -> list[Path]:
    """Generate the views of every input image; returns the written files (grid last).

    ``input_elevation`` (degrees) is the elevation the photo was taken from; ``elevations``
    and ``azimuths`` (degrees, relative to the input view) place the N views. Each defaults to
    the model's configured layout. ``num_inference_steps`` and ``guidance_scale`` default to
    the model's.
    """
    from genlab.data.images import read_image
    from genlab.models.mv_diffusion.module import (
        MultiViewDiffusion,
        camera_layout,
        prepare_condition_image,
        write_views,
    )

    paths = images_of(cfg)
    bg = background_rgb(background)
    model = build_model(cfg)
    if not isinstance(model, MultiViewDiffusion):
        raise TypeError(
            f"task=generate_views needs a multi-view diffusion run, but {cfg.ckpt_path} holds "
            f"a {type(model).__name__}"
        )
    model.to(_device(device))
    hp = model.hparams
    layout = camera_layout(
        hp.input_elevation if input_elevation is None else input_elevation,
        list(hp.view_elevations if elevations is None else elevations),
        list(hp.view_azimuths if azimuths is None else azimuths),
    )
    if layout[0].shape[0] != model.num_views:
        raise ValueError(
            f"the camera layout has {layout[0].shape[0]} views, the model makes "
            f"{model.num_views} (task.elevations / task.azimuths)"
        )
    size = int(hp.image_size)
    conds = []
    for path in paths:
        image = read_image(path, "RGBA")
        conds.append(
            model.condition_tensor(
                prepare_condition_image(
                    image, size, bg, recenter=recenter, object_scale=object_scale
                )
            )
        )
    generator = torch.Generator().manual_seed(int(cfg.seed))
    out = model.generate_views(
        torch.stack(conds),
        *layout,
        generator=generator,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )
    out_dir = Path(cfg.paths.output_dir) / "samples"
    names = _unique_stems(paths)
    grid = write_views(out_dir, out.rgb, out.normal, torch.stack(conds), names=names)
    files = sorted(p for p in out_dir.glob("*.png") if p != grid) + [grid]
    log.info(
        "wrote %d views x {rgb, normal} for %d image(s) to %s", model.num_views, len(paths), out_dir
    )
    return files


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    stems: list[str] = []
    for p in paths:
        stem, k = p.stem, 1
        while stem in stems:
            k += 1
            stem = f"{p.stem}_{k}"
        stems.append(stem)
    return stems
