"""genlab's own geometry code (backend="genlab") against real pytorch3d, on random and real meshes.

Runs only where pytorch3d imports (``make parity`` builds that environment); everywhere else
the whole module is skipped.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from skimage.draw import ellipsoid

from genlab.geometry.marching_cubes import marching_cubes_index_space
from genlab.geometry.mesh_batch import MeshBatch, pytorch3d_available
from genlab.geometry.mesh_losses import (
    chamfer_distance,
    mesh_edge_loss,
    mesh_laplacian_smoothing,
    mesh_normal_consistency,
    nearest_neighbor_sq_dists,
    sample_points_from_meshes,
)
from tests.conftest import shared_path

if not pytorch3d_available():
    pytest.skip("pytorch3d is not installed (make parity installs it)", allow_module_level=True)

from pytorch3d import loss as p3d_loss  # noqa: E402
from pytorch3d import ops as p3d_ops  # noqa: E402
from pytorch3d.ops.marching_cubes import marching_cubes as p3d_marching_cubes  # noqa: E402
from pytorch3d.structures import Meshes  # noqa: E402

G = {"backend": "genlab"}


def _flatten(value) -> torch.Tensor:
    if isinstance(value, tuple):
        return torch.cat([v.reshape(-1) for v in value])
    return value.reshape(-1)


# ---------------------------------------------------------------------------- chamfer

REDUCTIONS = [
    (point, batch)
    for point, batch in itertools.product(["mean", "sum", "max", None], ["mean", "sum", None])
    if not (point is None and batch is not None)
]


@pytest.mark.parametrize(("point_reduction", "batch_reduction"), REDUCTIONS)
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("single_directional", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_chamfer_matches(
    point_reduction, batch_reduction, norm, single_directional, ragged, record_diff
) -> None:
    gen = torch.Generator().manual_seed(norm * 7 + ragged)
    x = torch.rand(4, 300, 3, generator=gen) - 0.5
    y = torch.rand(4, 211, 3, generator=gen) - 0.5
    lengths = {}
    if ragged:
        lengths = {
            "x_lengths": torch.tensor([300, 17, 150, 1]),
            "y_lengths": torch.tensor([5, 211, 90, 211]),
        }
    kwargs = dict(
        point_reduction=point_reduction,
        batch_reduction=batch_reduction,
        norm=norm,
        single_directional=single_directional,
        **lengths,
    )
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    ours = chamfer_distance(xs, ys, chunk_size=37, **G, **kwargs)
    xt, yt = x.clone().requires_grad_(), y.clone().requires_grad_()
    theirs = p3d_loss.chamfer_distance(xt, yt, **kwargs)[0]
    assert type(ours) is type(theirs)
    ours_flat, theirs_flat = _flatten(ours), _flatten(theirs)
    assert ours_flat.shape == theirs_flat.shape
    diff = record_diff(f"chamfer norm={norm} value", ours_flat, theirs_flat)
    assert diff <= 1e-6 * max(1.0, float(theirs_flat.detach().abs().max()))
    ours_flat.sum().backward()
    theirs_flat.sum().backward()
    record_diff(f"chamfer norm={norm} grad", xs.grad, xt.grad)
    torch.testing.assert_close(xs.grad, xt.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ys.grad, yt.grad, rtol=1e-4, atol=1e-6)


def test_chamfer_real_clouds(shared_testdata: Path, record_diff) -> None:
    # pytorch3d's CPU knn supports float32 only
    bunny = trimesh.load(shared_path(shared_testdata, "point_cloud_utils", "bunny.ply"))
    points = torch.as_tensor(np.asarray(bunny.vertices), dtype=torch.float32)
    points = (points - points.mean(0)) / (points.max(0).values - points.min(0).values).max()
    other = points.flip(1) * 0.9 + 0.01
    ours = chamfer_distance(points[None], other[None], **G)
    theirs = p3d_loss.chamfer_distance(points[None], other[None])[0]
    record_diff("chamfer bunny vs scaled copy", ours, theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_nearest_neighbour_matches_knn(record_diff) -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 500, 3, generator=gen), torch.rand(2, 400, 3, generator=gen)
    dists, idx = nearest_neighbor_sq_dists(x, y, chunk_size=64)
    knn = p3d_ops.knn_points(x, y, K=1)
    record_diff("nearest neighbour sq dists", dists, knn.dists[..., 0])
    torch.testing.assert_close(dists, knn.dists[..., 0], rtol=1e-5, atol=1e-7)
    assert (idx == knn.idx[..., 0]).float().mean() > 0.999  # ties may pick either point


# ---------------------------------------------------------------------------- meshes


def _normalised(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    mesh = mesh.copy()
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    mesh.apply_scale(0.9 / mesh.extents.max())
    return mesh


@pytest.fixture(scope="module")
def real_meshes(shared_testdata: Path) -> list[trimesh.Trimesh]:
    paths = [
        ("pytorch3d", "teapot.obj"),
        ("pytorch3d", "cow_mesh", "cow.obj"),
        ("trimesh", "ballA.off"),
        ("trimesh", "joined_tetrahedra.obj"),  # non-manifold edges
    ]
    meshes = []
    for parts in paths:
        loaded = trimesh.load(shared_path(shared_testdata, *parts), force="mesh", process=False)
        meshes.append(_normalised(loaded))
    meshes.append(trimesh.creation.icosphere(subdivisions=2, radius=0.4))
    return meshes


def _batches(real_meshes: list[trimesh.Trimesh]) -> dict[str, tuple[list, list]]:
    gen = torch.Generator().manual_seed(0)
    real = [torch.as_tensor(m.vertices, dtype=torch.float32) for m in real_meshes]
    faces = [torch.as_tensor(m.faces, dtype=torch.int64) for m in real_meshes]
    noisy = [v + 0.01 * torch.randn(v.shape, generator=gen) for v in real]
    random_verts = [torch.rand(30, 3, generator=gen) for _ in range(3)]
    # random triangles with three distinct corners (a repeated corner makes the normal and
    # the cotangents 0/0: both libraries then return rounding noise)
    random_faces = [torch.rand(50, 30, generator=gen).argsort(dim=1)[:, :3] for _ in range(3)]
    return {
        "real": (real, faces),
        "real+noise": (noisy, faces),
        "random soup": (random_verts, random_faces),
    }


LOSSES = {
    "edge": lambda m, **kw: mesh_edge_loss(m, **kw),
    "edge target 0.05": lambda m, **kw: mesh_edge_loss(m, target_length=0.05, **kw),
    "laplacian uniform": lambda m, **kw: mesh_laplacian_smoothing(m, "uniform", **kw),
    "laplacian cot": lambda m, **kw: mesh_laplacian_smoothing(m, "cot", **kw),
    "laplacian cotcurv": lambda m, **kw: mesh_laplacian_smoothing(m, "cotcurv", **kw),
    "normal consistency": lambda m, **kw: mesh_normal_consistency(m, **kw),
}


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_mesh_losses_match(loss_name: str, real_meshes, record_diff) -> None:
    loss_fn = LOSSES[loss_name]
    for batch_name, (verts, faces) in _batches(real_meshes).items():
        ours_v = [v.clone().requires_grad_() for v in verts]
        theirs_v = [v.clone().requires_grad_() for v in verts]
        ours = loss_fn(MeshBatch(ours_v, faces), **G)
        theirs = loss_fn(Meshes(verts=theirs_v, faces=faces), backend="pytorch3d")
        record_diff(f"{loss_name} value", ours.reshape(-1), theirs.reshape(-1))
        torch.testing.assert_close(ours.reshape(-1), theirs.reshape(-1), rtol=2e-5, atol=1e-7)
        # the genlab losses also accept a pytorch3d Meshes
        again = loss_fn(Meshes(verts=verts, faces=faces), **G)
        torch.testing.assert_close(again.reshape(-1), ours.detach().reshape(-1))
        if batch_name == "real":
            # flat patches of the unperturbed meshes have a zero Laplacian, where the gradient
            # of its norm is the direction of float rounding noise: compare gradients elsewhere
            continue
        ours.sum().backward()
        theirs.sum().backward()
        ours_g = torch.cat([v.grad for v in ours_v])
        theirs_g = torch.cat([v.grad for v in theirs_v])
        record_diff(f"{loss_name} grad", ours_g, theirs_g)
        relative = float((ours_g - theirs_g).norm() / theirs_g.norm())
        record_diff(f"{loss_name} grad (relative L2)", torch.tensor(relative), torch.tensor(0.0))
        assert relative < 2e-4, (batch_name, relative)


def test_packed_views_match(real_meshes) -> None:
    for verts, faces in _batches(real_meshes).values():
        ours, theirs = MeshBatch(verts, faces), Meshes(verts=verts, faces=faces)
        assert torch.equal(ours.edges_packed(), theirs.edges_packed())
        assert torch.equal(ours.edges_packed_to_mesh_idx(), theirs.edges_packed_to_mesh_idx())
        assert torch.equal(
            ours.faces_packed_to_edges_packed(), theirs.faces_packed_to_edges_packed()
        )
        assert torch.equal(ours.faces_packed(), theirs.faces_packed())
        assert torch.equal(ours.num_edges_per_mesh().long(), theirs.num_edges_per_mesh().long())
        assert torch.equal(ours.verts_padded(), theirs.verts_padded())
        assert torch.equal(ours.to_pytorch3d().edges_packed(), theirs.edges_packed())


def test_sampling_distribution_matches(real_meshes, record_diff) -> None:
    meshes = real_meshes[:3]
    verts = [torch.as_tensor(m.vertices, dtype=torch.float32) for m in meshes]
    faces = [torch.as_tensor(m.faces, dtype=torch.int64) for m in meshes]
    torch.manual_seed(0)
    theirs = p3d_ops.sample_points_from_meshes(Meshes(verts=verts, faces=faces), 6000)
    ours = sample_points_from_meshes(
        MeshBatch(verts, faces), 6000, generator=torch.Generator().manual_seed(1)
    )
    ours_again = sample_points_from_meshes(
        MeshBatch(verts, faces), 6000, generator=torch.Generator().manual_seed(2)
    )
    # independent uniform samples of the same surfaces: pytorch3d's sample is as far from
    # ours as a second sample of ours is (sampling noise), and the means agree
    gap = chamfer_distance(ours, theirs, batch_reduction=None, **G)
    noise = chamfer_distance(ours, ours_again, batch_reduction=None, **G)
    assert (gap < 1.3 * noise).all(), (gap, noise)
    record_diff("sampling: mean of points", ours.mean(1), theirs.mean(1))
    torch.testing.assert_close(ours.mean(1), theirs.mean(1), atol=8e-3, rtol=0)


# ---------------------------------------------------------------------------- marching cubes


def _volumes() -> dict[str, tuple[np.ndarray, float]]:
    x = np.arange(20, dtype=np.float32)
    gx, gy, gz = np.meshgrid(x, x, x, indexing="ij")
    sphere = (gx - 10) ** 2 + (gy - 10) ** 2 + (gz - 10) ** 2
    base = ellipsoid(6, 10, 16, levelset=True)
    double = np.concatenate((base[:-1], base[2:]), axis=0).astype(np.float32)
    rng = np.random.default_rng(0)
    from scipy import ndimage

    blobs = ndimage.gaussian_filter(rng.random((24, 20, 28)), sigma=2.5)
    # pytorch3d snaps a vertex onto a grid point when |level - value| < 1e-5 (absolute); the
    # smoothed noise spans only ~0.05, so standardise it to keep that snapping out of the way
    blobs = ((blobs - np.median(blobs)) / blobs.std()).astype(np.float32)
    return {
        "sphere level 64": (sphere.astype(np.float32), 64.0),
        "double ellipsoid": (double, 0.001),
        "random blobs": (blobs, 0.0),
    }


@pytest.mark.parametrize("name", list(_volumes()))
def test_marching_cubes_matches(name: str, record_diff) -> None:
    volume, level = _volumes()[name]
    verts, faces = marching_cubes_index_space(volume, level)
    p3d_verts, p3d_faces = p3d_marching_cubes(
        torch.from_numpy(volume)[None], isolevel=level, return_local_coords=False
    )
    # pytorch3d returns (x, y, z) = (W, H, D) for a (D, H, W) volume: reverse the columns
    theirs = p3d_verts[0].numpy()[:, ::-1].astype(np.float64)
    assert len(faces) == len(p3d_faces[0])
    assert len(verts) == len(theirs)
    ours_t, theirs_t = torch.from_numpy(verts).double(), torch.from_numpy(theirs.copy())
    cd = chamfer_distance(ours_t, theirs_t, point_reduction="max", **G)
    record_diff(f"marching cubes {name} (Hausdorff^2)", cd, torch.zeros(()))
    assert cd.item() < 1e-8
    mine = trimesh.Trimesh(verts, faces, process=False)
    other = trimesh.Trimesh(theirs, p3d_faces[0].numpy(), process=False)
    # same vertices; ambiguous cubes may be split into triangles differently (area ~3e-5 rel)
    assert mine.area == pytest.approx(other.area, rel=1e-4)
    if mine.is_watertight:  # the blobs are cut open by the grid border: no volume there
        assert abs(mine.volume) == pytest.approx(abs(other.volume), rel=1e-5)


def test_auto_backend_uses_pytorch3d_for_float32_only() -> None:
    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, 64, 3, generator=gen), torch.rand(2, 48, 3, generator=gen)
    theirs = p3d_loss.chamfer_distance(x, y)[0]
    assert torch.equal(chamfer_distance(x, y), theirs)  # auto -> pytorch3d itself
    # pytorch3d's CPU knn rejects float64; auto then runs genlab's kernel
    double = chamfer_distance(x.double(), y.double())
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), theirs, rtol=1e-6, atol=0)
    verts, faces = torch.rand(10, 3, generator=gen), torch.tensor([[0, 1, 2], [2, 1, 3]])
    loss32 = mesh_laplacian_smoothing(MeshBatch([verts], [faces]), "cot")
    loss64 = mesh_laplacian_smoothing(MeshBatch([verts.double()], [faces]), "cot")
    torch.testing.assert_close(loss64.float().reshape(-1), loss32.reshape(-1), rtol=1e-5, atol=0)
