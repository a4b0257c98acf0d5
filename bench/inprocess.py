"""In-process cost of trust: the forward pass alone, the closed-form scores, and autograd.

For each model (the demo CNN, C = 10; a ResNet-18-sized and a MobileNetV2-sized CNN, both
C = 1000 with a 7 x 7 activation at 224 x 224) and batch size:

- ``forward``: onnxruntime, logits only (what a plain classifier server runs);
- ``scores``: every closed-form score of :mod:`gradtrust.core.scores` (all eight, gradnorm
  included) on that forward pass's logits and features, timed on their own, so that the
  added cost is measured directly rather than as a difference of two noisy numbers;
- ``service``: everything :class:`gradtrust.serving.service.TrustService` adds to the forward pass
  (input checks, float64 copies, scores, output arrays) for N requests of one image each,
  as Triton's dynamic batcher hands them over, with the forward pass itself replaced by
  its cached result;
- ``heatmaps``: :func:`gradtrust.core.heatmaps.explain` for gradcam, contrast and VOICE
  (and VOICE at the activation's resolution) on that forward pass's outputs with the
  model's prepared head, and the service answering N one-image requests that each ask for
  one of them; "× plain" estimates the in-process throughput of such requests relative to
  the forward pass alone, forward / (forward + service);
- ``forward+scores``: both together, interleaved with ``forward`` (an end-to-end check; its
  ratio is only as precise as the machine is quiet);
- the autograd way, one sample at a time as the authors' released code does it: a
  backward pass through the last layer only (features given), and the released code's
  literal recipe, a forward and backward pass through the whole network per image.

``python -m bench.inprocess [--quick] [--gpu auto|off|only]``; see ``--help``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import _common as common
from bench.autograd import bench_autograd
from bench.models import IMAGENET_SIZED, ModelSpec, demo_cnn
from gradtrust.core import heatmaps, scores
from gradtrust.errors import ConfigError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import ACTIVATION, FEATURES, LOGITS
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import ModelSettings, RequestOptions

log = logging.getLogger("bench.inprocess")
Forward = Callable[[np.ndarray, list[str]], dict[str, np.ndarray]]
STAT = "min_s"
_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: The heatmap methods timed (counterfactual costs what gradcam costs).
HEAT_METHODS = ("gradcam", "contrast", "voice")


@dataclass(frozen=True)
class Budget:
    """Bounds of every timing loop (counts and seconds)."""

    batches: tuple[int, ...]
    forward_s: float
    micro_s: float
    autograd_s: float
    max_head_samples: int
    max_full_samples: int


FULL = Budget((1, 8, 64, 256), 6.0, 0.5, 8.0, 256, 32)
QUICK = Budget((1, 8), 0.3, 0.05, 0.3, 8, 2)


class _CachedClassifier:
    """Stands in for :class:`OnnxClassifier` inside the service: returns stored outputs, so the
    service's own work is timed without the forward pass."""

    def __init__(self, real: OnnxClassifier, outputs: dict[str, np.ndarray]) -> None:
        self._real = real
        self._outputs = outputs
        self.num_classes = real.num_classes
        self.input_shape = real.input_shape
        self.has_features = real.has_features
        self.has_activation = real.has_activation

    def head_weight(self) -> np.ndarray:
        return self._real.head_weight()

    def run(self, images: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        return {name: self._outputs[name] for name in outputs}


def ort_forward(spec: ModelSpec, device: str) -> tuple[Forward, str, OnnxClassifier]:
    classifier = OnnxClassifier(spec.onnx_path, device=device)
    return classifier.run, f"onnxruntime {classifier.providers[0]}", classifier


def torch_forward(spec: ModelSpec, device: str) -> tuple[Forward, str]:
    """The forward pass with torch on ``device``, outputs copied to host numpy arrays (as
    onnxruntime's CUDA provider returns them); the GPU path when onnxruntime has no CUDA."""
    model = spec.torch_model.to(device).eval()
    torch.backends.cudnn.benchmark = True

    def run(images: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            logits, features, activation = model.forward_all(torch.from_numpy(images).to(device))
            got = {"logits": logits, "features": features, "activation": activation}
            return {name: got[name].cpu().numpy() for name in outputs}

    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    return run, f"torch {torch.__version__} on {name}"


def bench_batch(
    spec: ModelSpec,
    forward: Forward,
    service_for: Callable[[dict[str, np.ndarray]], TrustService] | None,
    batch: int,
    budget: Budget,
    rng: np.random.Generator,
) -> dict[str, Any]:
    images = rng.random((batch, *spec.input_shape), dtype=np.float32)
    net = forward(images, [LOGITS, FEATURES, ACTIVATION])  # also the warm-up
    logits, features = net[LOGITS], net[FEATURES]
    names = list(scores.SCORE_NAMES)

    def forward_scores() -> None:
        out = forward(images, [LOGITS, FEATURES])
        scores.compute_scores(out[LOGITS], names, features=out[FEATURES])

    pair = common.measure_interleaved(
        {"forward": lambda: forward(images, [LOGITS]), "forward_scores": forward_scores},
        min_rounds=3,
        max_rounds=50,
        budget_s=budget.forward_s,
    )
    micro = {"min_reps": 5, "max_reps": 5000, "budget_s": budget.micro_s}
    row: dict[str, Any] = {"batch": batch}
    timings = {
        "forward": common.summary(pair["forward"]),
        "forward_scores": common.summary(pair["forward_scores"]),
        "scores": common.summary(
            common.measure(lambda: scores.compute_scores(logits, names, features=features), **micro)
        ),
        "gradtrust": common.summary(common.measure(lambda: scores.gradtrust(logits), **micro)),
    }
    if service_for is not None:
        service = service_for(net)
        one_each = [
            ScoringRequest(images[i : i + 1], _options(service, True)) for i in range(batch)
        ]
        plain_each = [
            ScoringRequest(images[i : i + 1], _options(service, False)) for i in range(batch)
        ]
        timings["service_gradtrust"] = common.summary(
            common.measure(lambda: service.run(plain_each), **micro)
        )
        timings["service_all_scores"] = common.summary(
            common.measure(lambda: service.run(one_each), **micro)
        )
        if service.head is not None:
            timings.update(_heatmap_timings(service, images, net, micro))
    row["timings"] = timings
    # Ratios use each timing's minimum: on a shared machine the other processes only ever
    # add time, so the minimum is the most repeatable estimate of each cost (medians are
    # kept in "timings").
    fwd = timings["forward"][STAT]
    row["forward_per_sample_s"] = fwd / batch
    for key in timings:
        if key.startswith(("scores", "gradtrust", "service_", "heat_")):
            row[f"{key}_per_sample_s"] = timings[key][STAT] / batch
            row[f"{key}_pct_of_forward"] = 100.0 * timings[key][STAT] / fwd
        if key.startswith("service_"):
            row[f"{key}_x_plain"] = fwd / (fwd + timings[key][STAT])
    row["forward_scores_pct_over_forward"] = 100.0 * (timings["forward_scores"][STAT] / fwd - 1.0)
    return row


def _options(service: TrustService, all_scores: bool, method: str | None = None) -> RequestOptions:
    return RequestOptions(
        scores=service.settings.scores if all_scores else None,
        contrast_k=service.settings.contrast_k,
        heatmap_method=method,
        contrast_class=None,
    )


def _heatmap_timings(
    service: TrustService,
    images: np.ndarray,
    net: dict[str, np.ndarray],
    micro: dict[str, Any],
) -> dict[str, dict[str, float]]:
    """explain() on the whole batch per method, and the service answering one-image
    requests that each ask for a HEATMAP (outputs: the defaults plus HEATMAP)."""
    head = service.head
    size = (int(images.shape[2]), int(images.shape[3]))
    activation, logits = net[ACTIVATION], net[LOGITS]
    found: dict[str, dict[str, float]] = {}
    for method in HEAT_METHODS:
        found[f"heat_{method}"] = common.summary(
            common.measure(
                lambda m=method: heatmaps.explain(m, activation, head, logits, size), **micro
            )
        )
        requests = [
            ScoringRequest(images[i : i + 1], _options(service, False, method))
            for i in range(len(images))
        ]
        found[f"service_{method}"] = common.summary(
            common.measure(lambda r=requests: service.run(r), **micro)
        )
    found["heat_voice_activation"] = common.summary(
        common.measure(lambda: heatmaps.explain("voice", activation, head, logits, None), **micro)
    )
    return found


def bench_model(
    spec: ModelSpec, device: str, budget: Budget, rng: np.random.Generator
) -> dict[str, Any]:
    service_for: Callable[[dict[str, np.ndarray]], TrustService] | None = None
    classifier = None
    if device == "cpu" or _ort_has_cuda():
        try:
            forward, backend, classifier = ort_forward(spec, "gpu" if device == "cuda" else "cpu")
        except ConfigError as err:
            if device == "cpu":
                raise
            log.info("onnxruntime cannot use the GPU (%s): torch runs the forward pass", err)
        if classifier is not None and classifier.providers[0] != _PROVIDER[device]:
            log.info(
                "onnxruntime fell back to %s: torch runs the forward pass", classifier.providers
            )
            classifier = None
    if classifier is not None:
        settings = ModelSettings(
            labels=tuple(f"class_{i}" for i in range(spec.num_classes)),
            pixel_min=0.0,
            pixel_max=1.0,
        )

        def service_for(net: dict[str, np.ndarray]) -> TrustService:
            return TrustService(_CachedClassifier(classifier, net), settings)  # type: ignore[arg-type]

    else:
        forward, backend = torch_forward(spec, device)
    log.info("%s on %s (%s)", spec.name, device, backend)
    rows = []
    for batch in budget.batches:
        rows.append(bench_batch(spec, forward, service_for, batch, budget, rng))
        log.info(
            "  batch %d: forward %.3g ms/sample", batch, 1e3 * rows[-1]["forward_per_sample_s"]
        )
    autograd = bench_autograd(
        spec,
        forward,
        device,
        rng,
        budget.max_head_samples,
        budget.max_full_samples,
        budget.autograd_s,
    )
    for row in rows:
        row["autograd_head_x_slower_than_scores"] = (
            autograd["head_per_sample_s"] / row["scores_per_sample_s"]
        )
        row["autograd_full_x_slower_than_scores"] = (
            autograd["full_per_sample_s"] / row["scores_per_sample_s"]
        )
        # Like for like: the autograd way computes GradTrust only, as the released code does.
        row["autograd_head_x_slower_than_gradtrust"] = (
            autograd["head_per_sample_s"] / row["gradtrust_per_sample_s"]
        )
        row["autograd_full_x_slower_than_forward_scores"] = autograd["full_per_sample_s"] / (
            row["forward_per_sample_s"] + row["scores_per_sample_s"]
        )
    return {
        "model": spec.name,
        "num_classes": spec.num_classes,
        "input_shape": list(spec.input_shape),
        "onnx": str(spec.onnx_path),
        "forward_backend": backend,
        "autograd": autograd,
        "batches": rows,
    }


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def gpu_available() -> tuple[bool, str]:
    """onnxruntime-gpu lists its CUDA provider even without a GPU, so torch decides."""
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name(0)}"
    return False, (
        "no GPU: torch.cuda.is_available() is False and onnxruntime lists "
        f"{__import__('onnxruntime').get_available_providers()}"
    )


def targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's in-process targets, on the C = 1000 model, with the numbers they rest on."""
    found: list[dict[str, Any]] = []
    for big in (m for m in run["models"] if m["num_classes"] == 1000):
        for row in big["batches"]:
            for key, limit in (
                ("service_gradtrust", 0.97),
                ("service_gradcam", 0.8),
                ("service_contrast", 0.8),
                ("service_voice", 0.5),
            ):
                ratio = row.get(f"{key}_x_plain")
                if ratio is None:
                    continue
                found.append(
                    {
                        "target": (
                            f"{big['model']} batch {row['batch']}: in-process throughput of "
                            f"{key.removeprefix('service_')} requests >= {limit:g}x plain"
                        ),
                        "measured": {"x_plain": round(ratio, 3)},
                        "met": ratio >= limit,
                    }
                )
    model = next((m for m in run["models"] if m["num_classes"] == 1000), None)
    if model is None:
        return found
    rows = {r["batch"]: r for r in model["batches"]}
    for batch, limit in ((1, 3.0), (64, 1.0)):
        row = rows.get(batch)
        text = f"closed-form scores add <= {limit:g}% to the forward time at batch {batch}"
        if row is None:
            found.append({"target": text, "met": None, "note": f"batch {batch} not measured"})
            continue
        measured = {
            "scores_pct": row["scores_pct_of_forward"],
            "service_all_scores_pct": row.get("service_all_scores_pct_of_forward"),
            "end_to_end_pct_noisy": row["forward_scores_pct_over_forward"],
        }
        found.append({"target": text, "measured": measured, "met": measured["scores_pct"] <= limit})
    head = min(r["autograd_head_x_slower_than_scores"] for r in model["batches"])
    full = min(r["autograd_full_x_slower_than_scores"] for r in model["batches"])
    like = min(r["autograd_head_x_slower_than_gradtrust"] for r in model["batches"])
    found.append(
        {
            "target": (
                "closed-form scores >= 50x faster per sample than the autograd way (C = 1000), "
                "all eight scores against GradTrust by autograd"
            ),
            "measured": {"min_x_vs_head_backward": head, "min_x_vs_full_backward": full},
            "met": head >= 50.0 and full >= 50.0,
        }
    )
    found.append(
        {
            "target": (
                "closed-form GradTrust >= 50x faster per sample than GradTrust by autograd "
                "through the last layer (C = 1000), like for like"
            ),
            "measured": {"min_x_vs_head_backward": like},
            "met": like >= 50.0,
        }
    )
    return found


COLUMNS = [
    ("batch", "batch"),
    ("forward_ms", "forward ms/sample"),
    ("scores_us", "all scores µs/sample"),
    ("scores_pct", "scores % of fwd"),
    ("gradtrust_pct", "GradTrust only % of fwd"),
    ("service_pct", "service (N×1 req, all scores) % of fwd"),
    ("e2e_pct", "fwd+scores vs fwd, end to end % (noisy)"),
    ("head_x", "× faster than autograd (head)"),
    ("like_x", "GradTrust only: × faster than autograd (head)"),
    ("full_x", "× faster than autograd (whole net)"),
]


HEAT_COLUMNS = [
    ("batch", "batch"),
    ("forward_ms", "forward ms/sample"),
    ("gradcam_us", "gradcam µs/sample"),
    ("contrast_us", "contrast µs/sample"),
    ("voice_us", "VOICE µs/sample"),
    ("voice_act_us", "VOICE at activation res. µs/sample"),
    ("x_gradtrust", "GRADTRUST req. × plain"),
    ("x_gradcam", "gradcam req. × plain"),
    ("x_contrast", "contrast req. × plain"),
    ("x_voice", "VOICE req. × plain"),
]


def _heat_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    nan = float("nan")
    return [
        {
            "batch": r["batch"],
            "forward_ms": 1e3 * r["forward_per_sample_s"],
            "gradcam_us": 1e6 * r.get("heat_gradcam_per_sample_s", nan),
            "contrast_us": 1e6 * r.get("heat_contrast_per_sample_s", nan),
            "voice_us": 1e6 * r.get("heat_voice_per_sample_s", nan),
            "voice_act_us": 1e6 * r.get("heat_voice_activation_per_sample_s", nan),
            "x_gradtrust": r.get("service_gradtrust_x_plain", nan),
            "x_gradcam": r.get("service_gradcam_x_plain", nan),
            "x_contrast": r.get("service_contrast_x_plain", nan),
            "x_voice": r.get("service_voice_x_plain", nan),
        }
        for r in model["batches"]
        if "heat_gradcam_per_sample_s" in r
    ]


def markdown(run: dict[str, Any]) -> str:
    parts = [
        f"### In-process, {run['device']}\n",
        "Each time is the minimum over repetitions (medians are in the JSON); `forward` is the "
        "forward pass returning logits only; `all scores` are the eight closed-form scores; "
        "`service` is everything TrustService adds for N one-image requests; the autograd "
        "columns compare their per-sample time with the closed-form scores'.\n",
    ]
    for model in run["models"]:
        ag = model["autograd"]
        parts.append(
            f"**{model['model']}** (C = {model['num_classes']}, input {model['input_shape']}, "
            f"forward: {model['forward_backend']}). Autograd per sample: last layer only "
            f"{1e6 * ag['head_per_sample_s']:.3g} µs ({ag['head_samples']} samples), whole "
            f"network {1e3 * ag['full_per_sample_s']:.3g} ms ({ag['full_samples']} samples); "
            "max relative difference from the closed form "
            f"{ag['head_max_rel_diff_vs_closed_form']:.1e} / "
            f"{ag['full_max_rel_diff_vs_closed_form']:.1e}.\n"
        )
        rows = [
            {
                "batch": r["batch"],
                "forward_ms": 1e3 * r["forward_per_sample_s"],
                "scores_us": 1e6 * r["scores_per_sample_s"],
                "scores_pct": r["scores_pct_of_forward"],
                "gradtrust_pct": r["gradtrust_pct_of_forward"],
                "service_pct": r.get("service_all_scores_pct_of_forward", float("nan")),
                "e2e_pct": r["forward_scores_pct_over_forward"],
                "head_x": r["autograd_head_x_slower_than_scores"],
                "like_x": r["autograd_head_x_slower_than_gradtrust"],
                "full_x": r["autograd_full_x_slower_than_scores"],
            }
            for r in model["batches"]
        ]
        parts.append(common.markdown_table(rows, COLUMNS) + "\n")
        heat = _heat_rows(model)
        if heat:
            parts.append(
                f"Heatmaps, {model['model']}: `explain()` per sample on the batch's forward "
                "outputs (maps at the input's size unless noted), and N one-image requests "
                "through TrustService; `× plain` = forward / (forward + service time), the "
                "in-process throughput relative to the forward pass alone.\n"
            )
            parts.append(common.markdown_table(heat, HEAT_COLUMNS) + "\n")
    if run.get("targets"):
        parts.append("Targets (C = 1000 model):\n")
        for t in run["targets"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            parts.append(f"- {t['target']}: **{verdict}** {t.get('measured', t.get('note', ''))}")
    return "\n".join(parts)


def run_device(specs: list[ModelSpec], device: str, budget: Budget) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = common.load_average()
    models = [bench_model(spec, device, budget, rng) for spec in specs]
    run: dict[str, Any] = {
        "benchmark": "inprocess",
        "device": device,
        "started": started,
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "budget": budget.__dict__,
        "gradtrust_source": str(Path(scores.__file__).parent),
        "models": models,
    }
    run["targets"] = targets(run)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds)")
    parser.add_argument("--gpu", choices=("auto", "off", "only"), default="auto")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--models", default="demo,resnet18,mobilenet")
    parser.add_argument("--batches", default="", help="comma list; default 1,8,64,256")
    parser.add_argument("--image-size", type=int, default=0, help="ResNet input (224; quick 32)")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    budget = QUICK if args.quick else FULL
    if args.batches:
        budget = Budget(tuple(common.parse_ints(args.batches)), *list(budget.__dict__.values())[1:])
    size = args.image_size or (32 if args.quick else 224)
    wanted = common.parse_names(args.models)
    specs = [demo_cnn() if name == "demo" else IMAGENET_SIZED[name](size) for name in wanted]
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    info = common.machine()
    ok, why = gpu_available()
    if args.gpu != "only":
        run = run_device(specs, "cpu", budget)
        run.update(quick=args.quick, machine=info)
        run["gpu"] = {"available": ok, "detail": why, "run": ok and args.gpu == "auto"}
        path = common.write_results(args.out, f"inprocess{suffix}", run, markdown(run))
        log.info("wrote %s", path)
    if args.gpu == "off":
        return 0
    if not ok:
        if args.gpu == "only":
            log.error("--gpu only, but %s", why)
            return 2
        log.info("GPU variant skipped: %s", why)
        return 0
    run = run_device(specs, "cuda", budget)
    run.update(quick=args.quick, machine=common.machine(), gpu_backend=why)
    path = common.write_results(args.out, f"inprocess_gpu{suffix}", run, markdown(run))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
