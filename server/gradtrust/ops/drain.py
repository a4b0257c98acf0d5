"""How long a draining tritonserver may need: the exit timeout, computed from the bounds.

On SIGTERM Triton stops accepting and answers what it has accepted, but only for
``--exit-timeout-secs``: when that expires with requests still queued or running, Triton
2.51 drops them and can segfault on its way out (docs/SECURITY.md). So the timeout must
cover everything a model can have accepted: its queue (``max_queue_size`` of its
``dynamic_batching``) plus one batch per instance, each taking at most the longest
admissible request, which the per-request bounds (pixels decoded, batch size, VOICE images;
docs/SECURITY.md) keep finite. Models run side by side, so the slowest model decides.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

#: Requests assumed queued for a model whose queue is unbounded (no max_queue_size):
#: nothing bounds the drain of such a model, so `gradtrust serve` says so at start.
UNBOUNDED_QUEUE_ASSUMED = 64
#: Seconds added for unloading models and stopping the endpoints.
SHUTDOWN_MARGIN_S = 10.0


@dataclass(frozen=True)
class ModelQueue:
    """What a model's config.pbtxt says about how much it can have accepted."""

    name: str
    instances: int
    max_queue_size: int | None  # None: unbounded (Triton's default)

    @property
    def accepted(self) -> int:
        """Requests it can hold: its queue, plus one executing per instance."""
        queued = UNBOUNDED_QUEUE_ASSUMED if self.max_queue_size is None else self.max_queue_size
        return queued + self.instances


def _int_field(text: str, name: str) -> int | None:
    match = re.search(rf"\b{name}\s*:\s*(\d+)", text)
    return int(match[1]) if match else None


def read_queue(config: Path) -> ModelQueue:
    """The queue facts of one ``config.pbtxt`` (a text-format subset: the fields named)."""
    text = re.sub(r"#[^\n]*", "", config.read_text())
    name_match = re.search(r'\bname\s*:\s*"([^"]+)"', text)
    counts = [int(c) for c in re.findall(r"\bcount\s*:\s*(\d+)", text)]
    queue = _int_field(text, "max_queue_size")
    return ModelQueue(
        name=name_match[1] if name_match else config.parent.name,
        instances=max(1, sum(counts)) if counts else 1,
        max_queue_size=queue if queue else None,  # 0 means unbounded in Triton
    )


def model_queues(repository: Path) -> list[ModelQueue]:
    """Every model entry of a repository (folders with a config.pbtxt)."""
    return [read_queue(c) for c in sorted(Path(repository).glob("*/config.pbtxt"))]


def exit_timeout_s(queues: list[ModelQueue], max_request_s: float) -> int:
    """Seconds that let every model finish all it can have accepted, one request after
    another per instance, each at most ``max_request_s``; at least 30 (Triton's default)."""
    worst = max((math.ceil(q.accepted / q.instances) * max_request_s for q in queues), default=0.0)
    return max(30, math.ceil(worst + SHUTDOWN_MARGIN_S))
