"""dse's one content hash: sha256, of bytes, of text as UTF-8 and of a file's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dse.digests import file_sha256, sha256_hex

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
