"""The benchmark's temporary model repository: for each network, the GradTrust model and its
plain twin (same backend, batching and instances; logits only), generated at run time."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.models import DEMO_DIR, IMAGENET_SIZED

PLAIN_MODEL_PY = Path(__file__).resolve().parent / "plain_model.py"


@dataclass(frozen=True)
class Served:
    """One benchmarked network as served: its GradTrust model and its plain twin."""

    key: str
    model: str
    plain: str
    input_shape: tuple[int, ...]
    num_classes: int


def _sub(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, replacement, text, count=1, flags=re.S)
    if count != 1:
        raise RuntimeError(f"the demo config.pbtxt has no match for {pattern!r}: update bench")
    return new


def _configs(
    base: str, name: str, dims: tuple[int, ...], classes: int, instances: int
) -> tuple[str, str]:
    """(GradTrust config, plain config) derived from the demo's ``config.pbtxt``."""
    cfg = _sub(base, r'name: "[^"]*"', f'name: "{name}"')
    cfg = _sub(cfg, r"dims: \[ 1, 28, 28 \]", f"dims: [ {', '.join(map(str, dims))} ]")
    cfg = _sub(cfg, r"count: \d+", f"count: {instances}")
    plain = _sub(cfg, r'name: "[^"]*"', f'name: "{name}_plain"')
    plain = _sub(
        plain,
        r"\noutput \[.*?\n\]",
        f'\noutput [\n  {{ name: "LOGITS" data_type: TYPE_FP32 dims: [ {classes} ] }}\n]',
    )
    plain = _sub(
        plain,
        r"\nparameters \[.*?\n\]",
        '\nparameters [\n  { key: "onnx_file", value: { string_value: "model.onnx" } }\n]',
    )
    return cfg, plain


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        shutil.copy2(src, dst)


# Appended to a model.py by ``--profile``: cProfile around every execute(), written to a
# file when Triton unloads the model (finalize), so the stub's own costs can be read with
# ``python -m pstats``.
_PROFILE_SUFFIX = """

import cProfile as _cProfile

_profile = _cProfile.Profile()
_execute = TritonPythonModel.execute
_finalize = getattr(TritonPythonModel, "finalize", None)


def _profiled_execute(self, requests):
    _profile.enable()
    try:
        return _execute(self, requests)
    finally:
        _profile.disable()


def _profiled_finalize(self):
    if _finalize is not None:
        _finalize(self)
    _profile.dump_stats({path!r})


TritonPythonModel.execute = _profiled_execute
TritonPythonModel.finalize = _profiled_finalize
"""


def build_repository(
    root: Path,
    keys: list[str],
    image_size: int,
    instances: int,
    source: Path | None = None,
    profile_dir: Path | None = None,
) -> list[Served]:
    """Write the benchmark model repository under ``root``. With ``source``, every model's
    ``model.py`` imports ``gradtrust`` from that directory first (an A/B test of a modified
    copy; the Python stub ignores PYTHONPATH, so the path goes into ``model.py``). With
    ``profile_dir``, every model profiles its ``execute`` calls into
    ``profile_dir/<model>.prof`` when the server unloads it."""
    prefix = "" if source is None else f"import sys\n\nsys.path.insert(0, {str(source)!r})\n"
    base = (DEMO_DIR / "config.pbtxt").read_text()
    served = []
    for key in keys:
        if key == "demo":
            name, onnx, dims, classes = (
                "gradtrust_mnist",
                DEMO_DIR / "1" / "model.onnx",
                (1, 28, 28),
                10,
            )
            labels = (DEMO_DIR / "labels.txt").read_text()
        else:
            spec = IMAGENET_SIZED[key](image_size)
            name, onnx, dims, classes = f"bench_{key}", spec.onnx_path, spec.input_shape, 1000
            labels = "".join(f"class_{i:04d}\n" for i in range(classes))
        config, plain = _configs(base, name, dims, classes, instances)
        for model, text, model_py in (
            (name, config, DEMO_DIR / "1" / "model.py"),
            (f"{name}_plain", plain, PLAIN_MODEL_PY),
        ):
            (root / model / "1").mkdir(parents=True)
            (root / model / "config.pbtxt").write_text(text)
            (root / model / "labels.txt").write_text(labels)
            suffix = (
                ""
                if profile_dir is None
                else _PROFILE_SUFFIX.format(path=str(profile_dir.resolve() / f"{model}.prof"))
            )
            (root / model / "1" / "model.py").write_text(prefix + model_py.read_text() + suffix)
            _link(onnx, root / model / "1" / "model.onnx")
        served.append(Served(key, name, f"{name}_plain", dims, classes))
    return served
