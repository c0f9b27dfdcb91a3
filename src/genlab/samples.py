"""Generated samples and how they are written: meshes (OBJ/PLY/GLB) and images, each with a PNG, plus a grid."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import trimesh
from PIL import Image

from genlab.geometry.mesh_io import save_mesh
from genlab.geometry.render import image_grid, render_mesh_preview


@dataclass
class Sample:
    """One generated sample: a mesh (None when no surface was found) and/or an image."""

    prompt: str
    index: int
    mesh: trimesh.Trimesh | None = None
    image: Image.Image | None = None

    @property
    def stem(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", self.prompt.lower()).strip("_")[:60] or "unconditional"
        return f"{slug}_{self.index:02d}"

    def preview(self, size: int = 256) -> Image.Image:
        if self.image is not None:
            return self.image
        return render_mesh_preview(self.mesh, size=size, title=self.prompt or None)


@dataclass
class WrittenSample:
    sample: Sample
    preview_path: Path
    mesh_path: Path | None


def write_samples(
    samples: list[Sample], out_dir: str | Path, mesh_format: str = "obj"
) -> tuple[list[WrittenSample], Path]:
    """Write each sample (mesh file + PNG preview) and ``grid.png``; returns what was written and the grid path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, previews = [], []
    for s in samples:
        mesh_path = (
            save_mesh(s.mesh, out / f"{s.stem}.{mesh_format.lstrip('.')}")
            if s.mesh is not None
            else None
        )
        preview = s.preview()
        preview_path = out / f"{s.stem}.png"
        preview.save(preview_path)
        previews.append(preview)
        written.append(WrittenSample(s, preview_path, mesh_path))
    grid_path = out / "grid.png"
    image_grid(previews, labels=[f"{s.prompt or '(no prompt)'} #{s.index}" for s in samples]).save(
        grid_path
    )
    return written, grid_path
