"""dse's one content hash: sha256, of bytes, of text as UTF-8 and of a file's bytes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dse.digests import file_sha256, sha256_hex, sha256_of_parts

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
"""FIPS 180-2, appendix B.1: the sha256 of "abc"."""


def test_the_digest_of_bytes_text_and_a_file_is_the_standards_sha256(tmp_path: Path) -> None:
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")
    assert sha256_hex(b"abc") == sha256_hex("abc") == ABC_SHA256
    assert file_sha256(path) == file_sha256(str(path)) == ABC_SHA256


def test_text_is_hashed_as_its_utf8_bytes() -> None:
    assert sha256_hex("posit(8,1) µ") == sha256_hex("posit(8,1) µ".encode())
    assert sha256_hex("posit(8,1) µ") != sha256_hex("posit(8,1) µ".encode("latin-1"))


def test_a_file_that_cannot_be_read_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        file_sha256(tmp_path / "missing.yaml")


@given(st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=20)), max_size=8))
def test_parts_hash_as_their_concatenation(parts: list[bytes | str]) -> None:
    joined = b"".join(part.encode("utf-8") if isinstance(part, str) else part for part in parts)
    assert sha256_of_parts(parts) == sha256_of_parts(iter(parts)) == sha256_hex(joined)
    assert sha256_of_parts(parts) == hashlib.sha256(joined).hexdigest()


def test_the_code_fingerprint_and_report_signature_keep_their_values() -> None:
    """Built through sha256_of_parts, the two hashes of many pieces are what they were when each fed
    hashlib itself: a stored sweep's receipt still matches (no full re-plan), its reports stay current."""
    from dse.report import files
    from dse.sweep import receipt

    digest = hashlib.sha256()
    for path in receipt._code_files():
        digest.update(f"{path}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    for name in receipt.LIBRARIES:
        digest.update(f"{name}=={importlib.metadata.version(name)}\n".encode())
    assert receipt.code_fingerprint() == digest.hexdigest()

    frame = pd.DataFrame({"trial_id": ["a", "b"], "test_accuracy": [0.5, 0.25]})
    frame.attrs["sweep"] = {"name": "s", "memory_objective": False}
    digest = hashlib.sha256(frame.to_csv(index=False).encode())
    libraries = {name: importlib.metadata.version(name) for name in files._REPORT_LIBRARIES}
    digest.update(json.dumps([frame.attrs, True, False, libraries], sort_keys=True, default=str).encode())
    for source in sorted(Path(files.__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    assert files._reports_signature(frame, True, False) == digest.hexdigest()
