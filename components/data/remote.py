"""Where shard sets live: local paths (or a shared volume), or URLs (s3://, gs://, https://, ...).

URLs go through fsspec. `s3://` needs s3fs (the `crescent[s3]` extra, installed in the training image); the
endpoint and credentials come from the standard places: `AWS_ENDPOINT_URL` (an S3-compatible store: MinIO, Ceph,
...), `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_PROFILE`, or fsspec's own settings
(`FSSPEC_S3_ENDPOINT_URL`, `FSSPEC_S3_KEY`, ...). `gs://` works the same way through gcsfs (`pip install gcsfs`;
supported through this path, untested here). http(s) reads use fsspec's aiohttp filesystem. A protocol fsspec does
not know (e.g. webdataset's `pipe:CMD`) goes to webdataset's URL opener.

Tested: local paths, and s3:// against a real S3-protocol server (moto) on loopback (tests/test_s3.py).
Errors are plain: a missing object is FileNotFoundError, refused credentials a PermissionError saying where the
credentials come from, a protocol whose package is not installed a ModuleNotFoundError naming the extra.
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


# Protocol -> (fsspec's package, the extra or pip package that installs it).
_PACKAGES = {"s3": ("s3fs", "crescent[s3]"), "s3a": ("s3fs", "crescent[s3]"), "gs": ("gcsfs", "gcsfs"),
             "gcs": ("gcsfs", "gcsfs")}
_CREDENTIALS = {"s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and AWS_ENDPOINT_URL for an "
                      "S3-compatible store", "gs": "GOOGLE_APPLICATION_CREDENTIALS"}


def _fsspec_filesystem(url: str):
    """(filesystem, path) through fsspec, or None for a protocol fsspec does not know."""
    import fsspec

    scheme = urlparse(url).scheme
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package, install = _PACKAGES.get(scheme, (f"the {scheme}:// filesystem", None))
        hint = f"pip install '{install}'" if install else "install fsspec's implementation for it"
        raise ModuleNotFoundError(f"{url}: reading {scheme}:// needs {package}, which is not installed: {hint}",
                                  name=package) from None
    except ValueError:
        return None


def _denied(location: str, err: PermissionError) -> PermissionError:
    scheme = urlparse(location).scheme
    where = _CREDENTIALS.get(scheme.rstrip("a"), "the store's credentials")
    return PermissionError(f"{location}: access denied ({err}); check the credentials ({where})")


def read_bytes(location: str) -> bytes:
    """The whole object. Raises FileNotFoundError (or the opener's OSError) when it is not there."""
    if not is_url(location):
        with open(local_path(location), "rb") as f:
            return f.read()
    found = _fsspec_filesystem(location)
    if found is not None:
        fs, path = found
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except PermissionError as err:
            raise _denied(location, err) from None
    from webdataset.gopen import gopen

    with gopen(location, "rb") as f:
        data = f.read()
    if not data:
        raise FileNotFoundError(f"{location}: empty or unreachable")
    return data


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file or object so that a reader sees either nothing or all of it: locally a temporary
    name beside it, then a rename; in an object store one PUT (objects appear whole)."""
    if not is_url(location):
        path = local_path(location)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    found = _fsspec_filesystem(location)
    if found is None:
        raise ValueError(f"{location}: cannot write to this URL (no fsspec filesystem for it)")
    fs, path = found
    try:
        fs.pipe_file(path, data)
    except PermissionError as err:
        raise _denied(location, err) from None


def make_dirs(location: str) -> None:
    """A local directory (and its parents); nothing for an object store, whose prefixes need no creating."""
    if not is_url(location):
        os.makedirs(local_path(location), exist_ok=True)


def list_names(location: str, pattern: str) -> list[str]:
    """Names of the files directly under `location` that match the glob `pattern`."""
    if not is_url(location):
        import glob

        return sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(local_path(location)),
                                                                          pattern)))
    found = _fsspec_filesystem(location)
    if found is None:
        return []
    fs, path = found
    return sorted(p.rsplit("/", 1)[-1] for p in fs.glob(path.rstrip("/") + "/" + pattern))


def remove(location: str) -> None:
    if not is_url(location):
        os.unlink(local_path(location))
        return
    fs, path = _fsspec_filesystem(location)
    fs.rm_file(path)


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
    """Whether the file or object is there; refused credentials are an error, not a "no"."""
    if not is_url(location):
        return os.path.exists(local_path(location))
    found = _fsspec_filesystem(location)
    if found is not None:
        fs, path = found
        try:
            return bool(fs.exists(path))
        except PermissionError as err:
            raise _denied(location, err) from None
        except OSError:
            return False
    try:
        return len(read_bytes(location)) > 0
    except OSError:
        return False
