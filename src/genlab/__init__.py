"""genlab: generative 3D and image models, trained and sampled from one Hydra command line."""

__version__ = "0.1.0"
