"""Specification of gradtrust.core.scores: every score against torch.autograd run on its definition.

The references below never use the closed forms: they build a real ``nn.Linear`` head
``z = W h + b`` in float64, write the loss of each definition, and differentiate it
with ``torch.autograd`` one sample at a time. The numpy scores must agree to 1e-6
relative (in practice about 1e-12), on random heads and on the trained demo model; the
headline ``gradtrust`` is a logarithm, so it must agree to ``LOG_ATOL`` absolute, which is
the same as 1e-9 relative on the ratio it is the log of.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn
from torch.nn import functional as F

from gradtrust import InvalidInputError
from gradtrust.core import scores as S

RTOL = 1e-6  # the contract; observed agreement is ~1e-12
LOG_ATOL = 1e-9  # for the log-domain headline gradtrust; observed ~1e-13
REPO = Path(__file__).resolve().parents[2]
DEMO_ONNX = REPO / "model_repository" / "gradtrust_mnist" / "1" / "model.onnx"
DEMO_STATE = REPO / "model_repository" / "gradtrust_mnist" / "demo_cnn.pt"
DEMO_DIGITS = REPO / "tests" / "data" / "mnist_test_digits.npz"
LOGIT_ONLY = tuple(name for name in S.SCORE_NAMES if name not in S.NEEDS_FEATURES)


# --------------------------------------------------------------------------- references


def _random_head(c: int, d: int, n: int, seed: int) -> tuple[nn.Linear, torch.Tensor]:
    """A float64 linear head with logits spread over a few units, and N feature rows."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, c, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(3.0 * torch.randn(c, d, generator=gen, dtype=torch.float64) / d**0.5)
        head.bias.copy_(0.5 * torch.randn(c, generator=gen, dtype=torch.float64))
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return head, h


def _weight_grad(head: nn.Linear, loss: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, head.weight, retain_graph=True)
    return grad


def _ref_gradtrust_released(head: nn.Linear, h: torch.Tensor) -> np.ndarray:
    """Released-code definition: MSE of z against 1/C, dL/dW, unbiased var_j of G_cj^2."""
    out = []
    for h_i in h:
        z = head(h_i)
        c = z.shape[0]
        g = _weight_grad(head, ((z - 1.0 / c) ** 2).mean())
        e = (g**2).var(dim=1, unbiased=True)
        out.append((e.max() / e.mean()).item())
    return np.array(out)


def _ref_contrast_trust(head: nn.Linear, h: torch.Tensor, k: int) -> np.ndarray:
    """Population variance of dCE(z, q)/dW over all C x D entries, contrasts over P."""
    out = []
    for h_i in h:
        z = head(h_i)
        order = torch.sort(torch.softmax(z, dim=0), descending=True, stable=True).indices
        k_eff = min(k, z.shape[0] - 1)

        def grad_var(q: int, z: torch.Tensor = z) -> torch.Tensor:
            loss = F.cross_entropy(z[None], torch.tensor([q]))
            return _weight_grad(head, loss).var(unbiased=False)

        v_pred = grad_var(int(order[0]))
        v_contrast = torch.stack([grad_var(int(q)) for q in order[1 : k_eff + 1]])
        out.append((v_contrast.mean() / v_pred).item())
    return np.array(out)


