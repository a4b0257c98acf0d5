"""What the service adds to a one-image GRADTRUST request, in process (issue 16).

:class:`gradtrust.serving.service.TrustService` answers one request that names
LABEL, CLASS_ID, CONFIDENCE and GRADTRUST (bench.loadgen's ``gradtrust`` variant), with
the forward pass replaced by its cached result, timed two ways in alternation:

- ``after forward``: right after a real onnxruntime forward pass, as the server pays it.
  The forward pass evicts the caches, so the first numpy calls after it cost several
  times their usual time (np.exp over 1000 values: about 15 us instead of 1.5 us here);
- ``hot``: the same call again at once.

Both are reported beside the forward pass's own time. ``--requests N`` puts N one-image
requests in the batch (the dynamic batcher's batch under concurrency N), after a forward
pass over their N images. For a before/after of a modified package:
``PYTHONPATH=OTHER/server python -m bench.service_cost``.

    .venv/bin/python -m bench.service_cost [--seconds S] [--models resnet18,mobilenet]
        [--requests N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import gradtrust
from bench import _common as common
from bench.inprocess import _CachedClassifier
from bench.models import IMAGENET_SIZED
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import CLASS_ID, CONFIDENCE, GRADTRUST, LABEL, LOGITS
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import ModelSettings, RequestOptions

NAMED = frozenset({LABEL, CLASS_ID, CONFIDENCE, GRADTRUST})
OPTIONS = RequestOptions(scores=None, contrast_k=3, heatmap_method=None, contrast_class=None)
MAX_ROUNDS = 20_000


def measure(key: str, image_size: int, seconds: float, requests: int = 1) -> dict[str, float]:
    """Median and minimum microseconds of the forward pass and of the service's call."""
    spec = IMAGENET_SIZED[key](image_size)
    classifier = OnnxClassifier(spec.onnx_path)
    image = np.random.default_rng(0).random((requests, *spec.input_shape), dtype=np.float32)
    net = classifier.run(image, [LOGITS])
    settings = ModelSettings(
        labels=tuple(f"class_{i}" for i in range(spec.num_classes)), pixel_min=0.0, pixel_max=1.0
    )
    service = TrustService(_CachedClassifier(classifier, net), settings)  # type: ignore[arg-type]
    batch = [ScoringRequest(image[i : i + 1], OPTIONS, NAMED) for i in range(requests)]
    service.run(batch)
    forward, cold, hot = [], [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(forward) < MAX_ROUNDS:
        t0 = time.perf_counter()
        classifier.run(image, [LOGITS])
        t1 = time.perf_counter()
        service.run(batch)
        t2 = time.perf_counter()
        service.run(batch)
        t3 = time.perf_counter()
        forward.append(t1 - t0)
        cold.append(t2 - t1)
        hot.append(t3 - t2)
    out = {"model": key, "rounds": len(forward), "requests": requests}
    for name, values in (("forward", forward), ("after_forward", cold), ("hot", hot)):
        us = np.asarray(values) * 1e6
        out[f"{name}_median_us"] = float(np.median(us))
        out[f"{name}_min_us"] = float(us.min())
    out["after_forward_pct_of_forward"] = (
        100.0 * out["after_forward_median_us"] / out["forward_median_us"]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet")
    parser.add_argument("--seconds", type=float, default=20.0, help="per model")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=1, help="one-image requests per batch")
    args = parser.parse_args(argv)
    print(
        f"gradtrust from {gradtrust.__file__}; load average {common.load_average()}; "
        f"{args.requests} one-image request(s) per batch"
    )
    print("| model | rounds | forward median (min), us | service after forward | hot |")
    print("|---|---|---|---|---|")
    for key in common.parse_names(args.models):
        r = measure(key, args.image_size, args.seconds, args.requests)
        print(
            f"| {key} | {r['rounds']} | {r['forward_median_us']:.0f} ({r['forward_min_us']:.0f}) "
            f"| {r['after_forward_median_us']:.0f} ({r['after_forward_min_us']:.0f}), "
            f"{r['after_forward_pct_of_forward']:.1f} % of forward "
            f"| {r['hot_median_us']:.0f} ({r['hot_min_us']:.0f}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
