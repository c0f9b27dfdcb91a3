"""otuken3d: text (T5) + point cloud -> latent -> progressive voxel decoder with AdaIN style -> voxels and mesh."""

from genlab.models.otuken3d.module import Otuken3D

__all__ = ["Otuken3D"]
