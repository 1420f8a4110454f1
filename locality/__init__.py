"""locality: measure, control and explain where in depth fine-tuning changes a pretrained network."""

__version__ = "0.1.0"
