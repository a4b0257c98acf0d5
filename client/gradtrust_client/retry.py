"""Retrying transient failures: bounded attempts, exponential backoff with jitter.

What is transient: the server could not be reached (connection refused or reset, gRPC
UNAVAILABLE, HTTP 503) or the model's backend process had died (Triton answers INTERNAL
"Stub process ... is not healthy" until the server is restarted, which ``gradtrust
serve`` does by itself). Classifying a request is a pure function of its input, so
repeating one is safe.

What is never retried: a rejected request (HTTP 400 / INVALID_ARGUMENT), an unknown or
unloaded model, and (unless ``retry_timeouts``) a timeout, because the timed-out request
may still be running on the server and repeating it adds load exactly when the server is
slowest.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from gradtrust_client.errors import InvalidRequestError, ServerUnavailableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    ``attempts`` counts every try, the first included (1 = never retry). The n-th retry
    waits ``initial_backoff_s * multiplier**(n-1)``, capped at ``max_backoff_s``, times a
    random factor in ``[1 - jitter, 1 + jitter]`` so that many clients do not retry in
    lockstep. The default rides out about a second of unavailability; to ride out a server
    restart (several seconds) use e.g. ``RetryPolicy(attempts=12, max_backoff_s=1.0)``.
    """

    attempts: int = 4
    initial_backoff_s: float = 0.1
    multiplier: float = 2.0
    max_backoff_s: float = 2.0
    jitter: float = 0.2
    retry_timeouts: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise InvalidRequestError(f"attempts must be an integer, got {self.attempts!r}")
        if self.attempts < 1:
            raise InvalidRequestError(f"attempts must be at least 1, got {self.attempts}")
        if not (self.initial_backoff_s >= 0 and self.max_backoff_s >= 0):
            raise InvalidRequestError("backoff times must be >= 0 seconds")
        if not self.multiplier >= 1:
            raise InvalidRequestError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise InvalidRequestError(f"jitter must lie in [0, 1), got {self.jitter}")

    def backoffs(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits before retry 1, 2, ... (``attempts - 1`` of them)."""
        rng = rng or random.Random()
        for n in range(self.attempts - 1):
            base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**n)
            yield base * rng.uniform(1 - self.jitter, 1 + self.jitter)

    def is_transient(self, error: BaseException) -> bool:
        """True for failures worth another try under this policy."""
        if not isinstance(error, ServerUnavailableError):
            return False
        return self.retry_timeouts or not error.timed_out

    def call(
        self,
        fn: Callable[[], T],
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> T:
        """``fn()``, repeated after a backoff while it fails transiently; the last error is
        raised when the attempts run out, any other error at once."""
        waits = self.backoffs(rng)
        while True:
            try:
                return fn()
            except ServerUnavailableError as err:
                if not self.is_transient(err):
                    raise
                wait = next(waits, None)
                if wait is None:
                    raise
            sleep(wait)


#: A policy that tries once.
NO_RETRY = RetryPolicy(attempts=1)
#: What :class:`~gradtrust_client.TrustClient` uses unless told otherwise.
DEFAULT_RETRY = RetryPolicy()
