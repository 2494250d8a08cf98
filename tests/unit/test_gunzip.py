"""Unpacking an upload stored gzip-compressed (Content-Encoding: gzip) under IMAGEN_MAX_BYTES:
the file as `gzip.decompress` reads it, or a clear InputError, in one pass whatever it holds."""

from __future__ import annotations

import gzip
import os

import pytest

from handlers.storage import MAX_MEMBERS, gunzip
from image.errors import ImageDecodeError, ImageTooLarge

FILE = os.urandom(200_000)  # incompressible: several of gunzip's slices


@pytest.mark.parametrize("stored", [
    gzip.compress(FILE),
    gzip.compress(FILE[:5]) + gzip.compress(FILE[5:]),  # members, as `cat a.gz b.gz`
    gzip.compress(FILE) + bytes(100),  # zero padding after the last member
])
def test_a_gzip_file_unpacks_as_gzip_reads_it(stored):
    assert gunzip(stored, len(FILE), "gs://b/o") == gzip.decompress(stored) == FILE


@pytest.mark.parametrize("stored, error, words", [
    (gzip.compress(bytes(10_000_000)), ImageTooLarge, "unpacks to more than"),  # ~10 kB stored
    (gzip.compress(FILE) + gzip.compress(b"x"), ImageTooLarge, "unpacks to more than"),
    (gzip.compress(FILE)[:-12], ImageDecodeError, "ends early"),
    (b"not gzip at all", ImageDecodeError, "but is not"),
    (gzip.compress(FILE) + b"\0\0junk", ImageDecodeError, "but is not"),
    # Each member cost a copy of what follows it: millions of empty ones, half an hour of CPU.
    (gzip.compress(b"") * (MAX_MEMBERS + 1), ImageDecodeError, "gzip members"),
])
def test_what_cannot_be_unpacked_within_the_limit_is_an_input_error(stored, error, words):
    with pytest.raises(error, match=words):
        gunzip(stored, len(FILE), "gs://b/o")

