"""Load a PyTorch classifier and export it to ONNX, so it takes the same path as ONNX files.

Two ways to name the model:

- a TorchScript file (``torch.jit.save`` of a scripted or traced model);
- ``package.module:factory``: a function (or class) that builds the ``nn.Module``, plus
  optionally a state dict file loaded with ``torch.load(..., weights_only=True)``, which
  never runs code from the file (a full pickled model is refused, on purpose).

The export uses the TorchScript-based exporter (``dynamo=False``, opset 17, dynamic batch),
and the ONNX result is compared with the torch model on a probe batch before it is used.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradtrust.errors import ConfigError
from gradtrust.tools.prepare.verify import probe_batch, session

OPSET = 17
INPUT_NAME = "image"


def _import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"--torch {spec!r} is neither a TorchScript file nor 'module:factory' "
            "(e.g. mypackage.models:build_classifier)"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so that a module in the current folder imports
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any error while importing user code
        raise ConfigError(
            f"cannot import module {module_name!r} for --torch {spec!r} ({type(err).__name__}: "
            f"{err}): run from the folder that contains it or install its package"
        ) from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (--torch {spec})")
    if not callable(factory):
        raise ConfigError(f"--torch {spec}: {attr!r} is not callable; name a function or class")
    return factory


def _state_dict(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise ConfigError(f"weights file {path} not found: pass the saved state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... here
        raise ConfigError(
            f"cannot load {path} with weights_only=True ({type(err).__name__}: {err}); save "
            "the weights as a plain state dict: torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a common checkpoint layout
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_torch_model(source: str, weights: str | os.PathLike[str] | None = None) -> Any:
    """The ``nn.Module`` (or ScriptModule) named by ``source``, in eval mode."""
    import torch

    path = Path(source)
    if path.is_file():
        if weights is not None:
            raise ConfigError(
                "--weights is for 'module:factory' models; a TorchScript file has them"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # jit's move to torch.export
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # not a TorchScript archive
            raise ConfigError(
                f"{path} is not a TorchScript file ({type(err).__name__}: {err}); save one with "
                "torch.jit.save(torch.jit.script(model), path), or pass --torch "
                "module:factory --weights state_dict.pt"
            ) from None
    else:
        if path.suffix in (".pt", ".pth", ".ts") or os.sep in source:
            raise ConfigError(f"--torch file {path} not found")
        built = _import_factory(source)()
        if not isinstance(built, torch.nn.Module):
            raise ConfigError(
                f"--torch {source} returned a {type(built).__name__}, not an nn.Module"
            )
        model = built
        if weights is not None:
            try:
                model.load_state_dict(_state_dict(Path(weights)), strict=True)
            except RuntimeError as err:  # missing, unexpected or mis-shaped keys
                raise ConfigError(f"the weights do not fit {source}: {err}") from None
    model.eval()
    return model


def export_onnx(model: Any, sample_shape: Sequence[int], path: str | os.PathLike[str]) -> None:
    """Export ``model`` (per-sample input ``sample_shape``) and check it against torch."""
    import torch

    example = torch.zeros(2, *sample_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
            torch.onnx.export(
                model,
                (example,),
                os.fspath(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as err:  # the exporter raises many unrelated types
        raise ConfigError(
            f"torch.onnx.export failed for a (batch, {', '.join(map(str, sample_shape))}) input "
            f"({type(err).__name__}: {err}); check --input-shape, or export to ONNX yourself "
            "and use --onnx"
        ) from None
    import onnx

    exported = onnx.load(os.fspath(path))
    probe = probe_batch(sample_shape, "float32")
    sess: Any = session(exported, "the exported model")
    got = sess.run(None, {sess.get_inputs()[0].name: probe})
    with torch.no_grad():
        want = model(torch.from_numpy(probe))
    want_list = list(want) if isinstance(want, tuple | list) else [want]
    if len(got) != len(want_list) or not all(
        np.allclose(g, w.numpy(), rtol=1e-4, atol=1e-5) for g, w in zip(got, want_list, strict=True)
    ):
        raise ConfigError(
            "the exported ONNX model computes something else than the torch model on a probe "
            "batch (data-dependent control flow?); export it yourself and use --onnx"
        )
