"""genlab.geometry mesh/point losses: hand-computed values, dense references, real meshes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from genlab.geometry.marching_cubes import marching_cubes_index_space
from genlab.geometry.mesh_batch import MeshBatch, as_mesh_batch
from genlab.geometry.mesh_losses import (
    chamfer_distance,
    cot_laplacian_weights,
    mesh_edge_loss,
    mesh_laplacian_smoothing,
    mesh_normal_consistency,
    nearest_neighbor_sq_dists,
    sample_points_from_meshes,
    uniform_laplacian_apply,
)
from tests.conftest import shared_path

G = {"backend": "genlab"}


def _dense_chamfer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The textbook O(N*M) formulation the chunked one must equal."""
    d = torch.cdist(x, y) ** 2
    return (d.min(dim=2).values.mean(dim=1) + d.min(dim=1).values.mean(dim=1)).mean()


# ---------------------------------------------------------------------------- chamfer


def test_chamfer_hand_computed_all_reductions() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([[0.0, 0.0, 0.5]])
    # x->y squared: 0.25, 1.25 ; y->x: 0.25
    assert chamfer_distance(x, y, **G).item() == pytest.approx(0.75 + 0.25)
    assert chamfer_distance(x, y, point_reduction="sum", **G).item() == pytest.approx(1.75)
    assert chamfer_distance(x, y, point_reduction="max", **G).item() == pytest.approx(1.25)
    assert chamfer_distance(x, y, single_directional=True, **G).item() == pytest.approx(0.75)
    # L1: x->y 0.5, 1.5 ; y->x 0.5
    assert chamfer_distance(x, y, norm=1, **G).item() == pytest.approx(1.0 + 0.5)
    per_x, per_y = chamfer_distance(x, y, point_reduction=None, batch_reduction=None, **G)
    torch.testing.assert_close(per_x, torch.tensor([[0.25, 1.25]]))
    torch.testing.assert_close(per_y, torch.tensor([[0.25]]))


def test_batch_reductions() -> None:
    x = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    y = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]]])
    per_sample = chamfer_distance(x, y, batch_reduction=None, **G)
    torch.testing.assert_close(per_sample, torch.tensor([2.0, 8.0]))
    assert chamfer_distance(x, y, batch_reduction="sum", **G).item() == pytest.approx(10.0)
    assert chamfer_distance(x, y, **G).item() == pytest.approx(5.0)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_equals_dense_value_and_gradient(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(chunk_size)
    x = torch.rand(2, 150, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 97, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = chamfer_distance(x, y, chunk_size=chunk_size, **G)
    gx, gy = torch.autograd.grad(ours, (x, y))
    dense = _dense_chamfer(x, y)
    dx, dy = torch.autograd.grad(dense, (x, y))
    torch.testing.assert_close(ours, dense, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gx, dx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gy, dy, rtol=1e-9, atol=1e-12)


def test_gradient_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 12, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    for norm in (1, 2):
        assert torch.autograd.gradcheck(
            lambda a, b, n=norm: chamfer_distance(a, b, norm=n, chunk_size=5, **G),
            (x, y),
            eps=1e-7,
        )


def test_ragged_lengths_equal_unpadded_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 40, 3, generator=gen)
    y = torch.rand(3, 30, 3, generator=gen)
    x[:, 25:] = 100.0  # padding that would dominate if it were used
    y[:, 11:] = -100.0
    xl, yl = torch.tensor([40, 25, 3]), torch.tensor([11, 30, 11])
    x[0, 25:] = torch.rand(15, 3, generator=gen)  # row 0 uses all 40 points
    for reduction in ("mean", "sum", "max"):
        batched = chamfer_distance(
            x, y, xl, yl, point_reduction=reduction, batch_reduction=None, chunk_size=6, **G
        )
        rows = torch.stack(
            [
                chamfer_distance(x[i, : xl[i]], y[i, : yl[i]], point_reduction=reduction, **G)
                for i in range(3)
            ]
        )
        torch.testing.assert_close(batched, rows)


def test_nearest_neighbor_kernel() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.9, 0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    dists, idx = nearest_neighbor_sq_dists(x, y, chunk_size=2)
    torch.testing.assert_close(dists, torch.tensor([0.01, 1.0, 0.01]))
    assert idx.tolist() == [1, 0, 0]
    dists, idx = nearest_neighbor_sq_dists(x[None], y[None], y_lengths=torch.tensor([1]))
    torch.testing.assert_close(dists, torch.tensor([[1.0, 1.0, 0.01]]))
    assert idx.tolist() == [[0, 0, 0]]


def test_chamfer_errors() -> None:
    x = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match="batch_reduction"):
        chamfer_distance(x, x, batch_reduction="median", **G)
    with pytest.raises(ValueError, match="point_reduction"):
        chamfer_distance(x, x, point_reduction="median", **G)
    with pytest.raises(ValueError, match="batch_reduction must be None"):
        chamfer_distance(x, x, point_reduction=None, **G)
    with pytest.raises(ValueError, match="norm"):
        chamfer_distance(x, x, norm=3, **G)
    with pytest.raises(ValueError, match="batch sizes differ: 2 vs 3"):
        chamfer_distance(x, torch.rand(3, 5, 3), **G)
    with pytest.raises(ValueError, match=r"x must have shape .* got \(5,\)"):
        chamfer_distance(torch.rand(5), x, **G)
    with pytest.raises(ValueError, match=r"y is empty in batch rows \[1\]"):
        chamfer_distance(x, x, y_lengths=torch.tensor([5, 0]), **G)
    with pytest.raises(ValueError, match=r"x_lengths must lie in \[0, 5\]"):
        chamfer_distance(x, x, x_lengths=torch.tensor([6, 1]), **G)
    with pytest.raises(ValueError, match="backend"):
        chamfer_distance(x, x, backend="numpy")
    with pytest.raises(ValueError, match="chunk_size"):
        chamfer_distance(x, x, chunk_size=0, **G)


