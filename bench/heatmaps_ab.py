"""Heatmap cost per image before and after issue 16, side by side in one run.

Loads an older copy of the heatmap module (for example
``git show 73d0075:server/gradtrust/heatmaps.py > /tmp/old_heatmaps.py``) next to the
current :mod:`gradtrust.core.heatmaps` and times ``explain`` for each method on one image
of a C = 1000 head with a 7 x 7 activation (K = 512 as in the resnet18 bench model, 1280 as
in the mobilenet one), maps at 224 x 224. The old code is called as the old service called
it (the model's float32 weight, converted and checked on every call, unless the old module
already has a ``Head`` prepared once per model); the new one with the
:class:`~gradtrust.core.heatmaps.Head` prepared once. Both must give the same maps, to the
column ``max |after - before|``. Run it with ``OPENBLAS_NUM_THREADS=1``, as the server runs
its stubs (``gradtrust.ops.tritonserver``).

``python -m bench.heatmaps_ab --old /tmp/old_heatmaps.py``; see ``--help``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import _common as common
from gradtrust.core import heatmaps

log = logging.getLogger("bench.heatmaps_ab")
METHODS = ("gradcam", "contrast", "voice")


def load_old(path: Path) -> Any:
    """Import an older heatmaps module from ``path`` (its score imports mapped to today's)."""
    text = path.read_text().replace(
        "from gradtrust.scores import", "from gradtrust.core.scores import"
    )
    spec = importlib.util.spec_from_loader("old_heatmaps", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_heatmaps"] = module
    exec(compile(text, str(path), "exec"), module.__dict__)  # noqa: S102 - a local file we chose
    return module


def _best(fn: Any, reps: int, budget_s: float) -> float:
    return min(common.measure(fn, min_reps=reps, max_reps=50, budget_s=budget_s))


def run(old: Any, channels: tuple[int, ...], budget_s: float) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for k in channels:
        weight = (rng.normal(size=(1000, k)) / np.sqrt(k)).astype(np.float32)
        activation = np.maximum(rng.normal(size=(1, k, 7, 7)), 0).astype(np.float32)
        logits = activation.mean(axis=(2, 3)) @ weight.T
        head = heatmaps.Head.from_weight(weight)
        # An old module that already prepared its head once per model is timed that way.
        old_head = old.Head.from_weight(weight) if hasattr(old, "Head") else weight
        for method in METHODS:
            new_maps, _ = heatmaps.explain(method, activation, head, logits, (224, 224))
            old_maps, _ = old.explain(method, activation, old_head, logits, (224, 224))
            diff = float(np.abs(new_maps - old_maps).max())
            reps = 2 if method == "voice" else 5
            old_args = (method, activation, old_head, logits, (224, 224))
            new_args = (method, activation, head, logits, (224, 224))
            t_old = _best(lambda a=old_args: old.explain(*a), reps, budget_s)
            t_new = _best(lambda a=new_args: heatmaps.explain(*a), 5, budget_s)
            rows.append(
                {
                    "channels": k,
                    "method": method,
                    "old_ms": 1e3 * t_old,
                    "new_ms": 1e3 * t_new,
                    "x_faster": t_old / t_new,
                    "max_abs_diff": diff,
                }
            )
            log.info(
                "K=%d %-8s old %9.2f ms  new %7.3f ms  diff %.1e",
                k,
                method,
                rows[-1]["old_ms"],
                rows[-1]["new_ms"],
                diff,
            )
    return rows


COLUMNS = [
    ("channels", "K"),
    ("method", "method"),
    ("old_ms", "before, ms/image"),
    ("new_ms", "after, ms/image"),
    ("x_faster", "× faster"),
    ("max_abs_diff", "max |after - before|"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="older heatmaps.py to compare")
    parser.add_argument("--channels", default="512,1280")
    parser.add_argument("--budget-s", type=float, default=1.0, help="per timing, after min reps")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--name", default="heatmaps_ab")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_before = common.load_average()
    rows = run(load_old(args.old), tuple(common.parse_ints(args.channels)), args.budget_s)
    data = {
        "benchmark": "heatmaps_ab",
        "old": str(args.old),
        "machine": common.machine(),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "rows": rows,
    }
    text = (
        "### Heatmaps before and after (one image, C = 1000, 7 x 7 -> 224 x 224)\n\n"
        + common.markdown_table(rows, COLUMNS)
        + f"\n\nLoad average before / after: {load_before} / {data['load_average_after']}.\n"
    )
    path = common.write_results(args.out, args.name, data, text)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
