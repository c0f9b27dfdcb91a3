"""Text-conditioned voxel VAE-GAN (the ModelIT recipe)."""

from genlab.models.voxel_vaegan.module import VoxelVAEGAN

__all__ = ["VoxelVAEGAN"]