def test_16k_points_never_allocate_the_distance_matrix() -> None:
    # the naive matrix would be 16384^2 float32 = 1 GiB; every op here must allocate far less
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 16384, 3, generator=gen, requires_grad=True)
    y = torch.rand(1, 16384, 3, generator=gen, requires_grad=True)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        loss = chamfer_distance(x, y, **G)
        loss.backward()
    # net bytes each op call left allocated (its output): the dense matrix would be 1 GiB
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < 64 * 2**20, largest
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    # uniform random clouds: the mean squared NN distance scales like N^(-2/3)
    assert 0.0005 < loss.item() < 0.003


# ---------------------------------------------------------------------------- MeshBatch


def _tetra(scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]) * scale
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    return verts, faces


def _triangle() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]), torch.tensor([[0, 1, 2]])


def test_mesh_batch_packing_and_edges() -> None:
    tv, tf = _tetra()
    sv, sf = _triangle()
    batch = MeshBatch([tv, sv], [tf, sf])
    assert batch.num_verts_per_mesh().tolist() == [4, 3]
    assert batch.faces_packed()[-1].tolist() == [4, 5, 6]
    assert batch.edges_packed().tolist() == [
        [0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3], [4, 5], [4, 6], [5, 6]
    ]  # fmt: skip
    assert batch.edges_packed_to_mesh_idx().tolist() == [0] * 6 + [1] * 3
    assert batch.num_edges_per_mesh().tolist() == [6, 3]
    assert batch.verts_packed_to_mesh_idx().tolist() == [0] * 4 + [1] * 3
    # column k of face -> edge is the edge opposite corner k
    f2e = batch.faces_packed_to_edges_packed()
    edges = batch.edges_packed()
    for f, face in enumerate(batch.faces_packed().tolist()):
        for k in range(3):
            assert sorted(edges[f2e[f, k]].tolist()) == sorted(face[:k] + face[k + 1 :])
    padded = batch.verts_padded()
    assert padded.shape == (2, 4, 3) and padded[1, 3].abs().sum() == 0
    assert batch.faces_padded()[1, 1:].eq(-1).all()
    mesh = batch.to_trimesh(0)
    assert mesh.is_watertight and mesh.volume == pytest.approx(1 / 6)
    assert as_mesh_batch(batch) is batch


