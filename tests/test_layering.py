"""The core imports neither ray nor nvidia.dali: it must run on a bare GPU machine."""

import subprocess
import sys

from conftest import ROOT

CORE = [
    "rn50_ray.core.model",
    "rn50_ray.core.recipe",
    "rn50_ray.core.step",
    "rn50_ray.core.state",
    "rn50_ray.core.context",
    "rn50_ray.core.loop",
    "rn50_ray.config",
    "rn50_ray.data",
    "rn50_ray.data.synthetic",
    "rn50_ray.data.pytorch",
]


def test_core_imports_without_ray_or_dali():
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['nvidia'] = None; sys.modules['nvidia.dali'] = None\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "print('ok', [m for m in sys.modules if m.startswith(('ray', 'nvidia')) and sys.modules[m] is not None])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"
