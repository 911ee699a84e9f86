"""Concept Factory: label-free segmentation data by concept distillation from latent diffusion models."""

from factory.distiller import Concept, DistillConfig, Distiller, SampleSpec, Triplet

__all__ = ["Concept", "DistillConfig", "Distiller", "SampleSpec", "Triplet"]
__version__ = "0.1.0"
