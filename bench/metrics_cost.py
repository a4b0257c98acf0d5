"""What recording one batch's metrics costs in a backend stub (docs/BENCHMARKS.md).

``TrustMetrics.observe_batch`` as the stub calls it after every batch, writing the
multiprocess files the exporter reads (gradtrust.serving.telemetry), for a calibrated model
(four histograms and two counters), at several batch sizes. Scores are drawn like the demo
model's (GRADTRUST mostly 5-20, confidence and TRUST_PROB near 1, a tail of low ones).

    .venv/bin/python -m bench.metrics_cost [--repeats N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from gradtrust.serving.telemetry import LowTrustRule, TrustMetrics

BATCH_SIZES = (1, 4, 16, 64, 256)


def _scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.where(rng.random(n) < 0.9, rng.normal(12.0, 3.0, n), rng.exponential(3.0, n))
    confidence = 1.0 - np.exp(-np.clip(g, 0.0, None) / 2.0) * rng.random(n)
    trust_prob = np.clip(confidence - 0.01, 0.001, 0.999)
    return np.clip(g, 0.0, None), confidence, trust_prob


def measure(repeats: int) -> dict[int, float]:
    """Median microseconds per observe_batch call, per batch size."""
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="gradtrust-metrics-cost-") as directory:
        metrics = TrustMetrics("bench", "1", LowTrustRule("trust_prob", 0.5), True, directory)
        for n in BATCH_SIZES:
            batches = [_scores(rng, n) for _ in range(64)]
            times = []
            for r in range(repeats):
                g, p, q = batches[r % len(batches)]
                t0 = time.perf_counter()
                metrics.observe_batch(g, p, 0.0005, q)
                times.append(time.perf_counter() - t0)
            out[n] = float(np.median(times) * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5000)
    args = parser.parse_args()
    print("| batch | µs per batch (median) | µs per prediction |")
    print("|---|---|---|")
    for n, us in measure(args.repeats).items():
        print(f"| {n} | {us:.1f} | {us / n:.2f} |")


if __name__ == "__main__":
    main()
