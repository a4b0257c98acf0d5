"""Under concurrent load, the published metrics count every prediction exactly once.

The model records each batch in process and a background thread publishes the counts
(gradtrust.serving.telemetry); here many clients race that thread through the real tritonserver,
and the endpoint's totals must match what was served, image for image and batch for batch.
"""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tests.integration.triton_io import PROTOCOLS, infer, model_samples, settled


def _totals(server: Any) -> dict[str, float]:
    """The model's gradtrust_* samples summed over everything but model and version
    (the ``+Inf`` bucket alone for the bucket series)."""
    totals: dict[str, float] = {}
    for name, labels, value in model_samples(server):
        if not name.startswith("gradtrust_"):
            continue
        if name.endswith("_bucket") and labels.get("le") != "+Inf":
            continue
        totals[name] = totals.get(name, 0.0) + value
    return totals


def _executions(server: Any) -> tuple[int, int]:
    """(inferences, executions) from Triton's own statistics: images and batches run."""
    url = f"http://{server.http_url}/v2/models/{server.model_name}/stats"
    with urllib.request.urlopen(url, timeout=10) as resp:
        stats = json.loads(resp.read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def _low_trust_threshold(server: Any) -> float:
    url = f"http://{server.http_url}/v2/models/{server.model_name}/config"
    with urllib.request.urlopen(url, timeout=10) as resp:
        config = json.load(resp)
    return float(config["parameters"]["low_trust_threshold"]["string_value"])


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_count_every_image_and_batch_once_when_clients_race_the_flush_thread(
    triton_server, digits
):
    images = digits[0]
    rng = np.random.default_rng(7)
    jobs = [
        (PROTOCOLS[n % 2], images[i : i + size])
        for n, (i, size) in enumerate(
            zip(rng.integers(0, len(images) - 4, 240), rng.integers(1, 5, 240), strict=True)
        )
    ]
    before = settled(lambda: (_totals(triton_server), _executions(triton_server)))
    with ThreadPoolExecutor(max_workers=16) as pool:
        served = list(pool.map(lambda job: infer(triton_server, job[0], job[1]), jobs))
    after = settled(lambda: (_totals(triton_server), _executions(triton_server)))

    sent = sum(len(batch) for _, batch in jobs)
    assert sum(len(out["GRADTRUST"]) for out in served) == sent
    (totals_before, (inferences_before, executions_before)) = before
    (totals_after, (inferences_after, executions_after)) = after
    assert inferences_after - inferences_before == sent
    batches = executions_after - executions_before
    assert batches < len(jobs), "the dynamic batcher never combined requests: no race tested"
    for name in (
        "gradtrust_predictions_total",
        "gradtrust_trust_count",
        "gradtrust_trust_bucket",
        "gradtrust_trust_normalized_count",
        "gradtrust_confidence_count",
    ):
        assert _delta(totals_after, totals_before, name) == sent, name
    # One timing per batch the model executed.
    assert _delta(totals_after, totals_before, "gradtrust_trust_compute_seconds_count") == batches
    # Low trust is judged on float64 scores; the client sees them as float32.
    g = np.concatenate([out["GRADTRUST"][:, 0] for out in served]).astype(np.float64)
    threshold = _low_trust_threshold(triton_server)
    near = np.isclose(g, threshold, rtol=1e-6)
    counted = _delta(totals_after, totals_before, "gradtrust_low_trust_predictions_total")
    assert np.count_nonzero((g < threshold) & ~near) <= counted
    assert counted <= np.count_nonzero((g < threshold) | near)
