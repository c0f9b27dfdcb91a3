"""Headless mesh previews (matplotlib Agg) and image grids for logs and reports.

Previews show a fixed view of genlab's unit cube ``[-0.5, 0.5]^3`` so that pictures of
different meshes are comparable; meshes are not re-centred or re-scaled.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import trimesh
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mpl_toolkits.mplot3d.art3d import Poly3DCollection
from PIL import Image, ImageDraw, ImageFont

__all__ = ["image_grid", "render_mesh_preview"]

_DPI = 100
_AMBIENT = 0.3
_BACKGROUND = (1.0, 1.0, 1.0)
# light: from the camera, raised and turned a little to the left (in the camera's frame)
_LIGHT_OFFSET_DEG = (35.0, 15.0)  # (elevation, azimuth) offsets from the view direction
_ZOOM = 1.0  # the whole unit cube stays inside the frame at any view


def render_mesh_preview(
    mesh: trimesh.Trimesh | None,
    size: int = 256,
    elev: float = 25,
    azim: float = 45,
    color: tuple[float, float, float] = (0.55, 0.65, 0.85),
    title: str | None = None,
    vertical_axis: str = "z",
) -> Image.Image:
    """RGB picture (size x size) of ``mesh`` in the unit cube, Lambert-shaded, axes hidden.

    ``elev``/``azim`` are degrees as in matplotlib's ``view_init``; ``vertical_axis`` picks
    the up axis ("z" for ModelNet-style data, "y" for ShapeNet-style). Shading is two-sided
    so meshes with inconsistent winding still read well; closed meshes are drawn without
    their back faces. ``None`` or a mesh without faces gives a picture that says
    "no surface".
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    fig = Figure(figsize=(size / _DPI, size / _DPI), dpi=_DPI, facecolor=_BACKGROUND)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0), projection="3d")
    _setup_axes(ax, elev, azim, vertical_axis)
    triangles = _triangles(mesh)
    if len(triangles) == 0:
        fig.text(0.5, 0.5, "no surface", ha="center", va="center", fontsize=_font_pt(size, 1.4))
    else:
        normals = _unit_normals(triangles)
        if _is_closed(mesh):
            triangles, normals = _front_faces(triangles, normals, elev, azim, vertical_axis)
        light = _view_direction(
            elev + _LIGHT_OFFSET_DEG[0], azim + _LIGHT_OFFSET_DEG[1], vertical_axis
        )
        shades = _lambert_colors(normals, light, color)
        # edges in the face colour hide hairline seams between adjacent triangles
        poly = Poly3DCollection(
            triangles, facecolors=shades, edgecolors=shades, linewidths=0.3, antialiased=False
        )
        ax.add_collection3d(poly)
    if title:
        fig.text(0.5, 0.98, title, ha="center", va="top", fontsize=_font_pt(size, 1.0))
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba())
    image = image.convert("RGB")
    if image.size != (size, size):  # float rounding of size / dpi
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image


def _setup_axes(ax, elev: float, azim: float, vertical_axis: str) -> None:
    """Fixed unit-cube view: equal aspect, no axes, no panes."""
    if vertical_axis not in ("x", "y", "z"):
        raise ValueError(f"vertical_axis must be 'x', 'y' or 'z', got {vertical_axis!r}")
    ax.view_init(elev=elev, azim=azim, vertical_axis=vertical_axis)
    ax.set_proj_type("ortho")
    ax.set_xlim(-0.5, 0.5)
    ax.set_ylim(-0.5, 0.5)
    ax.set_zlim(-0.5, 0.5)
    ax.set_box_aspect((1.0, 1.0, 1.0), zoom=_ZOOM)
    ax.set_axis_off()
    ax.set_facecolor(_BACKGROUND)


def _triangles(mesh: trimesh.Trimesh | None) -> np.ndarray:
    """(F, 3, 3) float triangles of the mesh; empty for None or a face-less mesh."""
    if mesh is None:
        return np.zeros((0, 3, 3))
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        return np.zeros((0, 3, 3))
    return np.asarray(mesh.vertices, dtype=np.float64)[faces]


