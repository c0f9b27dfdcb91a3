"""A small batch-of-triangle-meshes type with pytorch3d ``Meshes`` conventions.

``MeshBatch`` holds per-mesh vertex and face tensors and derives the packed views that the
mesh losses in :mod:`genlab.geometry.mesh_losses` need: packed vertices/faces (face indices
offset into the packed vertices), unique undirected edges sorted exactly like
``pytorch3d.structures.Meshes.edges_packed()``, the face -> edge map, and the packed ->
mesh index maps. Vertices keep their autograd history, so losses built on a ``MeshBatch``
are differentiable w.r.t. the vertices passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch

__all__ = ["MeshBatch", "as_mesh_batch", "pytorch3d_available"]


def pytorch3d_available() -> bool:
    """Whether ``pytorch3d`` can be imported (and loads with the installed torch)."""
    try:
        import pytorch3d.structures  # noqa: F401
    except Exception:  # ImportError, or OSError from a wheel built for another torch
        return False
    return True


class MeshBatch:
    """Batch of ``B`` triangle meshes: ``verts_list[i]`` float ``(V_i, 3)``, ``faces_list[i]`` long ``(F_i, 3)``.

    All vertex tensors share one dtype and device. A mesh may have no faces (it then has no
    edges and contributes zero to the mesh losses); vertices are required.
    """

    def __init__(self, verts_list: Sequence[torch.Tensor], faces_list: Sequence[torch.Tensor]):
        verts_list, faces_list = list(verts_list), list(faces_list)
        if len(verts_list) == 0:
            raise ValueError("MeshBatch needs at least one mesh, got an empty verts_list")
        if len(verts_list) != len(faces_list):
            raise ValueError(
                f"verts_list has {len(verts_list)} meshes but faces_list has {len(faces_list)}"
            )
        first = verts_list[0]
        for i, (verts, faces) in enumerate(zip(verts_list, faces_list, strict=True)):
            if not isinstance(verts, torch.Tensor) or not isinstance(faces, torch.Tensor):
                raise TypeError(f"mesh {i}: verts and faces must be torch tensors")
            if verts.ndim != 2 or verts.shape[1] != 3:
                raise ValueError(
                    f"mesh {i}: verts must have shape (V, 3), got {tuple(verts.shape)}"
                )
            if not verts.is_floating_point():
                raise ValueError(f"mesh {i}: verts must be floating point, got {verts.dtype}")
            if verts.dtype != first.dtype or verts.device != first.device:
                raise ValueError(
                    f"mesh {i}: verts are {verts.dtype} on {verts.device}, mesh 0's are "
                    f"{first.dtype} on {first.device}; all meshes must match"
                )
            if faces.ndim != 2 or faces.shape[1] != 3:
                raise ValueError(
                    f"mesh {i}: faces must have shape (F, 3), got {tuple(faces.shape)}"
                )
            if faces.is_floating_point() or faces.dtype == torch.bool:
                raise ValueError(f"mesh {i}: faces must be an integer tensor, got {faces.dtype}")
            if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= len(verts)):
                raise ValueError(
                    f"mesh {i}: face index out of range [0, {len(verts)}): "
                    f"min {int(faces.min())}, max {int(faces.max())}"
                )
            if faces.numel() and len(verts) == 0:
                raise ValueError(f"mesh {i}: has faces but no vertices")
        self._verts_list = verts_list
        self._faces_list = [f.to(device=first.device, dtype=torch.int64) for f in faces_list]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_padded(
        cls,
        verts: torch.Tensor,
        faces: torch.Tensor,
        num_verts: Sequence[int] | torch.Tensor | None = None,
    ) -> MeshBatch:
        """Meshes from padded vertices ``(B, V, 3)`` and faces ``(F, 3)`` (shared) or ``(B, F, 3)``.

        ``num_verts`` (per mesh) cuts padding off the vertices; faces rows that are all
        ``-1`` are treated as padding (pytorch3d's convention).
        """
        if verts.ndim != 3 or verts.shape[2] != 3:
            raise ValueError(f"verts must have shape (B, V, 3), got {tuple(verts.shape)}")
        batch = verts.shape[0]
        if faces.ndim == 2:
            faces = faces.unsqueeze(0).expand(batch, -1, -1)
        if faces.ndim != 3 or faces.shape[2] != 3 or faces.shape[0] != batch:
            raise ValueError(
                f"faces must have shape (F, 3) or ({batch}, F, 3), got {tuple(faces.shape)}"
            )
        counts = [verts.shape[1]] * batch if num_verts is None else [int(n) for n in num_verts]
        if len(counts) != batch:
            raise ValueError(f"num_verts has {len(counts)} entries for a batch of {batch}")
        verts_list = [verts[i, : counts[i]] for i in range(batch)]
        faces_list = [f[(f != -1).any(dim=1)] for f in faces]
        return cls(verts_list, faces_list)

    @classmethod
    def from_trimesh(cls, meshes: Sequence[Any], dtype: torch.dtype = torch.float32) -> MeshBatch:
        """Batch from ``trimesh.Trimesh`` objects."""
        verts = [torch.as_tensor(m.vertices, dtype=dtype) for m in meshes]
        faces = [torch.as_tensor(m.faces, dtype=torch.int64).reshape(-1, 3) for m in meshes]
        return cls(verts, faces)

    def to_pytorch3d(self) -> Any:
        """The same batch as a ``pytorch3d.structures.Meshes`` (needs pytorch3d)."""
        try:
            from pytorch3d.structures import Meshes
        except Exception as err:
            raise ImportError(
                "MeshBatch.to_pytorch3d needs pytorch3d, which is not importable here "
                f"({err}); genlab's own mesh losses work without it"
            ) from err
        return Meshes(verts=self._verts_list, faces=self._faces_list)

    def to_trimesh(self, i: int) -> Any:
        """Mesh ``i`` as a ``trimesh.Trimesh`` (vertices detached, float64, not processed)."""
        import trimesh

        return trimesh.Trimesh(
            vertices=self._verts_list[i].detach().cpu().double().numpy(),
            faces=self._faces_list[i].cpu().numpy(),
            process=False,
        )

    # ------------------------------------------------------------------ lists / sizes

    def __len__(self) -> int:
        return len(self._verts_list)

    @property
    def device(self) -> torch.device:
        return self._verts_list[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self._verts_list[0].dtype

    def verts_list(self) -> list[torch.Tensor]:
        return list(self._verts_list)

    def faces_list(self) -> list[torch.Tensor]:
        return list(self._faces_list)

    def isempty(self) -> bool:
        """True when no mesh has a face (pytorch3d's ``Meshes.isempty``)."""
        return all(len(f) == 0 for f in self._faces_list)

    @cached_property
    def _num_verts(self) -> torch.Tensor:
        return torch.tensor([len(v) for v in self._verts_list], device=self.device)

    @cached_property
    def _num_faces(self) -> torch.Tensor:
        return torch.tensor([len(f) for f in self._faces_list], device=self.device)

    def num_verts_per_mesh(self) -> torch.Tensor:
        return self._num_verts

    def num_faces_per_mesh(self) -> torch.Tensor:
        return self._num_faces

    def num_edges_per_mesh(self) -> torch.Tensor:
        return self._edges[2]

    def mesh_to_verts_packed_first_idx(self) -> torch.Tensor:
        return _first_index(self._num_verts)

    def mesh_to_faces_packed_first_idx(self) -> torch.Tensor:
        return _first_index(self._num_faces)

    # ------------------------------------------------------------------ packed views

    def verts_packed(self) -> torch.Tensor:
        """All vertices concatenated, ``(sum V_i, 3)``; keeps the autograd history."""
        return torch.cat(self._verts_list, dim=0)

    def faces_packed(self) -> torch.Tensor:
        """All faces concatenated, indices offset into :meth:`verts_packed`, ``(sum F_i, 3)``."""
        return self._faces_packed

    @cached_property
    def _faces_packed(self) -> torch.Tensor:
        offsets = self.mesh_to_verts_packed_first_idx()
        return torch.cat([f + offsets[i] for i, f in enumerate(self._faces_list)], dim=0)

    def verts_packed_to_mesh_idx(self) -> torch.Tensor:
        return _repeat_index(self._num_verts)

    def faces_packed_to_mesh_idx(self) -> torch.Tensor:
        return _repeat_index(self._num_faces)

    def edges_packed(self) -> torch.Tensor:
        """Unique undirected edges ``(E, 2)`` with ``v0 < v1``, sorted by ``(v0, v1)``."""
        return self._edges[0]

    def edges_packed_to_mesh_idx(self) -> torch.Tensor:
        return self._edges[1]

    def faces_packed_to_edges_packed(self) -> torch.Tensor:
        """``(F, 3)``: column ``k`` is the edge opposite corner ``k`` (pytorch3d's order)."""
        return self._edges[3]

    @cached_property
    def _edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        faces = self.faces_packed()
        num_faces = faces.shape[0]
        # edge opposite corner 0, 1, 2 — the order pytorch3d uses for its face -> edge map
        edges = torch.cat([faces[:, [1, 2]], faces[:, [2, 0]], faces[:, [0, 1]]], dim=0)
        edges, _ = edges.sort(dim=1)
        edge_to_mesh = self.faces_packed_to_mesh_idx().repeat(3)
        num_v = max(int(self._num_verts.sum()), 1)
        hashed = edges[:, 0] * num_v + edges[:, 1]
        unique, inverse = torch.unique(hashed, return_inverse=True)
        first = torch.full((len(unique),), len(hashed), dtype=torch.int64, device=faces.device)
        first.scatter_reduce_(
            0, inverse, torch.arange(len(hashed), device=faces.device), reduce="amin"
        )
        packed = torch.stack([unique // num_v, unique % num_v], dim=1)
        to_mesh = edge_to_mesh[first]
        counts = torch.bincount(to_mesh, minlength=len(self)).to(self._num_verts.dtype)
        face_to_edge = inverse[torch.arange(3 * num_faces, device=faces.device).view(3, -1).t()]
        return packed, to_mesh, counts, face_to_edge

    def verts_padded(self) -> torch.Tensor:
        """Vertices padded with zeros to ``(B, max V_i, 3)``."""
        return torch.nn.utils.rnn.pad_sequence(self._verts_list, batch_first=True)

    def faces_padded(self) -> torch.Tensor:
        """Faces padded with ``-1`` to ``(B, max F_i, 3)`` (per-mesh indices, not offset)."""
        return torch.nn.utils.rnn.pad_sequence(self._faces_list, batch_first=True, padding_value=-1)

    def update_padded(self, verts: torch.Tensor) -> MeshBatch:
        """A new batch with the same faces and vertices taken from ``verts (B, max V, 3)``."""
        if verts.shape[0] != len(self) or verts.shape[-1] != 3:
            raise ValueError(
                f"expected verts of shape ({len(self)}, V, 3), got {tuple(verts.shape)}"
            )
        new_verts = [verts[i, : len(v)] for i, v in enumerate(self._verts_list)]
        return MeshBatch(new_verts, self._faces_list)

    def __repr__(self) -> str:
        return (
            f"MeshBatch(meshes={len(self)}, verts={self._num_verts.tolist()}, "
            f"faces={self._num_faces.tolist()})"
        )


def as_mesh_batch(meshes: Any) -> MeshBatch:
    """A ``MeshBatch`` from a ``MeshBatch`` or a ``pytorch3d.structures.Meshes``."""
    if isinstance(meshes, MeshBatch):
        return meshes
    if hasattr(meshes, "verts_list") and hasattr(meshes, "faces_list"):
        return MeshBatch(meshes.verts_list(), meshes.faces_list())
    raise TypeError(
        f"expected a genlab MeshBatch or a pytorch3d Meshes, got {type(meshes).__name__}"
    )


def _first_index(counts: torch.Tensor) -> torch.Tensor:
    first = torch.zeros_like(counts, dtype=torch.int64)
    first[1:] = counts.cumsum(0)[:-1]
    return first


def _repeat_index(counts: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
