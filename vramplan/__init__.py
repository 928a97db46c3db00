"""vramplan: plan the GPU memory of a fine-tuning run, pick settings that fit, and train."""

__version__ = "0.1.0"
