"""Where shard sets live: local paths (or a shared volume), or URLs (https://, s3://, gs://, ...).

URLs go through fsspec when the protocol's implementation is installed (http/https via aiohttp here; s3fs,
gcsfs where installed), and otherwise through webdataset's URL openers (`curl`, `gsutil`, `aws s3 cp` via `pipe:`).
Only the local and http:// paths are tested here (s3fs, gcsfs and cloud CLIs are not installed).
"""
from __future__ import annotations

import mmap
import os
import resource
import weakref
from urllib.parse import urlparse


def is_url(location: str) -> bool:
    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter would be a Windows drive


def local_path(location: str) -> str:
    return urlparse(location).path if str(location).startswith("file://") else str(location)


def join(location: str, name: str) -> str:
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(local_path(location), name)


def _fsspec_filesystem(url: str):
    """(filesystem, path) through fsspec, or None when the protocol's package is not installed."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError):
        return None


def read_bytes(location: str) -> bytes:
    """The whole object. Raises FileNotFoundError (or the opener's OSError) when it is not there."""
    if not is_url(location):
        with open(local_path(location), "rb") as f:
            return f.read()
    found = _fsspec_filesystem(location)
    if found is not None:
        fs, path = found
        with fs.open(path, "rb") as f:
            return f.read()
    from webdataset.gopen import gopen

    if urlparse(location).scheme == "s3":  # no s3fs: the AWS CLI, as webdataset's own `pipe:` recipe does
        location = f"pipe:aws s3 cp {location} -"
    with gopen(location, "rb") as f:
        data = f.read()
    if not data:
        raise FileNotFoundError(f"{location}: empty or unreachable")
    return data


# Live memory maps of this process. In Python < 3.13 each one holds a duplicate file descriptor, so their number is
# capped well below the descriptor limit; past the cap, shards are read into memory instead.
_MAPPED: weakref.WeakSet = weakref.WeakSet()
MAX_MAPPED = 512


def mapped_count() -> int:
    return len(_MAPPED)


def map_or_read(location: str):
    """A local file memory-mapped read-only (the page cache is read in place, with no copy), or its bytes: for a
    URL, an empty file, or while `MAX_MAPPED` maps (at most a quarter of the soft descriptor limit) are alive.

    As with any memory-mapped dataset, a shard must not be truncated in place while a job maps it; replacing it
    by rename, as `crescent data build` writes shards, is safe."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = MAX_MAPPED if soft == resource.RLIM_INFINITY else min(MAX_MAPPED, soft // 4)
    if is_url(location) or len(_MAPPED) >= cap:
        return read_bytes(location)
    with open(local_path(location), "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            return b""
    _MAPPED.add(data)  # leaves the set (and closes its descriptor) when the last array viewing it is gone
    return data


def exists(location: str) -> bool:
    if not is_url(location):
        return os.path.exists(local_path(location))
    found = _fsspec_filesystem(location)
    if found is not None:
        fs, path = found
        try:
            return bool(fs.exists(path))
        except OSError:
            return False
    try:
        return len(read_bytes(location)) > 0
    except OSError:
        return False