def _ref_gradnorm(head: nn.Linear, h: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Huang et al.: L1 norm of dW of sum_c -log softmax(z/T)_c."""
    out = []
    for h_i in h:
        z = head(h_i)
        loss = -torch.log_softmax(z / temperature, dim=0).sum()
        out.append(_weight_grad(head, loss).abs().sum().item())
    return np.array(out)


def _ref_baselines(z: torch.Tensor) -> dict[str, np.ndarray]:
    p = torch.softmax(z, dim=1)
    top2 = torch.topk(p, 2, dim=1).values
    refs = {
        "msp": p.max(dim=1).values,
        "entropy": (p * torch.log_softmax(z, dim=1)).sum(dim=1),
        "margin": top2[:, 0] - top2[:, 1],
        "max_logit": z.max(dim=1).values,
        "energy": torch.logsumexp(z, dim=1),
    }
    return {name: value.detach().numpy() for name, value in refs.items()}


def _all_references(head: nn.Linear, h: torch.Tensor, k: int = 3) -> dict[str, np.ndarray]:
    refs = _ref_baselines(head(h))
    refs["gradtrust"] = np.log(_ref_contrast_trust(head, h, S.GRADTRUST_K))
    refs["gradtrust_released"] = _ref_gradtrust_released(head, h)
    refs["contrast_trust"] = _ref_contrast_trust(head, h, k)
    refs["gradnorm"] = _ref_gradnorm(head, h)
    return refs


def _logits(head: nn.Linear, h: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return head(h).numpy()


def _assert_matches_references(scores: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> None:
    assert set(scores) == set(refs)
    for name, ref in refs.items():
        assert np.all(np.isfinite(ref)), f"reference {name} not finite: pick another head"
        if name == "gradtrust":
            np.testing.assert_allclose(scores[name], ref, rtol=0, atol=LOG_ATOL, err_msg=name)
        else:
            np.testing.assert_allclose(scores[name], ref, rtol=RTOL, atol=0, err_msg=name)


# --------------------------------------------------------------------- against autograd


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("c", "d"), [(2, 16), (10, 32), (1000, 64)])
def test_compute_scores_matches_autograd_definitions_when_random_linear_head(
    c: int, d: int, seed: int
) -> None:
    head, h = _random_head(c, d, n=5, seed=seed)
    scores = S.compute_scores(_logits(head, h), S.SCORE_NAMES, features=h.numpy())
    _assert_matches_references(scores, _all_references(head, h))


@pytest.mark.parametrize("c", [2, 10, 1000])
def test_each_score_function_matches_autograd_definitions_when_called_alone(c: int) -> None:
    head, h = _random_head(c, 24, n=4, seed=10 + c)
    z = _logits(head, h)
    scores = {
        "gradtrust": S.gradtrust(z),
        "gradtrust_released": S.gradtrust_released(z),
        "contrast_trust": S.contrast_trust(z),
        "msp": S.msp(z),
        "entropy": S.entropy(z),
        "margin": S.margin(z),
        "max_logit": S.max_logit(z),
        "energy": S.energy(z),
        "gradnorm": S.gradnorm(z, h.numpy()),
    }
    _assert_matches_references(scores, _all_references(head, h))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_contrast_trust_matches_autograd_when_k_varies(k: int) -> None:
    head, h = _random_head(10, 16, n=4, seed=7)
    got = S.compute_scores(_logits(head, h), ["contrast_trust"], contrast_k=k)["contrast_trust"]
    np.testing.assert_allclose(got, _ref_contrast_trust(head, h, k), rtol=RTOL, atol=0)


@pytest.mark.parametrize("temperature", [0.5, 1000.0])
def test_gradnorm_matches_autograd_when_temperature_is_not_one(temperature: float) -> None:
    head, h = _random_head(10, 16, n=4, seed=3)
    got = S.gradnorm(_logits(head, h), h.numpy(), temperature=temperature)
    np.testing.assert_allclose(got, _ref_gradnorm(head, h, temperature), rtol=RTOL, atol=0)


def _flat_tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        found: dict[str, torch.Tensor] = {}
        for key, value in obj.items():
            found.update(_flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
        return found
    return {}


def test_scores_match_autograd_when_demo_mnist_model_scores_real_digits() -> None:
    missing = [
        str(p.relative_to(REPO)) for p in (DEMO_ONNX, DEMO_STATE, DEMO_DIGITS) if not p.exists()
    ]
    if missing:
        pytest.fail(f"demo model files missing: {', '.join(missing)}; build the demo model first")
    import onnxruntime as ort

    with np.load(DEMO_DIGITS) as data:
        images = data["images"].astype(np.float32) / 255.0
    session = ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])
    onnx_logits, features = session.run(["logits", "features"], {"image": images})
    n_classes, d = onnx_logits.shape[1], features.shape[1]

    tensors = _flat_tensors(torch.load(DEMO_STATE, map_location="cpu", weights_only=True))
    head = nn.Linear(d, n_classes, dtype=torch.float64)
    h = torch.from_numpy(features.astype(np.float64))
    candidates = [
        key for key, t in tensors.items() if key.endswith("weight") and t.shape == (n_classes, d)
    ]
    for key in candidates:
        with torch.no_grad():
            head.weight.copy_(tensors[key].double())
            head.bias.copy_(tensors[key[: -len("weight")] + "bias"].double())
        if np.allclose(_logits(head, h), onnx_logits, rtol=1e-4, atol=1e-4):
            break
    else:
        pytest.fail(f"no ({n_classes}, {d}) Linear in {DEMO_STATE.name} reproduces the ONNX logits")

    scores = S.compute_scores(_logits(head, h), S.SCORE_NAMES, features=features)
    _assert_matches_references(scores, _all_references(head, h))


# ------------------------------------------------------------------------ hand-derived


def test_gradtrust_released_equals_hand_value_when_one_logit_is_one_of_four() -> None:
    # a = z - 1/4 = (3/4, -1/4, -1/4, -1/4); a^4 * 256 = (81, 1, 1, 1): 81 / (84/4) = 27/7.
    np.testing.assert_allclose(S.gradtrust_released([[1.0, 0.0, 0.0, 0.0]]), [27 / 7], 1e-15)


@pytest.mark.parametrize("gap", [0.0, 1.5, 20.0, 300.0, 354.0, 1e4, 1e30])
def test_gradtrust_equals_twice_the_logit_gap_when_two_classes(gap: float) -> None:
    # C = 2: the ratio is exp(2 (z_P - z_Q)), so its log is 2 (z_P - z_Q), with no ceiling.
    got = S.gradtrust([[0.25, 0.25 - gap], [0.25 - gap, 0.25]])
    np.testing.assert_allclose(got, [2 * gap] * 2, rtol=1e-15, atol=1e-15)


def test_gradtrust_equals_hand_value_when_probabilities_half_quarter_quarter() -> None:
    # p = (1/2, 1/4, 1/4): ||p - e_Q||^2 = 7/8, ||p - e_P||^2 = 3/8.
    np.testing.assert_allclose(S.gradtrust([[math.log(2), 0.0, 0.0]]), [math.log(7 / 3)], 1e-14)


@pytest.mark.parametrize("gap", [0.0, 1.5, 20.0, 300.0, 354.0])
def test_contrast_trust_equals_exp_two_gap_when_two_classes(gap: float) -> None:
    # C = 2: ||p - e_Q||^2 / ||p - e_P||^2 = 2 p_P^2 / (2 p_Q^2) = exp(2 (z_P - z_Q)).
    # gap = 354 puts ||p - e_P||^2 below the smallest normal float64.
    got = S.contrast_trust([[0.25, 0.25 - gap], [0.25 - gap, 0.25]])
    np.testing.assert_allclose(got, [math.exp(2 * gap)] * 2, rtol=1e-12)


def test_contrast_trust_equals_hand_value_when_probabilities_half_quarter_quarter() -> None:
    # p = (1/2, 1/4, 1/4): ||p - e_Q||^2 = 7/8, ||p - e_P||^2 = 3/8.
    np.testing.assert_allclose(S.contrast_trust([[math.log(2), 0.0, 0.0]]), [7 / 3], rtol=1e-14)


def test_contrast_trust_equals_hand_value_when_gap_makes_denominator_subnormal() -> None:
    # z = (354, 0, 0): s = e^-354; ratio = ((1 + s)^2 + 1 + s^2) / (6 s^2) ~ e^708 / 3.
    np.testing.assert_allclose(S.contrast_trust([[354.0, 0.0, 0.0]]), [math.exp(708) / 3], 1e-12)


def test_contrast_trust_stays_exact_when_exp_two_gap_overflows_but_the_score_does_not() -> None:
    # z = (355.2, 0, 0): e^710.4 overflows float64, the score ~ e^710.4 / 3 does not.
    got = S.contrast_trust([[355.2, 0.0, 0.0]])
    np.testing.assert_allclose(got, [math.exp(710.4 - math.log(3))], rtol=1e-11)


def test_baselines_equal_hand_values_when_probabilities_half_quarter_quarter() -> None:
    got = S.compute_scores([[math.log(2), 0.0, 0.0]], LOGIT_ONLY)
    expected = {
        "msp": 0.5,
        "entropy": -1.5 * math.log(2),
        "margin": 0.25,
        "max_logit": math.log(2),
        "energy": math.log(4),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], [value], rtol=1e-14, err_msg=name)


def test_gradnorm_equals_hand_value_when_two_classes() -> None:
    # p = (3/4, 1/4): ||2p - 1||_1 = 1, ||h||_1 = 3.
    np.testing.assert_allclose(S.gradnorm([[math.log(3), 0.0]], [[1.0, -2.0]]), [3.0], 1e-14)


# -------------------------------------------------------------------------- invariants


def test_scores_leave_inputs_unchanged_when_computed() -> None:
    head, h = _random_head(10, 8, n=6, seed=4)
    z = _logits(head, h).astype(np.float32)
    feats = h.numpy().copy()
    z_before, feats_before = z.copy(), feats.copy()
    z.setflags(write=False)
    feats.setflags(write=False)
    S.compute_scores(z, S.SCORE_NAMES, features=feats)
    for fn in (
        S.gradtrust,
        S.gradtrust_released,
        S.contrast_trust,
        S.msp,
        S.entropy,
        S.margin,
        S.energy,
        S.softmax,
    ):
        fn(z)
    S.gradnorm(z, feats)
    np.testing.assert_array_equal(z, z_before)
    np.testing.assert_array_equal(feats, feats_before)


def test_scores_of_a_sample_are_unchanged_when_other_samples_join_the_batch() -> None:
    head, h = _random_head(10, 8, n=3, seed=5)
    z, feats = _logits(head, h), h.numpy()
    others = np.array([[1e30, 0, 0, 0, 0, 0, 0, 0, 0, -1e30], [4.0] * 10, [0.1] * 10])
    others[2, 3] = 400.0
    batch_z = np.concatenate([others[:1], z, others[1:]])
    batch_h = np.concatenate([1e6 * np.ones((1, 8)), feats, np.zeros((2, 8))])
    together = S.compute_scores(batch_z, S.SCORE_NAMES, features=batch_h)
    for i in range(3):
        alone = S.compute_scores(z[i : i + 1], S.SCORE_NAMES, features=feats[i : i + 1])
        for name in S.SCORE_NAMES:
            np.testing.assert_allclose(together[name][1 + i], alone[name][0], rtol=1e-13)


@pytest.mark.parametrize(("n", "c"), [(50, 1000), (20_000, 2)])
def test_compute_scores_equals_scores_of_parts_when_batch_is_large(n: int, c: int) -> None:
    # Large batches are scored in row blocks; the split must not show in any value.
    rng = np.random.default_rng(8)
    z = 4.0 * rng.standard_normal((n, c))
    feats = rng.standard_normal((n, 3))
    whole = S.compute_scores(z, S.SCORE_NAMES, features=feats)
    cuts = [0, 1, 7, n // 2 + 3, n]
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        part = S.compute_scores(z[lo:hi], S.SCORE_NAMES, features=feats[lo:hi])
        for name in S.SCORE_NAMES:
            np.testing.assert_allclose(whole[name][lo:hi], part[name], rtol=1e-13, err_msg=name)


def test_compute_scores_equals_single_score_functions_when_all_names_requested() -> None:
    head, h = _random_head(7, 8, n=5, seed=6)
    z = _logits(head, h)
    together = S.compute_scores(z, S.SCORE_NAMES, features=h.numpy(), contrast_k=2)
    np.testing.assert_array_equal(together["contrast_trust"], S.contrast_trust(z, k=2))
    np.testing.assert_array_equal(together["gradnorm"], S.gradnorm(z, h.numpy()))
    for name in LOGIT_ONLY:
        if name != "contrast_trust":
            np.testing.assert_array_equal(together[name], getattr(S, name)(z), err_msg=name)


_LOGIT_BATCHES = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12).filter(
        lambda shape: shape[1] >= 2
    ),
    elements=st.one_of(
        st.floats(-50, 50, allow_nan=False, allow_infinity=False),
        st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False),
    ),
)


@settings(max_examples=200, deadline=None)
@given(z=_LOGIT_BATCHES)
def test_scores_stay_finite_and_in_their_documented_ranges_when_logits_are_any_finite_values(
    z: np.ndarray,
) -> None:
    n, c = z.shape
    h = np.linspace(-2.0, 3.0, n * 4).reshape(n, 4)
    got = S.compute_scores(z, S.SCORE_NAMES, features=h)
    for name, values in got.items():
        assert values.shape == (n,) and values.dtype == np.float64, name
        assert np.all(np.isfinite(values)), name
    tiny = 1e-12
    assert np.all((got["gradtrust"] >= 0.0) & (got["gradtrust"] <= 0.5 * np.finfo(float).max))
    assert np.all((got["gradtrust_released"] >= 1.0) & (got["gradtrust_released"] <= c))
    assert np.all(got["contrast_trust"] >= 1.0)
    assert np.all((got["msp"] >= 1.0 / c) & (got["msp"] <= 1.0))
    assert np.all((got["entropy"] >= -math.log(c) - tiny) & (got["entropy"] <= 0.0))
    assert np.all((got["margin"] >= 0.0) & (got["margin"] <= 1.0))
    np.testing.assert_array_equal(got["max_logit"], z.max(axis=1))
    z_max = z.max(axis=1)
    assert np.all(got["energy"] >= z_max)
    assert np.all(got["energy"] <= z_max + math.log(c) + tiny * np.maximum(1.0, np.abs(z_max)))
    bound = 2.0 * (c - 1) * np.abs(h).sum(axis=1)
    assert np.all((got["gradnorm"] >= 0.0) & (got["gradnorm"] <= bound * (1 + tiny)))


def test_every_score_rises_when_the_prediction_grows_more_confident() -> None:
    # z = (t, 0, ..., 0) for t from 1 up: more trust in every sense. (GradTrust is not
    # monotone for t < 2/C, where the logits are nearly equal: see its docstring.)
    t = np.linspace(1.0, 30.0, 40)
    z = np.zeros((t.size, 10))
    z[:, 0] = t
    got = S.compute_scores(z, S.SCORE_NAMES, features=np.ones((t.size, 5)))
    for name, values in got.items():
        assert np.all(np.diff(values) >= 0.0), name
        assert values[-1] > values[0], name


def test_gradtrust_released_rises_when_one_logit_is_strongly_negative() -> None:
    # The documented caveat: |a|^4 counts a very negative logit like a dominant one.
    calm, one_negative = S.gradtrust_released([[2.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.0, -30.0]])
    assert one_negative > calm


def test_predicted_class_picks_the_lowest_index_when_logits_tie() -> None:
    got = S.predicted_class([[1.0, 3.0, 3.0], [5.0, 5.0, 5.0], [0.0, -1.0, 2.0]])
    np.testing.assert_array_equal(got, [1, 0, 2])


def test_softmax_sums_to_one_when_logits_are_extreme() -> None:
    p = S.softmax([[1e30, 0.0, -1e30], [1.7e308, -1.7e308, 0.0], [3.0, 3.0, 3.0]])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(p[2], [1 / 3] * 3, rtol=1e-15)


# ---------------------------------------------------------------------- degenerate input


def test_scores_take_their_minimum_trust_values_when_all_logits_are_equal() -> None:
    got = S.compute_scores(np.full((2, 5), 7.0), LOGIT_ONLY)
    np.testing.assert_array_equal(got["gradtrust"], [0.0, 0.0])
    np.testing.assert_array_equal(got["gradtrust_released"], [1.0, 1.0])
    np.testing.assert_allclose(got["contrast_trust"], [1.0, 1.0], rtol=1e-15)
    np.testing.assert_allclose(got["msp"], [0.2, 0.2], rtol=1e-15)
    np.testing.assert_allclose(got["entropy"], [-math.log(5)] * 2, rtol=1e-15)
    np.testing.assert_array_equal(got["margin"], [0.0, 0.0])
    np.testing.assert_allclose(got["energy"], [7.0 + math.log(5)] * 2, rtol=1e-15)


@pytest.mark.parametrize("c", [2, 4, 10])
def test_gradtrust_released_is_defined_as_one_when_every_logit_equals_one_over_c(c: int) -> None:
    np.testing.assert_array_equal(S.gradtrust_released(np.full((3, c), 1.0 / c)), [1.0] * 3)


def test_gradnorm_is_zero_when_logits_are_equal_or_features_are_zero() -> None:
    got = S.gradnorm([[2.0, 2.0, 2.0], [9.0, 0.0, 0.0]], [[1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_array_equal(got, [0.0, 0.0])


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("gap", [1e3, 1e30, 1.7e308])
def test_scores_stay_finite_without_warnings_when_logit_gaps_are_huge(gap: float) -> None:
    z = np.array([[gap, 0.0, 0.0], [0.0, -gap, 1.0], [gap / 2, -gap / 2, 0.0]])
    got = S.compute_scores(z, S.SCORE_NAMES, features=np.ones((3, 2)))
    for name, values in got.items():
        assert np.all(np.isfinite(values)), name
    np.testing.assert_array_equal(got["msp"][[0, 2]], [1.0, 1.0])
    np.testing.assert_allclose(got["entropy"][[0, 2]], [0.0, 0.0], atol=1e-200)
    np.testing.assert_array_equal(got["contrast_trust"][[0, 2]], [np.finfo(np.float64).max] * 2)
    np.testing.assert_allclose(got["gradtrust_released"][0], 3.0, rtol=1e-12)
    # z = (gap, 0, 0): the ratio is ((1 + s)^2 + 1 + s^2) / (6 s^2) with s = e^-gap, whose
    # log is 2 gap - log 3 here; past a gap of 4.5e307 the score is capped, still finite.
    expected = 2 * min(gap, np.finfo(np.float64).max / 4) - math.log(3)
    np.testing.assert_allclose(got["gradtrust"][0], expected, rtol=1e-15)


@pytest.mark.filterwarnings("error")
def test_scores_equal_hand_values_without_warnings_when_logits_span_more_than_float64() -> None:
    # z_c - z_Q1 overflows to -inf for the -1e308 class; its probability is exactly 0.
    z = np.array([[1e308, 1e308, -1e308], [1.5e308, 1e308, -1e308]])
    got = S.compute_scores(z, S.SCORE_NAMES, features=np.array([[1.0, -2.0], [0.5, 0.5]]))
    expected = {
        # p = (1/2, 1/2, 0): contrasts Q1, Q2 give (1/2 + 3/2) / 2 over 1/2.
        "gradtrust": [math.log(2), np.finfo(np.float64).max / 2],  # gap 5e307: capped
        "gradtrust_released": [1.0, 3 * 81 / 113],  # a ~ (1.5, 1, -1) e308
        "contrast_trust": [2.0, np.finfo(np.float64).max],
        "msp": [0.5, 1.0],
        "entropy": [-math.log(2), 0.0],
        "margin": [0.0, 1.0],
        "max_logit": [1e308, 1.5e308],
        "energy": [1e308, 1.5e308],  # + log 2 is below the spacing of floats at 1e308
        "gradnorm": [2.0 * 3.0, 4.0 * 1.0],  # ||C p - 1||_1 ||h||_1
    }
    for name, values in expected.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-14, atol=0, err_msg=name)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_scores_raise_naming_the_rows_when_logits_are_not_finite(bad: float) -> None:
    z = np.zeros((5, 3))
    z[1, 2] = bad
    z[3, 0] = bad
    with pytest.raises(InvalidInputError, match=r"row\(s\) 1, 3 \(2 of 5\)"):
        S.compute_scores(z, ["msp"])
    with pytest.raises(InvalidInputError, match=r"row\(s\) 1, 3"):
        S.gradtrust(z)


def test_gradnorm_raises_naming_the_rows_when_features_are_not_finite() -> None:
    feats = np.ones((3, 4))
    feats[2, 1] = np.nan
    with pytest.raises(InvalidInputError, match=r"features .*row\(s\) 2"):
        S.compute_scores(np.zeros((3, 2)), ["gradnorm"], features=feats)


@pytest.mark.parametrize(
    ("logits", "message"),
    [
        (np.zeros((4, 1)), "at least 2 classes"),
        (np.zeros(3), r"2-D .*logits\[None, :\]"),
        (np.zeros((2, 3, 4)), "2-D"),
        (np.array([["a", "b"]]), "real numbers"),
        (np.array([[1 + 2j, 0]]), "real numbers"),
    ],
)
def test_as_logits_raises_saying_what_is_wrong_when_shape_or_dtype_is_invalid(
    logits: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        S.as_logits(logits)


def test_as_logits_returns_a_float64_copy_when_given_float32() -> None:
    z = np.array([[1.0, 2.0]], dtype=np.float32)
    out = S.as_logits(z)
    assert out.dtype == np.float64 and not np.shares_memory(out, z)


def test_scores_return_empty_arrays_when_batch_is_empty() -> None:
    z = np.zeros((0, 10))
    got = S.compute_scores(z, S.SCORE_NAMES, features=np.zeros((0, 6)))
    assert list(got) == list(S.SCORE_NAMES)
    for fn in (
        S.gradtrust,
        S.gradtrust_released,
        S.contrast_trust,
        S.msp,
        S.entropy,
        S.margin,
        S.max_logit,
        S.energy,
    ):
        got[fn.__name__ + "_alone"] = fn(z)
    got["gradnorm_alone"] = S.gradnorm(z, np.zeros((0, 6)))
    for name, values in got.items():
        assert values.shape == (0,) and values.dtype == np.float64, name
    assert S.predicted_class(z).shape == (0,)


def test_compute_scores_raises_listing_valid_names_when_a_name_is_unknown() -> None:
    with pytest.raises(InvalidInputError, match="'odin'") as info:
        S.compute_scores(np.zeros((1, 3)), ["msp", "odin"])
    for name in S.SCORE_NAMES:
        assert name in str(info.value)


def test_compute_scores_raises_when_names_is_a_single_string() -> None:
    with pytest.raises(InvalidInputError, match=r"\['msp'\]"):
        S.compute_scores(np.zeros((1, 3)), "msp")


def test_compute_scores_raises_when_gradnorm_is_requested_without_features() -> None:
    assert "gradnorm" in S.NEEDS_FEATURES
    with pytest.raises(InvalidInputError, match="gradnorm .*features"):
        S.compute_scores(np.zeros((2, 3)), ["msp", "gradnorm"])


def test_gradnorm_raises_when_features_do_not_match_the_batch() -> None:
    with pytest.raises(InvalidInputError, match="3 samples but logits have 2"):
        S.gradnorm(np.zeros((2, 3)), np.ones((3, 4)))
    with pytest.raises(InvalidInputError, match="2-D"):
        S.gradnorm(np.zeros((2, 3)), np.ones((2, 4, 4)))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_gradnorm_raises_when_temperature_is_not_positive_and_finite(temperature: float) -> None:
    with pytest.raises(InvalidInputError, match="temperature"):
        S.gradnorm(np.zeros((1, 3)), np.ones((1, 2)), temperature=temperature)


@pytest.mark.parametrize("k", [0, -2])
def test_contrast_trust_raises_when_k_is_below_one(k: int) -> None:
    with pytest.raises(InvalidInputError, match="at least 1"):
        S.contrast_trust(np.zeros((1, 3)), k=k)
    with pytest.raises(InvalidInputError, match="at least 1"):
        S.compute_scores(np.zeros((1, 3)), ["msp"], contrast_k=k)


def test_contrast_trust_caps_k_at_c_minus_one_when_k_is_larger() -> None:
    z = np.array([[3.0, 1.0, -2.0], [0.0, 0.5, 0.2]])
    np.testing.assert_array_equal(S.contrast_trust(z, k=50), S.contrast_trust(z, k=2))
