"""What the service adds to a one-image GRADTRUST request, in process (issue 16).

:class:`gradtrust.serving.service.TrustService` answers one request that names
LABEL, CLASS_ID, CONFIDENCE and GRADTRUST (bench.loadgen's ``gradtrust`` variant), with
the forward pass replaced by its cached result, timed two ways in alternation:

- ``after forward``: right after a real onnxruntime forward pass, as the server pays it;
- ``hot``: the same call again at once.

Both are reported beside the forward pass's own time. ``--requests N`` puts N one-image
requests in the batch (the dynamic batcher's batch under concurrency N), after a forward
pass over their N images. ``--pin`` runs on the CPUs ``bench.serving --pin-server`` gives
tritonserver (one CPU on a 2-CPU machine), so the forward pass and the service share a
core as they do in that server.

The second table says why the two differ: single numpy calls on one sample's logits (the
kind the GRADTRUST arithmetic is made of), each timed as the first call after a forward
pass, as the first call after copying ``--sweep-mib`` MiB of other data (no onnxruntime
involved), and again at once. For a before/after of a modified package:
``PYTHONPATH=OTHER/server python -m bench.service_cost``.

    .venv/bin/python -m bench.service_cost [--seconds S] [--models resnet18,mobilenet]
        [--requests N] [--pin] [--sweep-mib M]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

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


def probe_calls(
    key: str, image_size: int, seconds: float, sweep_mib: int
) -> list[tuple[str, float, float, float]]:
    """(call, median us after a forward pass, after the data sweep, again at once) for
    single numpy calls on one sample's (1, C) logits. Each call is the only work between
    the forward pass (or the sweep) and its timing, so no other call warms it up."""
    spec = IMAGENET_SIZED[key](image_size)
    classifier = OnnxClassifier(spec.onnx_path)
    image = np.random.default_rng(0).random((1, *spec.input_shape), dtype=np.float32)
    logits = classifier.run(image, [LOGITS])[LOGITS]
    wide = logits.astype(np.float64)
    calls: dict[str, Callable[[], object]] = {
        "logits.copy()": logits.copy,
        "logits.argmax()": logits.argmax,
        "logits.astype(float64)": lambda: logits.astype(np.float64),
        "np.exp of C float64": lambda: np.exp(wide),
        "np.add.reduce of C float64": lambda: np.add.reduce(wide, axis=1),
    }
    source = np.ones(sweep_mib * 2**20 // 8)
    target = np.empty_like(source)
    before: dict[str, Callable[[], object]] = {
        "forward": lambda: classifier.run(image, [LOGITS]),
        "sweep": lambda: np.copyto(target, source),
    }
    times: dict[tuple[str, str], list[float]] = {}
    deadline = time.perf_counter() + seconds
    rounds = 0
    while time.perf_counter() < deadline and rounds < MAX_ROUNDS:
        rounds += 1
        for name, call in calls.items():
            for what, work in before.items():
                work()
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                call()
                t2 = time.perf_counter()
                times.setdefault((name, what), []).append(t1 - t0)
                times.setdefault((name, "again"), []).append(t2 - t1)

    def median_us(name: str, what: str) -> float:
        return float(np.median(times[(name, what)]) * 1e6)

    return [
        (name, median_us(name, "forward"), median_us(name, "sweep"), median_us(name, "again"))
        for name in calls
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet")
    parser.add_argument("--seconds", type=float, default=20.0, help="per model")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=1, help="one-image requests per batch")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run on the CPUs bench.serving --pin-server gives tritonserver",
    )
    parser.add_argument(
        "--sweep-mib", type=int, default=32, help="MiB of other data the probe copies"
    )
    args = parser.parse_args(argv)
    if args.pin:  # before onnxruntime starts threads: they inherit this
        common.pin_threads(common.split_cores()[0])
    print(
        f"gradtrust from {gradtrust.__file__}; load average {common.load_average()}; "
        f"{args.requests} one-image request(s) per batch; CPUs {sorted(os.sched_getaffinity(0))}"
    )
    keys = common.parse_names(args.models)
    print("| model | rounds | forward median (min), us | service after forward | hot |")
    print("|---|---|---|---|---|")
    for key in keys:
        r = measure(key, args.image_size, args.seconds, args.requests)
        print(
            f"| {key} | {r['rounds']} | {r['forward_median_us']:.0f} ({r['forward_min_us']:.0f}) "
            f"| {r['after_forward_median_us']:.0f} ({r['after_forward_min_us']:.0f}), "
            f"{r['after_forward_pct_of_forward']:.1f} % of forward "
            f"| {r['hot_median_us']:.0f} ({r['hot_min_us']:.0f}) |"
        )
    print(
        f"\nOne numpy call, median us: first after a forward pass of {keys[-1]}, first after "
        f"copying {args.sweep_mib} MiB of other data, and again at once"
    )
    print("| call | after forward | after copying | again |")
    print("|---|---|---|---|")
    for name, forward, sweep, again in probe_calls(
        keys[-1], args.image_size, args.seconds, args.sweep_mib
    ):
        print(f"| `{name}` | {forward:.1f} | {sweep:.1f} | {again:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
