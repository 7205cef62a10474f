"""Local paths and object-storage URLs (``s3://``, ``gs://``, ...) behind one small interface.

Clips may be read from a bucket (``--root s3://...``) and shards published to one (``--out
s3://...``). A URL is kept a string end to end (``pathlib.Path`` would fold ``s3://b`` into
``s3:/b``, a local folder) and opened through fsspec, so the endpoint and credentials come from
the backend's standard configuration: for S3 (s3fs/botocore) ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` or an instance role, which covers AWS, MinIO and
any S3-compatible store. Local paths keep using the standard library.
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

PathLike = str | Path


class StorageError(OSError):
    """A URL that cannot be used: no fsspec backend for its scheme, or the store refused."""


def backend_errors() -> tuple[type[BaseException], ...]:
    """What a store raises for an unreachable endpoint, bad credentials or a refused request:
    ``OSError`` (fsspec's mapping), plus botocore's own errors, which s3fs lets through."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return tuple(errors)
    return (*errors, BotoCoreError, ClientError)


def is_url(path: PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://`` (which is a local path)."""
    text = str(path)
    return "://" in text and urlparse(text).scheme not in ("", "file")


def local_path(path: PathLike) -> str:
    """A local path as a string (``file://`` stripped)."""
    text = str(path)
    return urlparse(text).path if text.startswith("file://") else text


def join(base: PathLike, *names: str) -> str:
    """``base/name/...`` for a local folder or a URL (URLs keep their ``//``)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])
    return str(Path(local_path(base), *names))


def basename(path: PathLike) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else os.path.basename(str(path))


# the environment a filesystem was made under: s3fs reads its endpoint and credentials from it once,
# so fsspec's own instance cache (keyed by constructor arguments only) would keep a stale endpoint
_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")
_FILESYSTEMS: dict[tuple, object] = {}


def filesystem(url: str):
    """The fsspec filesystem of a URL and the URL's path inside it (one per scheme and environment)."""
    try:
        import fsspec

        key = (urlparse(url).scheme, tuple(os.environ.get(k) for k in _ENV_KEYS))
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs, inner = fsspec.core.url_to_fs(url, skip_instance_cache=True)
            _FILESYSTEMS[key] = fs
            return fs, inner
        return fs, fs._strip_protocol(url)
    except ImportError as e:  # e.g. s3fs or gcsfs not installed
        scheme = urlparse(url).scheme
        raise StorageError(f"cannot open {url}: {e} (install the fsspec backend for {scheme}://, "
                           f"e.g. pip install s3fs)") from e


def open_file(path: PathLike, mode: str = "rb", **kwargs) -> IO:
    """An open file object: the built-in ``open`` locally, fsspec for a URL."""
    if not is_url(path):
        return open(local_path(path), mode, **kwargs)
    fs, inner = filesystem(str(path))
    return fs.open(inner, mode, **kwargs)


def is_file(path: PathLike) -> bool:
    if not is_url(path):
        return os.path.isfile(local_path(path))
    fs, inner = filesystem(str(path))
    return fs.isfile(inner)


def is_dir(path: PathLike) -> bool:
    if not is_url(path):
        return os.path.isdir(local_path(path))
    fs, inner = filesystem(str(path))
    return fs.isdir(inner)


def size(path: PathLike) -> int:
    """Size in bytes; ``FileNotFoundError`` when there is no such file."""
    if not is_url(path):
        return os.stat(local_path(path)).st_size
    fs, inner = filesystem(str(path))
    return int(fs.info(inner)["size"])


def list_files(folder: PathLike, recursive: bool = False) -> list[str]:
    """Files in a folder (below it when ``recursive``), as paths or URLs like ``folder``; sorted."""
    if not is_url(folder):
        root = Path(local_path(folder))
        if not root.is_dir():
            return []
        found = root.rglob("*") if recursive else root.iterdir()
        return [str(p) for p in sorted(p for p in found if p.is_file())]
    fs, inner = filesystem(str(folder))
    if not fs.isdir(inner):
        return []
    names = fs.find(inner) if recursive else [e["name"] for e in fs.ls(inner, detail=True) if e["type"] == "file"]
    return sorted((fs.unstrip_protocol(n) for n in names), key=lambda u: u.split("/"))  # folder by folder


# the user-metadata key an upload records its content hash under: on S3 the object's
# ``x-amz-meta-sha256`` header, kept by AWS, MinIO, Ceph and moto and set in the same request as the
# bytes, so it can never describe other bytes (an ETag cannot serve: a multipart upload's ETag is
# not the MD5 of the object, and with SSE-KMS not an MD5 at all)
DIGEST_KEY = "sha256"
_S3 = ("s3", "s3a")


def put_file(local: PathLike, url: str, sha256: str | None = None) -> None:
    """Upload one local file to ``url`` (one PUT or multipart upload: it appears whole or not at all).

    ``sha256``, the file's content hash, is stored with the object on S3 (see ``DIGEST_KEY``), so
    that ``stored_object`` can later tell an object that already holds these bytes.
    """
    fs, inner = filesystem(url)
    extra = {"Metadata": {DIGEST_KEY: sha256}} if sha256 and urlparse(url).scheme in _S3 else {}
    fs.put_file(str(local), inner, **extra)


def stored_object(url: str) -> tuple[int, str | None] | None:
    """``(size, sha256 recorded at upload or None)`` of an object, read fresh from the store (one
    HEAD on S3, no listing cache); None when there is no such object. Other backends report no hash."""
    fs, inner = filesystem(url)
    try:
        if urlparse(url).scheme in _S3:
            bucket, key, _ = fs.split_path(inner)
            head = fs.call_s3("head_object", Bucket=bucket, Key=key)
            return int(head["ContentLength"]), head.get("Metadata", {}).get(DIGEST_KEY)
        fs.invalidate_cache(inner)
        info = fs.info(inner)
    except FileNotFoundError:
        return None
    return (int(info["size"]), None) if info.get("type") == "file" else None


def read_bytes(path: PathLike) -> bytes | None:
    """A whole file, or None when it does not exist."""
    try:
        with open_file(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