def test_mesh_batch_from_padded() -> None:
    verts = torch.rand(3, 4, 3)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    shared = MeshBatch.from_padded(verts, faces)
    assert len(shared) == 3 and shared.faces_packed()[-1].tolist() == [8, 10, 11]
    per_mesh = torch.tensor([[[0, 1, 2], [-1, -1, -1]], [[0, 1, 2], [0, 2, 3]], [[1, 2, 3]] * 2])
    ragged = MeshBatch.from_padded(verts, per_mesh, num_verts=[3, 4, 4])
    assert ragged.num_faces_per_mesh().tolist() == [1, 2, 2]
    assert ragged.num_verts_per_mesh().tolist() == [3, 4, 4]
    with pytest.raises(ValueError, match=r"faces must have shape \(F, 3\) or \(3, F, 3\)"):
        MeshBatch.from_padded(verts, torch.zeros(2, 2, 3, dtype=torch.long))


def test_mesh_batch_validation_errors() -> None:
    verts, faces = _triangle()
    with pytest.raises(ValueError, match="at least one mesh"):
        MeshBatch([], [])
    with pytest.raises(ValueError, match=r"mesh 0: face index out of range \[0, 3\).*max 3"):
        MeshBatch([verts], [torch.tensor([[0, 1, 3]])])
    with pytest.raises(ValueError, match=r"mesh 1: verts must have shape \(V, 3\), got \(3, 2\)"):
        MeshBatch([verts, verts[:, :2]], [faces, faces])
    with pytest.raises(ValueError, match=r"faces must have shape \(F, 3\), got \(4,\)"):
        MeshBatch([verts], [torch.tensor([0, 1, 2, 3])])
    with pytest.raises(ValueError, match="integer"):
        MeshBatch([verts], [faces.float()])
    with pytest.raises(ValueError, match="2 meshes but faces_list has 1"):
        MeshBatch([verts, verts], [faces])
    with pytest.raises(TypeError, match="pytorch3d Meshes"):
        mesh_edge_loss("not a mesh", **G)


# ---------------------------------------------------------------------------- edge loss


def test_edge_loss_hand_computed() -> None:
    verts, faces = _triangle()  # edge lengths 1, 1, sqrt(2)
    single = MeshBatch([verts], [faces])
    assert mesh_edge_loss(single, **G).item() == pytest.approx((1 + 1 + 2) / 3)
    expected_1 = (math.sqrt(2) - 1) ** 2 / 3
    assert mesh_edge_loss(single, target_length=1.0, **G).item() == pytest.approx(expected_1)
    # per-mesh mean, then mean over meshes: a 2x tetrahedron (edges 2, 2, 2, 2v2 x3)
    tv, tf = _tetra(2.0)
    both = MeshBatch([verts, tv], [faces, tf])
    tetra = (3 * 4 + 3 * 8) / 6
    assert mesh_edge_loss(both, **G).item() == pytest.approx(((4 / 3) + tetra) / 2)


def test_edge_loss_gradient_and_empty() -> None:
    tv, tf = _tetra()
    verts = (tv + 0.1 * torch.rand(4, 3)).double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: mesh_edge_loss(MeshBatch([v], [tf]), target_length=0.3, **G), (verts,)
    )
    empty = MeshBatch([tv], [torch.zeros(0, 3, dtype=torch.long)])
    loss = mesh_edge_loss(empty, **G)
    assert loss.item() == 0.0 and loss.requires_grad


# ---------------------------------------------------------------------------- Laplacian


