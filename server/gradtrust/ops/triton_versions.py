"""Which Triton releases carry which known vulnerabilities, from NVIDIA's own bulletins.

Triton has two version numbers: the server's (``2.51.0``, what ``GET /v2`` reports) and
the monthly container release (``24.10``, the tag of ``nvcr.io/nvidia/tritonserver``).
The table :data:`RELEASES` maps one to the other (from ``build.py``'s version map at each
release tag of triton-inference-server/server); :data:`ADVISORIES` lists what matters to
a server that takes requests from the network, each with the first release that fixes it.
docs/SECURITY.md cites the same facts; ``tests/unit/test_triton_versions.py`` checks that
every image the deployment files pin is at least :data:`MINIMUM_RELEASE`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradtrust.errors import ServerError

#: Container release -> Triton server version, for the releases this project names.
RELEASES: dict[str, str] = {
    "24.10": "2.51.0",  # the server bundled in the nvidia-pytriton 0.7 wheel
    "24.12": "2.53.0",
    "25.05": "2.58.0",
    "25.06": "2.59.0",
    "25.07": "2.59.1",
    "25.08": "2.60.0",
    "26.03": "2.67.0",
    "26.04": "2.68.0",
    "26.05": "2.69.0",
    "26.06": "2.70.0",
    "26.07": "2.71.0",
    "26.09": "2.73.0",
}


def _release_key(release: str) -> tuple[int, int]:
    match = re.fullmatch(r"r?(\d{2})\.(\d{2})", release.strip())
    if match is None:
        raise ValueError(f"not a Triton container release (YY.MM): {release!r}")
    return int(match[1]), int(match[2])


def _version_key(version: str) -> tuple[int, ...]:
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:dev)?", version.strip())
    if match is None:
        raise ValueError(f"not a Triton server version (X.Y.Z): {version!r}")
    return tuple(int(g) for g in match.groups())


@dataclass(frozen=True)
class Advisory:
    """A known flaw reachable by an unauthenticated client, and the release fixing it."""

    ids: str
    what: str
    fixed_in: str  # container release
    source: str
    critical: bool = True


ADVISORIES: tuple[Advisory, ...] = (
    Advisory(
        "CVE-2025-23310, CVE-2025-23311",
        "stack overflow while parsing HTTP requests (remote, unauthenticated; CVSS 9.8 each)",
        "25.07",
        "NVIDIA security bulletin 5687, August 2025",
    ),
    Advisory(
        "CVE-2025-23319, CVE-2025-23320, CVE-2025-23334",
        "out-of-bounds write (CVSS 8.1) and read (5.9) and an exceeded shared-memory limit "
        "(7.5) in the Python backend, chained through the shared-memory API into remote "
        "code execution",
        "25.07",
        "NVIDIA security bulletin 5687, August 2025",
    ),
    Advisory(
        "server PR #8172",
        "an HTTP infer body whose 'data' is nested thousands of levels deep overflows the "
        "stack of the recursive data reader (an 80 kB body segfaults 2.51; fixed with a "
        "depth limit of 100)",
        "25.05",
        "triton-inference-server/server commit f46557b, first in v2.58.0",
    ),
    Advisory(
        "common PR #156",
        "JSON nested hundreds of thousands of levels deep overflows the stack of the JSON "
        "parser (fixed by RapidJSON's iterative parsing)",
        "26.05",
        "triton-inference-server/common commit 3898bba (April 2026), in branch r26.05 on",
    ),
    Advisory(
        "CVE-2026-24207",
        "authentication bypass (CVSS 9.8)",
        "26.03",
        "NVIDIA security bulletin 5828, May 2026",
    ),
    Advisory(
        "CVE-2026-47627 (and CVE-2026-47606, 47628-47630)",
        "path traversal (CVSS 9.8), absolute path traversal, unbounded allocation, input "
        "validation",
        "26.06",
        "NVIDIA security bulletin 5865, August 2026",
    ),
    Advisory(
        "CVE-2026-16497",
        "excessive iteration: denial of service (CVSS 7.5)",
        "26.07",
        "NVIDIA security bulletin 5875, September 2026",
        critical=False,
    ),
)

#: The oldest release without any advisory above: what deployments must run at least.
MINIMUM_RELEASE = max((a.fixed_in for a in ADVISORIES), key=lambda r: _release_key(r))
#: The release the deployment files pin (the newest published when this was written).
PINNED_RELEASE = "26.09"


def release_of(version: str) -> str | None:
    """The container release whose server is ``version`` (None: a version not in the table,
    placed by :func:`advisories_for` by comparing server versions instead)."""
    for release, known in RELEASES.items():
        if known == version.strip():
            return release
    return None


def _fixed(version: str, release: str) -> bool:
    """Whether server ``version`` already has the fix first released in ``release``."""
    return _version_key(version) >= _version_key(RELEASES[release])


def advisories_for(version: str) -> list[Advisory]:
    """The advisories that apply to a Triton server reporting ``version`` (``GET /v2``)."""
    return [a for a in ADVISORIES if not _fixed(version, a.fixed_in)]


def release_is_fixed(release: str) -> bool:
    """Whether container release ``release`` (e.g. ``26.09``) has every fix above."""
    return _release_key(release) >= _release_key(MINIMUM_RELEASE)


def refuse_vulnerable(version: str, override_flag: str) -> None:
    """Raise :class:`ServerError` naming what a server of ``version`` is exposed to, when
    any critical advisory applies; the message says how to upgrade or override."""
    critical = [a for a in advisories_for(version) if a.critical]
    if not critical:
        return
    listed = "\n".join(f"  - {a.ids}: {a.what} (fixed in {a.fixed_in})" for a in critical)
    raise ServerError(
        f"refusing --production: this tritonserver is {version}, which has known critical "
        f"vulnerabilities reachable by any client:\n{listed}\n"
        f"Run NVIDIA's tritonserver:{PINNED_RELEASE}-py3 image (deploy/Dockerfile) or a "
        f"release from {MINIMUM_RELEASE} on. To run this one anyway (a private network you "
        f"trust, with a reverse proxy in front; docs/SECURITY.md), pass {override_flag}."
    )
