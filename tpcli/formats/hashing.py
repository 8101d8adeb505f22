"""sha256 of whole files (`verify DIR`, manifests), read in large chunks."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HASH_CHUNK = 16 * 2**20
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> list[str]:
    """sha256 of several files, two at a time (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(2, max(1, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))
