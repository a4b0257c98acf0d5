"""What an introspective request costs next to a plain one, in process, side by side.

For each model (the trained demo CNN, C = 10, D = 64; the MobileNetV2-sized CNN, C = 1000,
D = 1280, random weights) the same TrustService answers, in interleaved rounds:

- ``plain``: a request that names no outputs (LABEL, CLASS_ID, CONFIDENCE, GRADTRUST);
- ``introspective``: the same outputs plus every INTROSPECTIVE_* output, i.e. the
  penultimate features, the unit factors of the introspective feature and the
  introspective network (``gradtrust introspect``'s default shape: hidden 128, rank
  min(C, D, 16)) run by onnxruntime.

The introspective network has random weights (only time is measured). Also timed: the
second stage alone, and the dense first layer it replaces, at C = 1000 (how many weights
and how long one matrix product over the 1.28 M features takes).

    python -m bench.introspection            # writes bench/results/introspection.{json,md}
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._common import RESULTS, measure, measure_interleaved, summary
from bench.models import demo_cnn, mobilenet_like
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import INTROSPECTIVE_OUTPUTS
from gradtrust.serving.introspector import Introspector
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import ModelSettings, RequestOptions
from gradtrust.tools.introspect.network import IntrospectiveMLP, export_onnx

PLAIN = RequestOptions(scores=None, contrast_k=3, heatmap_method=None, contrast_class=None)
CHEAP = frozenset({"LABEL", "CLASS_ID", "CONFIDENCE", "GRADTRUST"})


def bench_model(spec: Any, batches: tuple[int, ...], budget_s: float, tmp: Path) -> dict[str, Any]:
    classifier = OnnxClassifier(spec.onnx_path, intra_op_threads=1)
    c = spec.num_classes
    d = int(
        classifier.run(np.zeros((1, *spec.input_shape), np.float32), ["features"])[
            "features"
        ].shape[1]
    )
    torch.manual_seed(0)
    mlp = IntrospectiveMLP(c, d)
    path = export_onnx(mlp, tmp / f"{spec.name}_introspection.onnx")
    introspector = Introspector(path, c, d)
    settings = ModelSettings.from_parameters({}, [f"c{i}" for i in range(c)])
    service = TrustService(classifier, settings, introspector=introspector)
    rng = np.random.default_rng(0)
    rows = []
    for n in batches:
        images = rng.random((n, *spec.input_shape), dtype=np.float32)
        plain = [ScoringRequest(images, PLAIN, CHEAP)]
        second = [ScoringRequest(images, PLAIN, CHEAP | set(INTROSPECTIVE_OUTPUTS))]
        service.run(plain), service.run(second)  # warm up both paths
        times = measure_interleaved(
            {
                "plain": lambda r=plain: service.run(r),
                "introspective": lambda r=second: service.run(r),
            },
            min_rounds=5,
            max_rounds=400,
            budget_s=budget_s,
        )
        out = classifier.run(images, ["logits", "features"])
        stage = summary(
            measure(
                lambda o=out: introspector.predict(o["logits"], o["features"]),
                min_reps=5,
                max_reps=400,
                budget_s=budget_s / 4,
            )
        )
        p, i = summary(times["plain"]), summary(times["introspective"])
        rows.append(
            {
                "batch": n,
                "plain_ms": p["median_s"] * 1e3,
                "introspective_ms": i["median_s"] * 1e3,
                "ratio": i["median_s"] / p["median_s"],
                "second_stage_ms": stage["median_s"] * 1e3,
                "iqr_rel": max(p["iqr_rel"], i["iqr_rel"]),
                "rounds": p["reps"],
            }
        )
    return {
        "model": spec.name,
        "classes": c,
        "features": d,
        "rank": mlp.rank,
        "hidden": mlp.hidden,
        "first_layer_weights": mlp.hidden * mlp.rank * (c + d),
        "dense_first_layer_weights": mlp.hidden * c * d,
        "rows": rows,
    }


def dense_layer_cost(c: int, d: int, hidden: int, budget_s: float) -> dict[str, float]:
    """One dense first layer (hidden x C*D, float32) applied to one materialised feature."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((hidden, c * d), dtype=np.float32)
    g, h = rng.standard_normal(c, dtype=np.float32), rng.standard_normal(d, dtype=np.float32)
    times = measure(
        lambda: weight @ np.outer(g, h).reshape(-1), min_reps=3, max_reps=50, budget_s=budget_s
    )
    return {"median_ms": summary(times)["median_s"] * 1e3, "weight_mb": weight.nbytes / 2**20}


def markdown(run: dict[str, Any]) -> str:
    lines = [
        "| model | C | D | batch | plain ms | introspective ms | ratio | second stage ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in run["models"]:
        for r in m["rows"]:
            lines.append(
                f"| {m['model']} | {m['classes']} | {m['features']} | {r['batch']} "
                f"| {r['plain_ms']:.3f} | {r['introspective_ms']:.3f} | {r['ratio']:.3f} "
                f"| {r['second_stage_ms']:.3f} |"
            )
    dense = run["dense_c1000"]
    big = run["models"][-1]
    lines += [
        "",
        f"First layer at C = {big['classes']}, D = {big['features']}, hidden {big['hidden']}: "
        f"{big['first_layer_weights'] / 1e6:.2f} M weights (rank {big['rank']}) against "
        f"{big['dense_first_layer_weights'] / 1e6:.1f} M for the dense layer "
        f"({dense['weight_mb']:.0f} MB float32, {dense['median_ms']:.1f} ms per image for its "
        "matrix product alone).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--budget", type=float, default=8.0, help="seconds per (model, batch)")
    parser.add_argument("--out", type=Path, default=RESULTS / "introspection")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models = [
            bench_model(demo_cnn(), (1, 8, 64), args.budget, Path(tmp)),
            bench_model(mobilenet_like(), (1, 8), args.budget, Path(tmp)),
        ]
    run = {
        "command": "python -m bench.introspection",
        "models": models,
        "dense_c1000": dense_layer_cost(1000, 1280, 128, args.budget),
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(run, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(run))
    print(markdown(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
