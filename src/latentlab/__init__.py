"""latentlab: train, evaluate and dissect latent-reasoning methods for language models."""

__version__ = "0.1.0"
