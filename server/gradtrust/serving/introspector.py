"""The second stage of introspective inference: an entry's introspective network, run by
onnxruntime next to the classifier (no torch at serving time).

``gradtrust introspect`` trains the network and writes it as ``introspection.onnx`` in the
entry's version folder. Its inputs are the two unit factors of the introspective feature
(:func:`gradtrust.core.introspection.introspective_factors`), so its first layer never sees
the C*D vectorised gradient (see that module); its output is C logits, from which the
introspective class and confidence follow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from gradtrust.core import introspection
from gradtrust.errors import ConfigError
from gradtrust.serving.contract import (
    INTROSPECTION_FEATURES,
    INTROSPECTION_GRADIENT,
    INTROSPECTION_LOGITS,
)


@dataclass(frozen=True)
class IntrospectivePrediction:
    """The second stage's answer for each sample."""

    class_id: NDArray[np.int64]
    confidence: NDArray[np.float64]


class Introspector:
    """An onnxruntime session over an entry's ``introspection.onnx``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_classes: int,
        num_features: int | None,
        providers: list[str] | None = None,
    ) -> None:
        """``num_features``: the classifier's penultimate width, checked against the
        network's input now; None when the classifier cannot say before it runs (a model
        called through BLS), in which case each batch's features are checked instead."""
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a few small matrix products: threads cost more
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                sess_options=options,
                providers=providers or ["CPUExecutionProvider"],
            )
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ConfigError(
                f"onnxruntime cannot load {self.path}: {err}; re-create it with "
                "`gradtrust introspect`"
            ) from err
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if set(inputs) != {INTROSPECTION_GRADIENT, INTROSPECTION_FEATURES} or (
            INTROSPECTION_LOGITS not in outputs
        ):
            expected_names = sorted((INTROSPECTION_GRADIENT, INTROSPECTION_FEATURES))
            raise ConfigError(
                f"{self.path} has inputs {sorted(inputs)} and outputs {outputs}; an "
                f"introspective network takes {expected_names} and returns "
                f"{INTROSPECTION_LOGITS!r}: re-create it with `gradtrust introspect`"
            )
        width = inputs[INTROSPECTION_FEATURES][-1]
        #: The penultimate width the network was trained for.
        self.num_features = width if isinstance(width, int) else num_features
        expected = {INTROSPECTION_GRADIENT: num_classes}
        if num_features is not None:
            expected[INTROSPECTION_FEATURES] = num_features
        for name, size in expected.items():
            if inputs[name][-1] != size:
                raise ConfigError(
                    f"{self.path} was trained for a model with input {name} of size "
                    f"{inputs[name][-1]}, but this entry's classifier has {size}: re-run "
                    "`gradtrust introspect` for this entry"
                )

    def logits(self, logits: np.ndarray, features: np.ndarray) -> NDArray[np.float64]:
        """The introspective network's logits (N, C) from the classifier's logits and
        penultimate features."""
        if self.num_features is not None and np.shape(features)[-1] != self.num_features:
            raise ConfigError(
                f"{self.path} was trained for penultimate features of size "
                f"{self.num_features}, but the classifier returned {np.shape(features)[-1]}: "
                "re-run `gradtrust introspect` for this entry"
            )
        g_unit, h_unit = introspection.introspective_factors(logits, features)
        (out,) = self.session.run(
            [INTROSPECTION_LOGITS],
            {
                INTROSPECTION_GRADIENT: g_unit.astype(np.float32),
                INTROSPECTION_FEATURES: h_unit.astype(np.float32),
            },
        )
        return np.asarray(out, dtype=np.float64)

    def predict(self, logits: np.ndarray, features: np.ndarray) -> IntrospectivePrediction:
        cls, conf = introspection.introspective_prediction(self.logits(logits, features))
        return IntrospectivePrediction(cls, conf)
