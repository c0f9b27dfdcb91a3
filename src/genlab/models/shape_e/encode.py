"""The ``encode`` stage: fill ``<root>/latents/`` of an objaverse-layout folder with Shap-E latents.

```
python -m genlab.models.shape_e.encode data/objaverse --checkpoint outputs/enc/model.safetensors
python -m genlab.models.shape_e.encode root=data/synthetic_objaverse --model shape_e_encoder_tiny
python -m genlab.models.shape_e.encode data/objaverse --overwrite --format npy \
    --checkpoint run/model.safetensors model.encoder.width=256
```

Every object with a point cloud under ``points/`` and no latent under ``latents/`` (``.pt`` or
``.npy``) gets ``latents/<object_id>.<format>``: the encoder's ``(num_latents, latent_dim)``
float32 latent of ``num_points`` points drawn from its cloud (seeded by the object id, so a rerun
gives the same latent). The encoder is ``model.encoder`` of the Hydra config
``model=<--model>`` (trailing ``key=value`` arguments override it), with the weights of
``--checkpoint`` (else ``model.encoder_checkpoint``; without either it keeps its random
weights, which is only good for testing the pipeline, and says so).

Existing latents are kept (and their shapes checked) unless ``--overwrite``; files are written
atomically, so an interrupted run leaves whole latents only, and a rerun finishes the rest. This
stage is the one place that writes into a data folder: the latents are part of the dataset
layout.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genlab.atomic import write_bytes_atomic
from genlab.data.objaverse import LATENT_EXTENSIONS, read_latent
from genlab.data.point_clouds import POINT_CLOUD_EXTENSIONS, read_point_cloud, resample
from genlab.models.shape_e.components import LatentShapeError
from genlab.models.shape_e.encoder import ShapEEncoder, load_encoder_checkpoint

__all__ = ["EncodeSummary", "encode_folder", "main"]

log = logging.getLogger(__name__)

FORMATS = ("pt", "npy")


@dataclass
class EncodeSummary:
    """What :func:`encode_folder` did, by object id."""

    encoded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        total = len(self.encoded) + len(self.kept)
        return (
            f"{total} objects: {len(self.encoded)} encoded, "
            f"{len(self.kept)} already had a latent (kept)"
        )


def _by_id(folder: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix in extensions:
                found.setdefault(path.stem, []).append(path)
    return found


def _object_seed(object_id: str) -> int:
    return int.from_bytes(hashlib.sha1(object_id.encode()).digest()[:8], "little")


def load_points(path: Path, num_points: int, object_id: str) -> tuple[np.ndarray, np.ndarray]:
    """``(num_points, 3)`` points and colours (0.5 when the file has none); errors name the file."""
    points, colors = read_point_cloud(path)
    points, colors = resample(
        points,
        num_points,
        "random",
        rng=np.random.default_rng(_object_seed(object_id)),
        colors=colors,
    )
    return points, colors if colors is not None else np.full_like(points, 0.5)


def _latent_bytes(latent: torch.Tensor, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "pt":
        torch.save(latent.contiguous().clone(), buffer)
    else:
        np.save(buffer, latent.numpy(), allow_pickle=False)
    return buffer.getvalue()


def encode_folder(
    root: str | Path,
    encoder: ShapEEncoder,
    overwrite: bool = False,
    fmt: str = "pt",
    num_points: int = 16384,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    only: Sequence[str] | None = None,
) -> EncodeSummary:
    """Write ``latents/<id>.<fmt>`` for the objects of ``root`` without one (all: ``overwrite``).

    ``only``: restrict to these object ids (each must have a point cloud).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root={root}: no such folder")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    clouds = _by_id(root / "points", POINT_CLOUD_EXTENSIONS)
    if not clouds:
        raise FileNotFoundError(
            f"{root / 'points'}: no point clouds ({', '.join(POINT_CLOUD_EXTENSIONS)}) to encode"
        )
    duplicates = {i: p for i, p in clouds.items() if len(p) > 1}
    if duplicates:
        first = next(iter(duplicates.values()))
        raise ValueError(
            f"{len(duplicates)} objects have more than one point cloud, e.g. "
            f"{', '.join(p.name for p in first)}: keep one per object"
        )
    if only is not None:
        unknown = sorted(set(only) - set(clouds))
        if unknown:
            raise ValueError(f"{root / 'points'}: no point cloud for objects {unknown}")
        clouds = {i: clouds[i] for i in only}
    latents_dir = root / "latents"
    existing = _by_id(latents_dir, LATENT_EXTENSIONS)
    expected = tuple(encoder.latent_shape)
    summary = EncodeSummary()
    todo = []
    for object_id in sorted(clouds):
        if object_id in existing and not overwrite:
            for path in existing[object_id]:
                shape = tuple(read_latent(path).shape)
                if shape != expected:
                    raise LatentShapeError(
                        f"{path}: latent shape {shape} but this encoder makes {expected}; "
                        "rerun with --overwrite to replace it"
                    )
            summary.kept.append(object_id)
        else:
            todo.append(object_id)
    encoder = encoder.to(device).eval()
    progress = tqdm(total=len(todo), desc="encoding", unit="object", disable=not todo)
    for start in range(0, len(todo), batch_size):
        ids = todo[start : start + batch_size]
        loaded = [load_points(clouds[i][0], num_points, i) for i in ids]
        points = torch.from_numpy(np.stack([p for p, _ in loaded])).float().to(device)
        colors = torch.from_numpy(np.stack([c for _, c in loaded])).float().to(device)
        with torch.no_grad():
            latents = encoder(points, colors).float().cpu()
        if tuple(latents.shape[1:]) != expected or not torch.isfinite(latents).all():
            raise LatentShapeError(
                f"the encoder returned latents of shape {tuple(latents.shape[1:])} "
                f"(finite: {bool(torch.isfinite(latents).all())}), expected finite {expected}"
            )
        for object_id, latent in zip(ids, latents, strict=True):
            target = latents_dir / f"{object_id}.{fmt}"
            write_bytes_atomic(target, _latent_bytes(latent, fmt))
            for old in existing.get(object_id, []):
                if old != target:
                    old.unlink()  # one latent per object (the datamodule flags duplicates)
            summary.encoded.append(object_id)
        progress.update(len(ids))
    progress.close()
    return summary


