"""Under concurrent load, the published metrics count every prediction exactly once.

Each batch writes its counts into the stub's metrics files (gradtrust.serving.telemetry)
while the exporter (gradtrust.ops.exporter) reads them on every scrape; here many clients
of mixed batch sizes race the scrapes through the real tritonserver, and the endpoint's
totals must match what was served, image for image and batch for batch.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tests.integration.test_prometheus_live import low_trust_rule
from tests.integration.triton_io import CHEAP_OUTPUTS, PROTOCOLS, infer, model_samples, settled


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
    rule, threshold = low_trust_rule(triton_server)
    outputs = (*CHEAP_OUTPUTS, "TRUST_PROB") if rule == "trust_prob" else CHEAP_OUTPUTS
    before = settled(lambda: (_totals(triton_server), _executions(triton_server)))
    scrapes: list[float] = []
    stop = threading.Event()

    def scrape_until_stopped() -> None:  # the exporter reads while the stubs write
        while not stop.is_set():
            scrapes.append(_totals(triton_server).get("gradtrust_predictions_total", 0.0))

    scraper = threading.Thread(target=scrape_until_stopped)
    scraper.start()
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            served = list(pool.map(lambda job: infer(triton_server, job[0], job[1], outputs), jobs))
    finally:
        stop.set()
        scraper.join()
    after = settled(lambda: (_totals(triton_server), _executions(triton_server)))

    sent = sum(len(batch) for _, batch in jobs)
    assert sum(len(out["GRADTRUST"]) for out in served) == sent
    (totals_before, (inferences_before, executions_before)) = before
    (totals_after, (inferences_after, executions_after)) = after
    assert inferences_after - inferences_before == sent
    batches = executions_after - executions_before
    assert batches < len(jobs), "the dynamic batcher never combined requests: no race tested"
    names = [
        "gradtrust_predictions_total",
        "gradtrust_trust_count",
        "gradtrust_trust_bucket",
        "gradtrust_confidence_count",
    ]
    if rule == "trust_prob":
        names.append("gradtrust_trust_probability_count")
    for name in names:
        assert _delta(totals_after, totals_before, name) == sent, name
    # Scrapes during the load saw the count only grow, never past what was served.
    assert len(scrapes) >= 2
    assert all(a <= b for a, b in zip(scrapes, scrapes[1:], strict=False))
    assert scrapes[-1] <= totals_after["gradtrust_predictions_total"]
    # One timing per batch the model executed.
    assert _delta(totals_after, totals_before, "gradtrust_trust_compute_seconds_count") == batches
    # Low trust is judged on float64 scores; the client sees them as float32.
    column = "TRUST_PROB" if rule == "trust_prob" else "GRADTRUST"
    g = np.concatenate([out[column][:, 0] for out in served]).astype(np.float64)
    near = np.isclose(g, threshold, rtol=1e-6)
    counted = _delta(totals_after, totals_before, "gradtrust_low_trust_predictions_total")
    assert np.count_nonzero((g < threshold) & ~near) <= counted
    assert counted <= np.count_nonzero((g < threshold) | near)