def _view_direction(elev: float, azim: float, vertical_axis: str) -> np.ndarray:
    """Unit vector from the origin towards a viewer at (elev, azim) degrees, in data axes."""
    e, a = np.radians(elev), np.radians(azim)
    # in the frame where the vertical axis comes last, as in matplotlib's view_init
    rolled = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
    # the same roll matplotlib applies to its eye position (Axes3D._roll_to_vertical)
    return np.roll(rolled, "xyz".index(vertical_axis) - 2)


def _unit_normals(triangles: np.ndarray) -> np.ndarray:
    """Unit face normals (right-hand winding); zero for zero-area faces."""
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)


def _is_closed(mesh: trimesh.Trimesh) -> bool:
    """Watertight with consistent winding: back faces are hidden and may be culled."""
    try:
        return bool(mesh.is_watertight and mesh.is_winding_consistent)
    except Exception:  # odd inputs: just draw every face
        return False


def _front_faces(
    triangles: np.ndarray, normals: np.ndarray, elev: float, azim: float, vertical_axis: str
) -> tuple[np.ndarray, np.ndarray]:
    """Drop faces turned away from the (orthographic) camera.

    Culling avoids the painter's-algorithm errors of large back faces drawn over front
    faces, and halves the drawing work. Inside-out meshes (negative volume) are handled.
    """
    signed_volume = np.einsum(
        "fi,fi->", triangles[:, 0], np.cross(triangles[:, 1], triangles[:, 2])
    )
    outward = 1.0 if signed_volume >= 0 else -1.0
    visible = outward * (normals @ _view_direction(elev, azim, vertical_axis)) > -1e-9
    return triangles[visible], normals[visible]


def _lambert_colors(
    normals: np.ndarray, light: np.ndarray, color: tuple[float, float, float]
) -> np.ndarray:
    """Per-face RGBA: ambient + diffuse * |n . l| (two-sided); zero normals get ambient."""
    intensity = _AMBIENT + (1.0 - _AMBIENT) * np.abs(normals @ light)
    rgb = np.clip(intensity[:, None] * np.asarray(color, dtype=np.float64)[None, :], 0.0, 1.0)
    return np.concatenate([rgb, np.ones((len(rgb), 1))], axis=1)


def _font_pt(size: int, scale: float) -> float:
    """Font size in points for a picture ``size`` pixels wide."""
    return max(6.0, scale * size / 24.0)


def image_grid(
    images: Sequence[Image.Image],
    ncols: int | None = None,
    labels: Sequence[str] | None = None,
    pad: int = 4,
) -> Image.Image:
    """Tile images (resized to the first one's size) into a grid, optional caption under each.

    ``ncols`` defaults to ``ceil(sqrt(n))``. Captions use DejaVu Sans (matplotlib's own font,
    which covers Latin, Greek and Cyrillic letters such as Turkish "ÇŞĞİ") and are cut with
    "..." when wider than a tile.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    n = len(images)
    ncols = max(1, min(ncols or int(np.ceil(np.sqrt(n))), n))
    nrows = -(-n // ncols)
    width, height = images[0].size
    font = caption_font()
    caption_h = _text_height(font) + pad if labels is not None else 0
    cell_w, cell_h = width + pad, height + caption_h + pad
    grid = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        x = pad + (index % ncols) * cell_w
        y = pad + (index // ncols) * cell_h
        tile = image.convert("RGB")
        if tile.size != (width, height):
            tile = tile.resize((width, height), Image.Resampling.BILINEAR)
        grid.paste(tile, (x, y))
        if labels is not None:
            text = _fit_text(draw, str(labels[index]), font, width)
            text_w = draw.textlength(text, font=font)
            draw.text(
                (x + (width - text_w) / 2, y + height + pad / 2), text, fill="black", font=font
            )
    return grid


@functools.lru_cache(maxsize=1)
def caption_font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` px (shipped with matplotlib); PIL's default font without it."""
    from matplotlib import font_manager

    try:
        path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
        return ImageFont.truetype(path, size)
    except (OSError, ValueError):
        return ImageFont.load_default()


def _text_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom - min(top, 0)) + 2


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, shortened with "..." so that it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
