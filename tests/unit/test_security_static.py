"""No code path unpickles a file: checked on the syntax tree of every Python file we ship.

Unpickling runs code chosen by whoever wrote the file, so a weights file from a model zoo
or a user must only ever be read by a loader that refuses code: ``torch.load(...,
weights_only=True)``, ``np.load`` without ``allow_pickle=True``, ``yaml.safe_load``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCANNED = ("server", "client", "bench", "tests", "model_repository")
FORBIDDEN_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("joblib", "load"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}


def _python_files() -> list[Path]:
    files = []
    for top in SCANNED:
        files += [p for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts]
    return sorted(files)


def _dotted(node: ast.expr) -> tuple[str, ...]:
    """``a.b.c`` -> ("a", "b", "c"); anything else -> ()."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return tuple(reversed(parts))
    return ()


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _calls() -> list[tuple[str, ast.Call, tuple[str, ...]]]:
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name:
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node, name))
    return found


CALLS = _calls()


def test_security_scan_sees_the_code_when_it_walks_the_tree():
    assert len(_python_files()) > 50
    assert any(name[-2:] == ("torch", "load") for _, _, name in CALLS)  # there are loads to check


def test_every_torch_load_refuses_pickled_code_when_reading_weights():
    offenders = [
        where
        for where, call, name in CALLS
        if name[-2:] == ("torch", "load") and not _is_true(_keyword(call, "weights_only"))
    ]
    assert not offenders, f"torch.load without weights_only=True at {offenders}"


def test_nothing_unpickles_a_file_when_any_module_loads_data():
    offenders = [where for where, _, name in CALLS if name[-2:] in FORBIDDEN_CALLS]
    assert not offenders, f"unpickling calls at {offenders}"


def test_numpy_never_allows_pickles_when_loading_arrays():
    offenders = [
        where
        for where, call, name in CALLS
        if name[-1] == "load"
        and name[0] in ("np", "numpy")
        and _is_true(_keyword(call, "allow_pickle"))
    ]
    assert not offenders, f"np.load(..., allow_pickle=True) at {offenders}"


def test_yaml_is_only_read_safely_when_configs_are_parsed():
    offenders = [
        where
        for where, call, name in CALLS
        if name[-2:] == ("yaml", "load")
        and not (
            isinstance(loader := _keyword(call, "Loader"), ast.Attribute | ast.Name)
            and _dotted(loader)[-1] in ("SafeLoader", "CSafeLoader")
        )
    ]
    assert not offenders, f"yaml.load without SafeLoader at {offenders}"


@pytest.mark.parametrize("top", ["server", "client"])
def test_shipped_code_never_evaluates_strings_when_serving(top):
    offenders = [
        where
        for where, _, name in CALLS
        if where.startswith(top) and name in (("eval",), ("exec",))
    ]
    assert not offenders, f"eval/exec at {offenders}"
