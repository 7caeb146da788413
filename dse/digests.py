"""sha256 digests, the one way dse identifies content: a sweep file's text, a user's source file, the
code fingerprint, the report files as written, a workload file.

Plain standard library, so any layer may import it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def sha256_hex(data: bytes | str) -> str:
    """The sha256 of bytes, or of text as UTF-8, as 64 hex digits."""
    return sha256_of_parts((data,))


def sha256_of_parts(parts: Iterable[bytes | str]) -> str:
    """The sha256 of `parts` one after another (bytes, or text as UTF-8), as 64 hex digits: the
    digest of their concatenation, fed as they come (a hash built from many pieces)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, as 64 hex digits (OSError where it cannot be read)."""
    return sha256_hex(Path(path).read_bytes())
