"""Regenerate features/data/census-income.sample.gz from the full UCI test file.

    python -m features.make_sample /path/to/census-income.test.gz

Draws a seeded random subset of the lines (kept byte for byte and in file
order, so the sample is in the original UCI format and exercises the real
loader), and writes it with gzip's timestamp and file name zeroed so the same
input always gives the same bytes.  The input's sha256 is checked first: a
different source file would silently give a different sample.
"""
from __future__ import annotations

import argparse
import gzip
import io
import sys

import numpy as np

from features.census import CENSUS_SAMPLE_PATH, KNOWN_ROWS, KNOWN_SHA256, TEST_FILE, sha256_file

SAMPLE_ROWS = 10_000
SEED = 20180819  # KDD 2018, where MMoE was published


def make_sample(source: str, dest: str = CENSUS_SAMPLE_PATH, rows: int = SAMPLE_ROWS, seed: int = SEED,
                check_source: bool = True) -> int:
    """Write a `rows`-line sample of `source` to `dest`; returns the number of bytes written."""
    if check_source:
        actual = sha256_file(source)
        if actual != KNOWN_SHA256[TEST_FILE]:
            raise ValueError(f"{source}: sha256 {actual} is not that of the UCI {TEST_FILE} "
                             f"({KNOWN_SHA256[TEST_FILE]}); pass check_source=False to sample it anyway")
    with gzip.open(source, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)
    if check_source and len(lines) != KNOWN_ROWS[TEST_FILE]:
        raise ValueError(f"{source}: {len(lines)} lines, expected {KNOWN_ROWS[TEST_FILE]}")
    if rows > len(lines):
        raise ValueError(f"cannot sample {rows} rows from {len(lines)}")
    picked = np.sort(np.random.default_rng(seed).choice(len(lines), size=rows, replace=False))
    buffer = io.BytesIO()
    # filename="" and mtime=0: no name or timestamp in the header -> reproducible bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(b"".join(lines[i] for i in picked))
    data = buffer.getvalue()
    with open(dest, "wb") as out:
        out.write(data)
    return len(data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the full census-income.test.gz")
    parser.add_argument("--dest", default=CENSUS_SAMPLE_PATH)
    parser.add_argument("--rows", type=int, default=SAMPLE_ROWS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    size = make_sample(args.source, args.dest, args.rows, args.seed)
    print(f"wrote {args.rows} rows, {size} bytes to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
