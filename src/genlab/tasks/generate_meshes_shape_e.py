"""``python inference.py model=shape_e ckpt_path=<run>/checkpoints/last.ckpt prompt="..."``: meshes from a
fine-tuned Shap-E prior.

Text (``model=shape_e``): ``prompt="a red vase with patterns"`` or ``prompts=[...]``; image
(``model=shape_e_image``): ``image=path.png`` (or ``images=[...]``). ``num_samples`` latents per
condition are sampled with ``guidance_scale`` in ``num_inference_steps`` Heun steps (defaults: the
model's ``validation`` settings), decoded with the Shap-E renderer and written to
``<run>/samples/``: ``<stem>_XX.obj|.ply|.glb`` (``mesh_formats``), a turntable
``<stem>_XX.gif`` (``num_views`` frames of ``frame_size`` pixels), ``grid.png`` (the first view
of every sample, labelled) and ``renders.png`` (every view, a row per sample). The model is
rebuilt from the training run's ``.hydra/config.yaml`` beside the checkpoint
(:func:`genlab.tasks.model_loading.build_model`); sample ``i`` draws its noise from ``seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from genlab.geometry.mesh_io import save_mesh
from genlab.geometry.render import image_grid
from genlab.samples import Sample
from genlab.tasks.generate import prompts_of
from genlab.tasks.model_loading import build_model

log = logging.getLogger(__name__)


def images_of(cfg: DictConfig) -> list[Path]:
    """``image=...`` (one) or ``images=[...]``: existing image files."""
    if cfg.get("image") and cfg.get("images"):
        raise ValueError("give either image=... or images=[...], not both")
    given = [cfg.image] if cfg.get("image") else list(cfg.get("images") or [])
    paths = [Path(str(p)).expanduser() for p in given]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image={path}: no such file")
    return paths


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def generate_meshes_shape_e(
    cfg: DictConfig,
    mesh_formats: Sequence[str] = ("obj", "ply", "glb"),
    device: str = "auto",
) -> list[Path]:
    """Write meshes, GIFs and render grids for the prompts / images of ``cfg``; return the files."""
    from genlab.data.images import read_image
    from genlab.models.shape_e.decode import write_turntable_gif

    model = build_model(cfg, without=("clip_scorer",)).to(resolve_device(device))
    conditioning = getattr(model, "conditioning", None)
    if conditioning is None:
        raise TypeError(f"{type(model).__name__} is not a Shap-E prior (model=shape_e*)")
    if conditioning == "image":
        paths = images_of(cfg)
        if not paths:
            raise ValueError("model=shape_e_image needs image=path.png (or images=[...])")
        if cfg.get("prompt") is not None or cfg.get("prompts"):
            log.warning("an image model ignores prompt / prompts")
        # "images/<object>/000.png" -> "<object>_000": a bare view number says little
        labels = [f"{p.parent.name}_{p.stem}" if p.stem.isdigit() else p.stem for p in paths]
        images = [read_image(p, "RGB", (255, 255, 255)) for p in paths]
        condition = model.encode_condition(images=images)
    else:
        if images_of(cfg):
            raise ValueError("model=shape_e is text-conditioned: give prompt=..., not image=...")
        labels = prompts_of(cfg)
        condition = model.encode_condition(captions=labels)
    per = int(cfg.num_samples)
    generator = torch.Generator(device=model.device).manual_seed(int(cfg.seed))
    generated = model.generate(
        condition,
        labels,
        generator,
        per,
        guidance_scale=cfg.get("guidance_scale"),
        steps=cfg.get("num_inference_steps"),
        frame_size=cfg.get("frame_size"),
        num_views=cfg.get("num_views"),
    )
    out = Path(cfg.paths.output_dir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    firsts, tiles, names = [], [], []
    for k, (mesh, label) in enumerate(zip(generated.meshes, generated.labels, strict=True)):
        stem = Sample(label, k % per).stem
        if mesh is None:
            log.warning("sample %s: empty surface, no mesh written", stem)
        else:
            files += [save_mesh(mesh, out / f"{stem}.{fmt.lstrip('.')}") for fmt in mesh_formats]
        files.append(write_turntable_gif(generated.frames[k], out / f"{stem}.gif"))
        firsts.append(Image.fromarray(generated.frames[k, 0]))
        tiles += [Image.fromarray(f) for f in generated.frames[k]]
        names.append(f"{label} #{k % per}")
    grid = out / "grid.png"
    image_grid(firsts, labels=names).save(grid)
    renders = out / "renders.png"
    image_grid(tiles, ncols=generated.frames.shape[1]).save(renders)
    files += [grid, renders]
    empty = sum(m is None for m in generated.meshes)
    log.info(
        "wrote %d samples for %d condition(s) to %s%s",
        len(generated.meshes),
        len(labels),
        out,
        f" ({empty} without a surface)" if empty else "",
    )
    return files
