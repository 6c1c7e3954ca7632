"""The training core: model, recipe, step, state and loop.

Rule: only torch, torchvision and torchmetrics. Never ray, never nvidia.dali, so the core runs
in tests without Ray and on a bare GPU machine. tests/test_layering.py enforces it.
"""
