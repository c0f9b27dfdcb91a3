"""Point-cloud reconstruction metrics: per-sample Chamfer distance and F-score.

Units: genlab meshes and point clouds live in the unit cube ``[-0.5, 0.5]^3`` (see
:mod:`genlab.geometry.voxelize`), so a distance threshold of ``0.01`` is 1 % of the cube's
edge (0.64 voxels at 64^3). Chamfer values are in squared cube units (``norm=2``).

Both metrics are built on :func:`genlab.geometry.mesh_losses.nearest_neighbor_sq_dists`,
which never materialises the full ``N x M`` distance matrix.
"""

from __future__ import annotations

import torch

from genlab.geometry.mesh_losses import nearest_neighbor_sq_dists

__all__ = ["chamfer_l2", "fscore"]


def _batched(points: torch.Tensor, name: str) -> torch.Tensor:
    if points.ndim == 2:
        points = points.unsqueeze(0)
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (B, N, 3) or (N, 3), got {tuple(points.shape)}")
    if points.shape[1] == 0:
        raise ValueError(f"{name} is an empty point cloud (shape {tuple(points.shape)})")
    return points


def _both_directions(
    pred: torch.Tensor, target: torch.Tensor, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = _batched(pred, "pred"), _batched(target, "target")
    if pred.shape[0] != target.shape[0]:
        raise ValueError(
            f"pred and target batch sizes differ: {pred.shape[0]} vs {target.shape[0]}"
        )
    pred_to_target, _ = nearest_neighbor_sq_dists(pred, target, chunk_size)
    target_to_pred, _ = nearest_neighbor_sq_dists(target, pred, chunk_size)
    return pred_to_target, target_to_pred


def chamfer_l2(
    pred: torch.Tensor, target: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-sample Chamfer-L2 ``(B,)``: mean squared NN distance pred->target plus target->pred.

    The same value as ``pytorch3d.loss.chamfer_distance(pred, target, batch_reduction=None)``.
    ``pred`` ``(B, N, 3)``, ``target`` ``(B, M, 3)`` (or unbatched ``(N, 3)`` -> ``(1,)``).
    """
    pred_to_target, target_to_pred = _both_directions(pred, target, chunk_size)
    return pred_to_target.mean(dim=1) + target_to_pred.mean(dim=1)


def fscore(
    pred: torch.Tensor,
    target: torch.Tensor,
    threshold: float = 0.01,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """F-score at distance ``threshold`` (Tatarchenko et al., CVPR 2019), per sample.

    ``precision``: fraction of predicted points within ``threshold`` (Euclidean, in unit-cube
    units) of the target; ``recall``: fraction of target points within ``threshold`` of the
    prediction; ``fscore = 2 P R / (P + R)`` (0 where both are 0). Returns float ``(B,)``
    tensors under the keys ``fscore``, ``precision``, ``recall``.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    with torch.no_grad():
        pred_to_target, target_to_pred = _both_directions(pred, target, chunk_size)
        limit = float(threshold) ** 2
        precision = (pred_to_target <= limit).float().mean(dim=1)
        recall = (target_to_pred <= limit).float().mean(dim=1)
        total = precision + recall
        f = torch.where(total > 0, 2 * precision * recall / total.clamp(min=1e-12), total)
    return {"fscore": f, "precision": precision, "recall": recall}
