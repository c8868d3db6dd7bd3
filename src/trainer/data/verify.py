"""What every dataset source shares: the content check a file must pass, and the
failure a source reports (its reason goes into the one-line error listing all sources)."""

from __future__ import annotations

import hashlib


class SourceFailed(Exception):
    """One source cannot supply the files; the reason goes into the final error."""


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()
