"""The PyTorch reference engine: the ground truth, on CPU or one CUDA device."""
