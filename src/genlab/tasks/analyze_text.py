"""``python inference.py task=analyze_text prompts=[...]``: cosine similarities and a PCA map of text embeddings."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from matplotlib.figure import Figure
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def cosine_matrix(emb: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = emb / np.where(norm == 0, 1, norm)
    return unit @ unit.T


def pca_2d(emb: np.ndarray) -> np.ndarray:
    """Project onto the first two principal components (zero-padded when fewer exist)."""
    centred = emb - emb.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def analyze_text(cfg: DictConfig) -> dict[str, Path]:
    """Embed ``prompts`` with the model's text encoder; write similarity.csv and text_pca.png."""
    prompts = [str(p) for p in cfg.get("prompts") or []]
    if len(prompts) < 2:
        raise ValueError(
            "task=analyze_text needs at least two prompts: prompts='[a chair,a table]'"
        )
    encoder = instantiate(cfg.model.text_encoder)
    emb = encoder(prompts).cpu().numpy()
    sim = cosine_matrix(emb)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "similarity.csv", out / "text_pca.png"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", *prompts])
        for p, row in zip(prompts, sim, strict=True):
            w.writerow([p, *(f"{v:.4f}" for v in row)])
    coords = pca_2d(emb)
    fig = Figure(figsize=(6, 5), dpi=120)
    ax = fig.add_subplot()
    ax.scatter(coords[:, 0], coords[:, 1], c=np.arange(len(prompts)), cmap="tab10")
    for (x, y), p in zip(coords, prompts, strict=True):
        ax.annotate(p, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_title(f"text embeddings ({type(encoder).__name__}), PCA")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    fig.savefig(png_path)
    log.info(
        "cosine similarity:\n%s",
        "\n".join(
            f"{p[:24]:24s} " + " ".join(f"{v:5.2f}" for v in row)
            for p, row in zip(prompts, sim, strict=True)
        ),
    )
    log.info("wrote %s and %s", csv_path, png_path)
    return {"similarity": csv_path, "pca": png_path}
