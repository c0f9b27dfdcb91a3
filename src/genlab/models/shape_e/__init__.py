"""Shap-E on diffusers: components, latent decoding, a trainable point encoder, the encode stage.

- :mod:`.components`: :class:`ShapEComponents` (prior, scheduler, renderer, CLIP parts) from the
  released weights or tiny random configs; latent shape checks.
- :mod:`.decode`: differentiable field queries and ray renders, meshes, turntable renders and
  GIFs from latents.
- :mod:`.encoder`: a perceiver encoder (point cloud + optional views -> latent), its checkpoints
  and its training module; :mod:`.encode`: the stage that fills ``<root>/latents/``. Neither is
  imported here (they pull in Lightning and Hydra).
- :mod:`.module`: prior fine-tuning (``model=shape_e`` / ``shape_e_image``) on these parts.
"""

from genlab.models.shape_e.components import (
    LatentShapeError,
    ShapEComponents,
    pretrained_components,
    tiny_components,
)
from genlab.models.shape_e.decode import (
    decode_meshes,
    query_fields,
    render_views,
    write_turntable_gif,
)

__all__ = [
    "LatentShapeError",
    "ShapEComponents",
    "decode_meshes",
    "pretrained_components",
    "query_fields",
    "render_views",
    "tiny_components",
    "write_turntable_gif",
]
