"""The client's retry policy: what is retried, how long it waits, and when it gives up."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gradtrust_client import (
    DEFAULT_RETRY,
    NO_RETRY,
    InvalidRequestError,
    ModelNotReadyError,
    RetryPolicy,
    ServerUnavailableError,
    TrustClient,
    TrustClientError,
)
from gradtrust_client._transport import Transport


class Flaky:
    """Fails with the given errors, in order, then answers ``"ok"``; counts the calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _unavailable() -> ServerUnavailableError:
    return ServerUnavailableError("connection refused")


def test_retry_policy_answers_after_transient_failures_when_attempts_suffice():
    waits: list[float] = []
    fn = Flaky(_unavailable(), _unavailable())
    assert RetryPolicy(attempts=3).call(fn, sleep=waits.append) == "ok"
    assert fn.calls == 3 and len(waits) == 2


def test_retry_policy_raises_the_last_error_after_exactly_attempts_tries_when_server_stays_down():
    waits: list[float] = []
    fn = Flaky(*[_unavailable() for _ in range(10)])
    with pytest.raises(ServerUnavailableError):
        RetryPolicy(attempts=4).call(fn, sleep=waits.append)
    assert fn.calls == 4 and len(waits) == 3


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequestError("unknown score name(s) ['x']"),
        ModelNotReadyError("model 'x' is not ready"),
        TrustClientError("request failed [500]: model crashed"),
        ServerUnavailableError("did not answer within 5 s", timed_out=True),
    ],
    ids=["invalid-argument", "model-not-ready", "other-server-error", "timeout"],
)
def test_retry_policy_tries_once_when_the_error_is_not_transient(error):
    waits: list[float] = []
    fn = Flaky(error)
    with pytest.raises(type(error)):
        RetryPolicy(attempts=5).call(fn, sleep=waits.append)
    assert fn.calls == 1 and waits == []


def test_retry_policy_retries_timeouts_only_when_asked():
    fn = Flaky(ServerUnavailableError("slow", timed_out=True))
    assert RetryPolicy(attempts=2, retry_timeouts=True).call(fn, sleep=lambda s: None) == "ok"


def test_retry_policy_backs_off_exponentially_up_to_the_cap_when_jitter_is_off():
    policy = RetryPolicy(
        attempts=7, initial_backoff_s=0.1, multiplier=2, max_backoff_s=1.0, jitter=0
    )
    assert list(policy.backoffs()) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_retry_policy_keeps_each_wait_within_the_jitter_band_when_jitter_is_on():
    policy = RetryPolicy(attempts=50, initial_backoff_s=0.5, multiplier=1, jitter=0.2)
    waits = list(policy.backoffs(random.Random(7)))
    assert len(waits) == 49 and all(0.4 <= w <= 0.6 for w in waits)
    assert len({round(w, 6) for w in waits}) > 10  # really randomised


def test_default_retry_policy_gives_up_within_a_second_when_server_is_down():
    assert DEFAULT_RETRY.attempts > 1 and NO_RETRY.attempts == 1
    without_jitter = sum(dataclasses.replace(DEFAULT_RETRY, jitter=0).backoffs())
    assert without_jitter * (1 + DEFAULT_RETRY.jitter) < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"attempts": 1.5},
        {"multiplier": 0.5},
        {"jitter": 1.0},
        {"max_backoff_s": -1},
    ],
)
def test_retry_policy_raises_invalid_request_when_settings_cannot_work(kwargs):
    with pytest.raises(InvalidRequestError):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("status", "message", "transient"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", True),
        ("503", "Service Unavailable", True),
        ("500", "Stub process 'gradtrust_mnist_0_0' is not healthy.", True),
        ("StatusCode.INTERNAL", "Stub process 'gradtrust_mnist_0_0' is not healthy.", True),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", False),
        ("400", "unknown score name(s) ['x']", False),
        ("StatusCode.INVALID_ARGUMENT", "IMAGE has NaN or Inf pixels", False),
        ("500", "model crashed", False),
    ],
)
def test_transport_marks_errors_retryable_only_when_they_are_transient(status, message, transient):
    transport = Transport("127.0.0.1:1", "http", 1.0)
    with pytest.raises(TrustClientError) as info, transport.translated("m"):
        raise InferenceServerException(msg=message, status=status)
    assert DEFAULT_RETRY.is_transient(info.value) is transient


class CountingTransport:
    """Stands in for the network: the server is down for ``down`` calls of each kind."""

    def __init__(self, down: int, error: Exception) -> None:
        self.down = down
        self.error = error
        self.infers = 0
        self.url, self.protocol, self.location = "fake:1", "http", "http://fake:1"

    def model_ready(self, model: str) -> bool:
        return True

    def model_config(self, model: str) -> dict:
        return {
            "max_batch_size": 4,
            "input": [{"name": "IMAGE", "data_type": "TYPE_FP32", "dims": [1, 2, 2]}],
            "output": [],
        }

    def infer(self, model, input_name, batch, outputs, parameters):
        self.infers += 1
        if self.infers <= self.down:
            raise self.error
        n = len(batch)
        return {
            "LABEL": np.array([[b"1"]] * n, dtype=object),
            "CLASS_ID": np.ones((n, 1), np.int64),
            "CONFIDENCE": np.full((n, 1), 0.9, np.float32),
            "GRADTRUST": np.full((n, 1), 5.0, np.float32),
        }

    def close(self) -> None:
        pass


def _client(transport: CountingTransport, retry: RetryPolicy) -> TrustClient:
    client = TrustClient("fake:1", retry=retry)
    client._transport = transport
    return client


def test_trust_client_retries_each_batch_when_server_is_briefly_unavailable():
    transport = CountingTransport(down=2, error=_unavailable())
    fast = RetryPolicy(attempts=3, initial_backoff_s=0.001)
    predictions = _client(transport, fast).predict(np.zeros((6, 1, 2, 2), np.float32))
    assert len(predictions) == 6 and transport.infers == 4  # 2 failures, then 2 batches


def test_trust_client_sends_an_invalid_request_once_when_retries_are_on():
    transport = CountingTransport(down=99, error=InvalidRequestError("bad pixels"))
    with pytest.raises(InvalidRequestError):
        _client(transport, RetryPolicy(attempts=5)).predict(np.zeros((1, 1, 2, 2), np.float32))
    assert transport.infers == 1
