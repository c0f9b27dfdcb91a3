"""Multi-view diffusion with normals: one image in, N views x {RGB, normal map} out.

``networks`` (UNet / VAE / CLIP builders) imports without Lightning; the LightningModule
is loaded on first use of ``MultiViewDiffusion``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MultiViewDiffusion", "MultiViewImages"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from genlab.models.mv_diffusion import module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
