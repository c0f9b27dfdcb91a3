"""Generated samples and how they are written: meshes (OBJ/PLY/GLB) and images, each with a PNG, plus a grid."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import trimesh
from PIL import Image

from genlab.geometry.mesh_io import save_mesh
from genlab.geometry.render import image_grid, render_mesh_preview

# letters that Unicode does not decompose into an ASCII letter + marks
_NO_DECOMPOSITION = str.maketrans(
    {
        "ı": "i",
        "ø": "o",
        "Ø": "O",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
        "ß": "ss",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
    }
)


def ascii_fold(text: str) -> str:
    """``text`` with accents dropped and special Latin letters spelled in ASCII
    ("Çini kâse, İznik" -> "Cini kase, Iznik"); other characters are left out."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_NO_DECOMPOSITION))
    return decomposed.encode("ascii", "ignore").decode("ascii")


@dataclass
class Sample:
    """One generated sample: a mesh (None when no surface was found) and/or an image."""

    prompt: str
    index: int
    mesh: trimesh.Trimesh | None = None
    image: Image.Image | None = None

    @property
    def stem(self) -> str:
        """A file name from the prompt: ASCII letters and digits (accents dropped), index last."""
        slug = re.sub(r"[^a-z0-9]+", "_", ascii_fold(self.prompt).lower()).strip("_")[:60]
        if not slug and self.prompt.strip():  # a script without Latin letters: a stable hash
            slug = "prompt_" + hashlib.sha1(self.prompt.encode("utf-8")).hexdigest()[:8]
        return f"{slug or 'unconditional'}_{self.index:02d}"

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
