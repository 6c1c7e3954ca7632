"""The layers import only what they may, read statically from every import statement (those inside functions
included): the core and the data layer run on a bare GPU machine, which has torch but no Ray, DALI or MLflow. And
the README says truly what the core imports."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "rn50_ray"

# Which modules may import each heavy dependency, anywhere in the module.
ALLOWED = {
    "ray": {
        "rn50_ray.driver",
        "rn50_ray.error_log",
        "rn50_ray.ray_context",
        "rn50_ray.worker",
        "rn50_ray.replica",
        "rn50_ray.tune.runner",
        "rn50_ray.tune.trial",
        "rn50_ray.tune.spaces",
    },
    "torchft": {"rn50_ray.replica"},
    "nvidia": {"rn50_ray.data.dali"},
    "mlflow": {
        "rn50_ray.tracking.run",
        "rn50_ray.tracking.sink",
        "rn50_ray.tracking.artifacts",
        "rn50_ray.tracking.search",
        "rn50_ray.tracking.server",
    },
}
# Modules that must not import torch at all: DALI's reader processes and the CLI's light paths load them.
TORCH_FREE = {"rn50_ray.data.order", "rn50_ray.core.batching", "rn50_ray.core.resolution", "rn50_ray.core.run_plan",
              "rn50_ray.config", "rn50_ray.errors", "rn50_ray.dry_run", "rn50_ray.data.folder", "rn50_ray.core.seeds",
              "rn50_ray.data.backends", "rn50_ray.run_folder", "rn50_ray.data.manifest", "rn50_ray.data.screen",
              "rn50_ray.data.checks", "rn50_ray.data.types"}  # fmt: skip


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Top-level names of everything a module imports, anywhere in it (relative imports are this package's)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


MODULES = {_module(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("dependency", sorted(ALLOWED))
def test_only_its_layer_imports_a_heavy_dependency(dependency):
    importers = {m for m, names in MODULES.items() if dependency in names}
    assert importers <= ALLOWED[dependency], sorted(importers - ALLOWED[dependency])


def test_the_core_and_the_data_layer_import_neither_ray_dali_nor_mlflow():
    for module, names in MODULES.items():
        if module.startswith(("rn50_ray.core", "rn50_ray.data")) and module != "rn50_ray.data.dali":
            assert not names & {"ray", "nvidia", "mlflow"}, module


def _third_party(prefix: str) -> set[str]:
    return (
        {n for m, names in MODULES.items() if m.startswith(prefix) for n in names} - set(sys.stdlib_module_names) - {"rn50_ray"}
    )


def test_the_readme_names_exactly_what_the_core_imports():
    claim = re.search(r"The core \(`rn50_ray/core/`\) imports ([^.]*)\.", (ROOT / "README.md").read_text().replace("\n", " "))
    assert claim, "README: the sentence 'The core (`rn50_ray/core/`) imports ...' is missing"
    named = set(re.findall(r"`?([a-z_]+)`?", claim[1].replace(" and ", ", "))) - {"only"}
    assert named == _third_party("rn50_ray.core."), (claim[1], sorted(_third_party("rn50_ray.core.")))


def test_the_light_modules_do_not_import_torch():
    for module in TORCH_FREE:
        assert "torch" not in MODULES[module] and "torchvision" not in MODULES[module], module


def test_the_core_imports_without_ray_dali_or_mlflow_installed():
    # The static check above, at run time: what a bare CUDA machine has.
    core = [m for m in MODULES if m.startswith(("rn50_ray.core", "rn50_ray.data")) and m != "rn50_ray.data.dali"]
    code = (
        "import sys\nfor m in ('ray', 'nvidia', 'nvidia.dali', 'mlflow'): sys.modules[m] = None\n"
        + "".join(f"import {m}\n" for m in core)
        + "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
