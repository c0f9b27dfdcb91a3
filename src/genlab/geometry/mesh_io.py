"""Writing meshes to disk, atomically, with the format chosen by the file extension."""

from __future__ import annotations

import os
from pathlib import Path

import trimesh

from genlab.atomic import write_bytes_atomic

__all__ = ["SAVE_FORMATS", "save_mesh"]

#: extension -> trimesh export type
SAVE_FORMATS: dict[str, str] = {
    ".obj": "obj",
    ".ply": "ply",
    ".glb": "glb",
    ".off": "off",
    ".stl": "stl",
}


def save_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike[str]) -> Path:
    """Write ``mesh`` to ``path`` (.obj .ply .glb .off .stl) and return the path.

    Parent folders are created; the file is written to a temporary file in the same folder
    and moved into place, so readers never see a half-written mesh.
    """
    path = Path(path)
    file_type = SAVE_FORMATS.get(path.suffix.lower())
    if file_type is None:
        raise ValueError(
            f"cannot save {path}: unsupported extension {path.suffix!r} "
            f"(supported: {', '.join(SAVE_FORMATS)})"
        )
    data = mesh.export(file_type=file_type)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    return path
