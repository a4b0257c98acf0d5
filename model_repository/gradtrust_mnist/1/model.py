"""Triton entry point: all logic lives in the installed ``gradtrust`` package."""

from gradtrust.triton.model import TritonPythonModel

__all__ = ["TritonPythonModel"]
