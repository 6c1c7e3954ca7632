#!/usr/bin/env python3
"""rn50-ray entry point: `python launch.py {train,tune,evaluate,bench,ui,prepare-sample,prepare-imagenet} ...`.

`ray submit` copies only this file to the head node and runs it from the home folder, so it
imports an installed rn50_ray, or the one in the folder beside this file.
"""

import sys
from pathlib import Path

try:
    import rn50_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from rn50_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
