"""Edge-of-Stability curvature tools for PyTorch Lightning."""
