"""rn50-ray: an elastic ResNet50 v1.5 trainer on Ray Train, with NVIDIA's recipe."""

__version__ = "0.3.0"  # the one place: pyproject.toml reads it
