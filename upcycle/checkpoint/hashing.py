"""sha256 of source files for provenance: computed by reading, or taken from the Hub cache's content address.

The Hub cache stores every large (LFS) file as `blobs/<sha256 of its bytes>` and the snapshot's file as a
symlink to it, so for a source in the Hub cache the hash is known without reading a byte. Everywhere else the
file is read once, read-only: sha256 runs at about 1.7 GB/s per core (SHA-NI), so a linked shard costs that read,
and several shards are hashed in parallel, one per core.
"""

import hashlib
import mmap
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UpcycleError

HASH_CHUNK_BYTES = 16 * 1024 * 1024
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
COMPUTED, HUB_CACHE, NOT_COMPUTED = "computed", "hub-cache-blob-name", "not computed (--no-source-sha256)"


def sha256_of_file(path: Path) -> str:
    """Hashed straight from the page cache through a memory map, one chunk mapped at a time (no copy into a
    buffer: about 20% less CPU than read())."""
    digest = hashlib.sha256()
    with open(path, "rb") as reader:
        size = os.fstat(reader.fileno()).st_size
        for offset in range(0, size, HASH_CHUNK_BYTES):  # a multiple of the page size, as mmap requires
            length = min(HASH_CHUNK_BYTES, size - offset)
            with mmap.mmap(reader.fileno(), length, offset=offset, access=mmap.ACCESS_READ) as mapped, \
                    memoryview(mapped) as chunk:
                digest.update(chunk)
    return digest.hexdigest()


def hub_cache_sha256(path: Path) -> str | None:
    """The sha256 a Hub cache blob is named by, when `path` is a symlink into a `blobs/` folder; else None.

    Small git-tracked files have 40-hex (git) blob names and are not matched.
    """
    if not Path(path).is_symlink():
        return None
    real = Path(path).resolve()
    if real.parent.name == "blobs" and SHA256_HEX.fullmatch(real.name):
        return real.name
    return None


def source_file_sha256(path: Path) -> tuple[str, str]:
    """(sha256, how it was obtained) for a file that is linked, not read, into the output."""
    known = hub_cache_sha256(path)
    if known is not None:
        return known, HUB_CACHE
    return sha256_of_file(path), COMPUTED


def sources_sha256(paths: list[Path]) -> list[tuple[str, str]]:
    """`source_file_sha256` of several files, read in parallel (hashlib releases the GIL): one file per core."""
    if len(paths) <= 1:
        return [source_file_sha256(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(source_file_sha256, paths))


def check_against_hub_cache(path: Path, computed: str) -> None:
    """A file read anyway must match its Hub cache name: otherwise the cached blob is corrupt."""
    known = hub_cache_sha256(path)
    if known is not None and known != computed:
        raise UpcycleError(
            f"{Path(path).name} in the Hub cache is corrupt (its sha256 is {computed[:12]}..., the Hub's is "
            f"{known[:12]}...); delete it from the cache and download again"
        )
