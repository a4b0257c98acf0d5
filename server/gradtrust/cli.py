"""``gradtrust``: the server-side command line.

Each sub-command lives in its own layer and is imported only when it runs, so
``gradtrust serve`` imports neither torch nor onnx nor the evaluation tools (and works
with only the ``server`` extra installed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from gradtrust.errors import GradTrustError

#: sub-command -> (module with a ``register(subparsers)`` function, one-line help, extra).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": (
        "gradtrust.ops.serve_command",
        "run tritonserver on a model repository until Ctrl-C",
        "server",
    ),
    "prepare": (
        "gradtrust.tools.prepare.cli",
        "turn an ONNX or torch classifier into a model-repository entry",
        "eval",
    ),
    "evaluate": (
        "gradtrust.tools.evaluate.cli",
        "score every trust method on clean, corrupted and out-of-distribution data",
        "eval",
    ),
    "calibrate": (
        "gradtrust.tools.evaluate.cli",
        "fit TRUST_PROB and the low-trust threshold of an entry on labelled data",
        "eval",
    ),
    "introspect": (
        "gradtrust.tools.introspect.cli",
        "train the introspective (second-stage) network of an entry on labelled images",
        "eval",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s arguments; the other sub-commands are listed (for
    ``--help``) without importing their modules."""
    parser = argparse.ArgumentParser(prog="gradtrust", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    module_name = COMMANDS[command][0] if command in COMMANDS else None
    for name, (module, help_text, _) in COMMANDS.items():
        if module != module_name:
            sub.add_parser(name, help=help_text)
    if module_name is not None:
        _load(command or "").register(sub)
    return parser


def _load(command: str) -> ModuleType:
    module, _, extra = COMMANDS[command]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise SystemExit(
            f"gradtrust: error: `gradtrust {command}` needs {err.name!r}, which is not "
            f"installed: pip install 'gradtrust-serve[{extra}]'"
        ) from err


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args))
    except GradTrustError as err:
        print(f"gradtrust: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
