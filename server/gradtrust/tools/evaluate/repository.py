"""Read and write the parts of a Triton model-repository entry that calibration touches.

``config.pbtxt`` is protobuf text that people edit and comment by hand, so it is edited
as text: only the value of one parameter changes, every other byte stays as it was.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gradtrust.core.calibration import FILENAME, TrustCalibration
from gradtrust.errors import ConfigError

CONFIG = "config.pbtxt"
THRESHOLD_KEY = "low_trust_threshold"


def _value_pattern(key: str) -> re.Pattern[str]:
    # key: "K" [,] value: { string_value: "V" }  -- in one-line or multi-line layout.
    return re.compile(
        r'(\bkey\s*:\s*"' + re.escape(key) + r'"\s*,?\s*value\s*:?\s*\{\s*string_value\s*:\s*")'
        r'((?:[^"\\]|\\.)*)(")'
    )


def _scan(text: str, start: int) -> tuple[int, int]:
    """From the ``[`` at ``start``: (index of its matching ``]``, index just after the last
    character inside that is neither whitespace nor part of a comment)."""
    depth, i, quote, last = 0, start, "", start + 1
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
                last = i + 1
        elif ch == "#":
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
            continue
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return i, last
        if not quote and not ch.isspace() and i > start:
            last = i + 1
        i += 1
    raise ConfigError("config.pbtxt has an unclosed 'parameters [' list: fix the file by hand")


def set_config_parameter(text: str, key: str, value: str) -> str:
    """Return ``text`` with parameter ``key`` set to the string ``value``.

    An existing entry keeps its layout and only its value changes; otherwise an entry is
    appended to the ``parameters [ ... ]`` list, or a ``parameters`` block is added at the end.
    """
    if '"' in value or "\\" in value or "\n" in value:
        raise ConfigError(f"parameter value {value!r} must not contain quotes or backslashes")
    pattern = _value_pattern(key)
    matches = list(pattern.finditer(text))
    if len(matches) > 1:
        raise ConfigError(f"config.pbtxt sets parameter {key!r} {len(matches)} times; keep one")
    if matches:
        m = matches[0]
        return text[: m.start(2)] + value + text[m.end(2) :]
    entry = f'{{ key: "{key}", value: {{ string_value: "{value}" }} }}'
    block = re.search(r"\bparameters\s*:?\s*\[", text)
    if block:
        close, last = _scan(text, block.end() - 1)
        has_entries = last > block.end()
        # The comma goes right after the last entry (before any trailing comment).
        head = text[:last] + ("," if has_entries else "") + text[last:close].rstrip()
        return f"{head}\n  {entry}\n" + text[close:]
    tail = "" if text.endswith("\n") or not text else "\n"
    return f"{text}{tail}\nparameters [\n  {entry}\n]\n"


_ANY_PARAMETER = re.compile(
    r'\bkey\s*:\s*"((?:[^"\\]|\\.)*)"\s*,?\s*value\s*:?\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"'
)


def read_config_parameters(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``parameters`` of an entry's config.pbtxt as ``{key: string value}`` (read as
    text, like :func:`set_config_parameter` writes it; comments are ignored)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file} not found: pass a model entry made by `gradtrust prepare`")
    lines = file.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line.split("#", 1)[0] for line in lines)
    return {m.group(1): m.group(2) for m in _ANY_PARAMETER.finditer(text)}


def write_calibration(entry: str | os.PathLike[str], calibration: TrustCalibration) -> Path:
    """Write ``trust_calibration.json`` into the model entry; returns its path.

    config.pbtxt is left alone: its ``low_trust_threshold`` is the GRADTRUST threshold of
    an uncalibrated entry, while a calibrated entry counts low trust on TRUST_PROB against
    the threshold inside the calibration file.
    """
    folder = Path(entry)
    if not (folder / CONFIG).is_file():
        raise ConfigError(
            f"{folder / CONFIG} not found: pass the model's entry folder, e.g. "
            "model_repository/gradtrust_mnist"
        )
    target = folder / FILENAME
    calibration.to_json(target)
    return target
