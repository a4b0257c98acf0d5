"""``make demo``: start the server, classify real test digits through the client, stop.

The digits are the committed PNGs in ``examples/digits`` (real MNIST test digits the
model never saw in training; their true label is in the file name).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gradtrust.ops.tritonserver import Ports, free_port, start_server

ROOT = Path(__file__).resolve().parents[4]  # server/gradtrust/tools/demo/run.py -> repo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="gradtrust_mnist")
    parser.add_argument("--digits", type=Path, default=ROOT / "examples" / "digits")
    args = parser.parse_args(argv)

    from gradtrust_client import TrustClient

    paths = sorted(args.digits.glob("*.png"))
    if not paths:
        print(f"no PNG digits in {args.digits}", file=sys.stderr)
        return 2
    ports = Ports(http=free_port(), grpc=free_port(), metrics=free_port())
    log = Path(tempfile.gettempdir()) / "gradtrust-demo-tritonserver.log"
    print(f"starting tritonserver (log: {log}) ...", flush=True)
    server = start_server(args.model_repository, ports=ports, log_path=log, exit_timeout_s=5)
    try:
        with TrustClient(server.grpc_url, protocol="grpc", model=args.model) as client:
            predictions = client.predict(paths, scores=["gradtrust_released"])
        print(
            f"\n{'file':<28} {'true':>4} {'label':>5} {'confidence':>10} {'gradtrust':>9} "
            f"{'released':>9}"
        )
        for path, pred in zip(paths, predictions, strict=True):
            truth = path.stem.rsplit("_", 1)[-1]
            released = pred.scores["gradtrust_released"] if pred.scores else float("nan")
            print(
                f"{path.name:<28} {truth:>4} {pred.label:>5} {pred.confidence:>10.4f} "
                f"{pred.gradtrust:>9.3f} {released:>9.3f}"
            )
        print(
            f"\nserved by tritonserver at {server.grpc_url} (gRPC); metrics at {server.metrics_url}"
        )
    finally:
        server.stop()
        print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
