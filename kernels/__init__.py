"""vramplan_kernels: Triton kernels for QLoRA training, each with a PyTorch reference."""
