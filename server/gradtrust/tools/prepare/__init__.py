"""Bring your own classifier: rewrite an ONNX or PyTorch model into a servable entry.

``gradtrust prepare`` (:mod:`gradtrust.tools.prepare.cli`) wraps :func:`prepare_entry`; the
steps are usable alone: :func:`prepare_onnx` rewrites and verifies a graph in memory,
:func:`find_head` only locates the final linear layer.
"""

from gradtrust.tools.prepare.classifier import PreparedModel, prepare_onnx
from gradtrust.tools.prepare.graph import Head, find_head
from gradtrust.tools.prepare.pipeline import PreparedEntry, prepare_entry

__all__ = ["Head", "PreparedEntry", "PreparedModel", "find_head", "prepare_entry", "prepare_onnx"]