def build_encoder(model: str, overrides: Sequence[str], checkpoint: str | None) -> ShapEEncoder:
    """``model.encoder`` of the composed training config, with ``checkpoint`` loaded."""
    from hydra.utils import instantiate

    from genlab.data.cli import compose_train_config

    cfg = compose_train_config([f"model={model}", *overrides], output_dir=Path.cwd())
    encoder = instantiate(cfg.model.encoder)
    checkpoint = checkpoint or cfg.model.get("encoder_checkpoint")
    if checkpoint:
        load_encoder_checkpoint(encoder, checkpoint)
        log.info("encoder weights: %s", checkpoint)
    else:
        log.warning(
            "no --checkpoint and no model.encoder_checkpoint: the encoder has random weights; "
            "its latents are only good for testing the pipeline"
        )
    return encoder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m genlab.models.shape_e.encode",
        description="Fill <root>/latents/ with Shap-E latents of the objects' point clouds.",
    )
    parser.add_argument("root", help="objaverse-layout folder (`root=PATH` works too)")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. model.encoder.width=256"
    )
    parser.add_argument("--model", default="shape_e_encoder", help="config in conf/model/")
    parser.add_argument(
        "--checkpoint", default=None, help="encoder weights (.pt/.safetensors/.ckpt)"
    )
    parser.add_argument("--overwrite", action="store_true", help="re-encode existing latents")
    parser.add_argument("--format", choices=FORMATS, default="pt")
    parser.add_argument("--num-points", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", nargs="+", default=None, help="encode only these object ids")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    root = Path(args.root.removeprefix("root="))
    try:
        if not root.is_dir():  # before the (slow) encoder is built
            raise FileNotFoundError(f"root={root}: no such folder")
        encoder = build_encoder(args.model, args.overrides, args.checkpoint)
        summary = encode_folder(
            root,
            encoder,
            overwrite=args.overwrite,
            fmt=args.format,
            num_points=args.num_points,
            batch_size=args.batch_size,
            device=args.device,
            only=args.only,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{summary} -> {root / 'latents'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
