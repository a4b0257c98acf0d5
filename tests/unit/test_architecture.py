"""The package's layers, and the rule that each imports only the layers below it.

    tools   (prepare, evaluate, calibrate, demo)   may import every layer below
    ops     (start and supervise tritonserver)     errors, serving.contract
    triton  (the Python-backend adapter)           serving, core, errors
    serving (service, settings, checks, metrics)   core, errors
    core    (scores, heatmaps, calibration maps)   errors

``gradtrust.cli`` imports its sub-commands lazily, so ``gradtrust serve`` runs with the
``server`` extra alone. Every import is checked, also those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gradtrust

PACKAGE = Path(gradtrust.__file__).resolve().parent

#: layer -> the gradtrust modules (prefixes) it may import besides itself.
ALLOWED: dict[str, tuple[str, ...]] = {
    "core": ("gradtrust.errors",),
    "serving": ("gradtrust.errors", "gradtrust.core"),
    "triton": ("gradtrust.errors", "gradtrust.core", "gradtrust.serving"),
    "ops": ("gradtrust.errors", "gradtrust.serving.contract"),
    "tools": (
        "gradtrust.errors",
        "gradtrust.core",
        "gradtrust.serving",
        "gradtrust.ops",
        "gradtrust.cli",
    ),
}
#: Third-party packages a layer must never import (what its extra does not install).
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "core": ("torch", "onnx", "onnxruntime", "PIL", "triton_python_backend_utils", "sklearn"),
    "serving": ("torch", "triton_python_backend_utils", "sklearn", "matplotlib", "tqdm"),
    "triton": ("torch", "sklearn", "matplotlib", "tqdm"),
    "ops": ("torch", "onnx", "onnxruntime", "triton_python_backend_utils", "sklearn"),
    "tools": ("triton_python_backend_utils",),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_the_layers_below_it(layer: str) -> None:
    own = f"gradtrust.{layer}"
    allowed = (own, *ALLOWED[layer])
    broken = [
        f"{path.relative_to(PACKAGE)}:{line} imports {name}"
        for path in _modules(layer)
        for line, name in _imports(path)
        if (name == "gradtrust" or name.startswith("gradtrust."))
        and not any(name == a or name.startswith(a + ".") for a in allowed)
    ]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_THIRD_PARTY))
def test_layer_never_imports_what_its_extra_lacks(layer: str) -> None:
    forbidden = FORBIDDEN_THIRD_PARTY[layer]
    broken = [
        f"{path.relative_to(PACKAGE)}:{line} imports {name}"
        for path in _modules(layer)
        for line, name in _imports(path)
        if name.split(".")[0] in forbidden
    ]
    assert not broken, "\n".join(broken)


def test_triton_adapter_is_the_only_importer_of_the_backend_utils() -> None:
    importers = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        for _, name in _imports(path)
        if name == "triton_python_backend_utils"
    }
    assert importers <= {"triton/model.py"}


def test_every_layer_is_a_package_with_a_docstring() -> None:
    for layer in ALLOWED:
        init = PACKAGE / layer / "__init__.py"
        assert init.is_file(), f"{layer}/ has no __init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{layer}/__init__.py says nothing"


def test_cli_imports_sub_commands_only_when_they_run() -> None:
    top_level = [
        node
        for node in ast.parse((PACKAGE / "cli.py").read_text()).body
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    names = {getattr(n, "module", None) or n.names[0].name for n in top_level}
    assert {n for n in names if n and n.startswith("gradtrust")} <= {"gradtrust.errors"}


def test_serve_help_loads_neither_torch_nor_the_tools() -> None:
    code = (
        "import sys\n"
        "from gradtrust.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'onnx', 'sklearn', 'matplotlib', 'gradtrust.tools', 'PIL')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or "
        "m.startswith('gradtrust.tools')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