def test_laplacian_right_triangle_hand_computed() -> None:
    # A=(0,0,0) (90 deg), B=(1,0,0), C=(0,1,0) (45 deg each): cot weights L[A,B]=L[A,C]=1, L[B,C]=0
    mesh = MeshBatch(*[[t] for t in _triangle()])
    uniform = (math.sqrt(0.5) + 2 * math.sqrt(1.25)) / 3
    assert mesh_laplacian_smoothing(mesh, "uniform", **G).item() == pytest.approx(uniform)
    cot = (math.sqrt(0.5) + 1 + 1) / 3  # A: (B+C)/2 - A ; B: A - B ; C: A - C
    assert mesh_laplacian_smoothing(mesh, "cot", **G).item() == pytest.approx(cot)
    # cotcurv: (L v - rowsum v) / (4 * area around vertex), area 0.5
    curv = (math.sqrt(0.5) + 0.5 + 0.5) / 3
    assert mesh_laplacian_smoothing(mesh, "cotcurv", **G).item() == pytest.approx(curv)
    rows, cols, values, inv_areas = cot_laplacian_weights(*_triangle())
    dense = torch.zeros(3, 3).index_put_((rows, cols), values, accumulate=True)
    torch.testing.assert_close(dense, torch.tensor([[0.0, 1, 1], [1, 0, 0], [1, 0, 0]]))
    torch.testing.assert_close(inv_areas.flatten(), torch.full((3,), 2.0))


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat n x n vertex grid in z=0, every quad split along the same diagonal."""
    ij = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1)
    verts = torch.cat([ij.reshape(-1, 2).float(), torch.zeros(n * n, 1)], dim=1)
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, (i + 1) * n + j, (i + 1) * n + j + 1, i * n + j + 1
            faces += [[a, b, c], [a, c, d]]
    return verts, torch.tensor(faces)


def test_laplacian_on_regular_grid() -> None:
    verts, faces = _grid(5)
    mesh = MeshBatch([verts], [faces])
    lap, degree = uniform_laplacian_apply(verts, mesh.edges_packed())
    interior = (verts[:, :2] > 0).all(1) & (verts[:, :2] < 4).all(1)
    assert degree[interior].eq(6).all()
    assert lap[interior].abs().max() < 1e-6  # symmetric 6-neighbourhood: mean = centre
    lifted = verts.clone()
    lifted[12, 2] = 0.6  # centre vertex
    lap, _ = uniform_laplacian_apply(lifted, mesh.edges_packed())
    torch.testing.assert_close(lap[12], torch.tensor([0.0, 0.0, -0.6]))
    # cot Laplacian has linear precision: zero at interior vertices of any flat mesh, so
    # lifting the centre changes the cotcurv loss by exactly the centre's and its ring's terms
    flat = mesh_laplacian_smoothing(mesh, "cotcurv", **G)
    bumped = mesh_laplacian_smoothing(MeshBatch([lifted], [faces]), "cotcurv", **G)
    assert bumped > flat


def test_laplacian_gradient_and_bad_method() -> None:
    tv, tf = _tetra()
    verts = (tv + 0.1 * torch.rand(4, 3)).double().requires_grad_()
    for method in ("uniform", "cot", "cotcurv"):
        loss = mesh_laplacian_smoothing(MeshBatch([verts], [tf]), method, **G)
        (grad,) = torch.autograd.grad(loss, verts)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="method must be"):
        mesh_laplacian_smoothing(MeshBatch([tv], [tf]), "harmonic", **G)


# ---------------------------------------------------------------------------- normals


@pytest.mark.parametrize("angle_deg", [0.0, 60.0, 90.0, 135.0])
def test_normal_consistency_of_a_folded_pair(angle_deg: float) -> None:
    # two triangles sharing the edge (0,0,0)-(1,0,0), the second rotated about it
    a = math.radians(angle_deg)
    verts = torch.tensor(
        [[0.0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, -math.cos(a), math.sin(a)]],
        dtype=torch.float64,
    )
    faces = torch.tensor([[0, 1, 2], [1, 0, 3]])
    loss = mesh_normal_consistency(MeshBatch([verts], [faces]), **G)
    assert loss.item() == pytest.approx(1 - math.cos(a), abs=1e-12)


def test_normal_consistency_closed_and_nonmanifold(shared_testdata: Path) -> None:
    tv, tf = _tetra()
    # corner tetrahedron: 6 edges, each shared by two faces
    loss = mesh_normal_consistency(MeshBatch([tv], [tf]), **G).item()
    cos_90 = 0.0  # three right-angle dihedrals at the origin corner
    cos_other = -1 / math.sqrt(3)  # between the slanted face and each axis-aligned one
    assert loss == pytest.approx(((1 - cos_90) * 3 + (1 - cos_other) * 3) / 6)
    # three faces on one edge: all 3 pairs count
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, -1, 0], [0.5, 0, 1]])
    faces = torch.tensor([[0, 1, 2], [1, 0, 3], [1, 0, 4]])
    value = mesh_normal_consistency(MeshBatch([verts], [faces]), **G).item()
    assert value == pytest.approx((0 + 1 + 1) / 3, abs=1e-6)
    mesh = trimesh.load(shared_path(shared_testdata, "trimesh", "ballA.off"), process=False)
    smooth = mesh_normal_consistency(MeshBatch.from_trimesh([mesh]), **G).item()
    assert 0 < smooth < 0.05  # a smooth closed blob


# ---------------------------------------------------------------------------- sampling


def test_sampling_area_weighted_on_surface_and_differentiable() -> None:
    # two triangles in z=0: areas 0.5 and 1.5 -> 25 % / 75 % of the samples
    verts = torch.tensor(
        [[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [5, 0, 0], [2, 1, 0]], requires_grad=True
    )
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    gen = torch.Generator().manual_seed(0)
    points, normals = sample_points_from_meshes(
        MeshBatch([verts], [faces]), 20000, return_normals=True, generator=gen
    )
    assert points.shape == (1, 20000, 3) and normals.shape == (1, 20000, 3)
    assert points[..., 2].abs().max() == 0
    share_big = (points[0, :, 0] >= 2).float().mean().item()
    assert share_big == pytest.approx(0.75, abs=0.015)
    small = points[0, points[0, :, 0] < 2]
    assert (small[:, 0] + small[:, 1] <= 1 + 1e-6).all() and (small >= 0).all()
    torch.testing.assert_close(normals[0], torch.tensor([0.0, 0, 1]).expand(20000, 3))
    # barycentric weights sum to 1: d(sum of points)/d(verts) sums to the sample count
    points.sum().backward()
    assert verts.grad.sum().item() == pytest.approx(3 * 20000, rel=1e-5)
    again = sample_points_from_meshes(
        MeshBatch([verts], [faces]), 50, generator=torch.Generator().manual_seed(1)
    )
    same = sample_points_from_meshes(
        MeshBatch([verts], [faces]), 50, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(again, same)


def test_sampling_batch_with_an_empty_mesh() -> None:
    tv, tf = _tetra()
    batch = MeshBatch([tv, tv], [tf, torch.zeros(0, 3, dtype=torch.long)])
    points = sample_points_from_meshes(batch, 100)
    assert points[1].abs().sum() == 0 and points[0].abs().sum() > 0


# ---------------------------------------------------------------------------- real meshes


def _unit_cube(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    mesh = mesh.copy()
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    mesh.apply_scale(0.9 / mesh.extents.max())
    return mesh


@pytest.fixture(scope="module")
def teapot(shared_testdata: Path) -> trimesh.Trimesh:
    path = shared_path(shared_testdata, "pytorch3d", "teapot.obj")
    return _unit_cube(trimesh.load(path, force="mesh", process=False))


def test_mesh_vs_own_resampled_surface_and_translated_copy(teapot: trimesh.Trimesh) -> None:
    mesh = MeshBatch.from_trimesh([teapot])
    gen = torch.Generator().manual_seed(0)
    a = sample_points_from_meshes(mesh, 4000, generator=gen)
    b = sample_points_from_meshes(mesh, 4000, generator=gen)
    self_cd = chamfer_distance(a, b, **G).item()
    # two independent 4k samples of the same surface (area ~1.6 in unit-cube units)
    assert 0 < self_cd < 5e-4
    t = torch.tensor([0.03, -0.02, 0.01])
    shifted = chamfer_distance(a, a + t, **G).item()
    # each point's NN distance is at most |t| (its own translate): CD <= 2 |t|^2
    assert shifted <= 2 * float(t.square().sum()) + 1e-7
    assert shifted > self_cd
    # the sampled points lie on the mesh surface
    _, distance, _ = trimesh.proximity.closest_point(teapot, a[0, :500].double().numpy())
    assert distance.max() < 1e-5


def test_teapot_vs_bunny_point_cloud(teapot: trimesh.Trimesh, shared_testdata: Path) -> None:
    bunny = trimesh.load(shared_path(shared_testdata, "point_cloud_utils", "bunny.ply"))
    bunny_pts = np.asarray(bunny.vertices, dtype=np.float64)
    bunny_pts = (bunny_pts - (bunny_pts.max(0) + bunny_pts.min(0)) / 2) * (
        0.9 / np.ptp(bunny_pts, axis=0).max()
    )
    bunny_t = torch.as_tensor(bunny_pts[::4], dtype=torch.float64)
    tea = sample_points_from_meshes(
        MeshBatch.from_trimesh([teapot], dtype=torch.float64),
        3000,
        generator=torch.Generator().manual_seed(0),
    )[0]
    ours = chamfer_distance(tea, bunny_t, chunk_size=257, **G)
    dense = _dense_chamfer(tea[None], bunny_t[None])
    torch.testing.assert_close(ours, dense, rtol=1e-10, atol=0)
    assert ours.item() > 1e-3  # different shapes


def test_marching_cubes_vertices_match_reference_by_chamfer(shared_testdata: Path) -> None:
    ref = np.load(
        shared_path(shared_testdata, "pytorch3d", "marching_cubes_ref", "sphere_level64.npz")
    )
    x = np.arange(20, dtype=np.float32)
    gx, gy, gz = np.meshgrid(x, x, x, indexing="ij")
    verts, faces = marching_cubes_index_space(
        (gx - 10) ** 2 + (gy - 10) ** 2 + (gz - 10) ** 2, 64.0
    )
    cd = chamfer_distance(torch.from_numpy(verts), torch.from_numpy(ref["verts"]).float(), **G)
    assert cd.item() < 1e-10
    assert len(faces) == len(ref["faces"])
    ours = MeshBatch([torch.from_numpy(verts).double()], [torch.from_numpy(faces)])
    theirs = MeshBatch(
        [torch.from_numpy(ref["verts"]).double()], [torch.from_numpy(ref["faces"]).long()]
    )
    # vertices agree to ~1e-4 voxels (pytorch3d interpolates in float32)
    edge_ours, edge_ref = mesh_edge_loss(ours, **G).item(), mesh_edge_loss(theirs, **G).item()
    assert edge_ours == pytest.approx(edge_ref, rel=1e-3)
    assert len(ours.edges_packed()) == len(theirs.edges_packed())


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    import genlab.geometry.mesh_losses as losses

    monkeypatch.setattr(losses, "pytorch3d_available", lambda: False)
    x, y = torch.rand(1, 20, 3), torch.rand(1, 30, 3)
    # auto falls back to genlab's implementation; forcing pytorch3d names the problem
    torch.testing.assert_close(chamfer_distance(x, y), chamfer_distance(x, y, **G))
    with pytest.raises(ImportError, match='backend="pytorch3d" .* not importable'):
        chamfer_distance(x, y, backend="pytorch3d")
    with pytest.raises(ImportError, match="not importable"):
        mesh_edge_loss(MeshBatch(*[[t] for t in _triangle()]), backend="pytorch3d")


def test_far_from_origin_clouds_find_the_true_neighbours() -> None:
    # float32 |x|^2 - 2 x.y + |y|^2 at coordinates ~1000 would lose the 1e-3 spacing
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(1, 300, 3, generator=gen) * 0.1 + 1000.0
    x = y[:, torch.randperm(300, generator=gen)[:100]] + 1e-4
    dists, idx = nearest_neighbor_sq_dists(x, y, chunk_size=32)
    dense = torch.cdist(x.double(), y.double()).argmin(dim=2)
    assert torch.equal(idx, dense)
    exact = (x.double() - y.double()[0, dense[0]]).square().sum(-1)
    torch.testing.assert_close(dists.double(), exact, rtol=1e-6, atol=0)
    assert (exact > 0).all()
