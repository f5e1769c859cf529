"""Every byte of I/O for local paths and gs:// URIs, behind one small interface.

GCS goes through google-cloud-storage (which honours STORAGE_EMULATOR_HOST, so tests run every gs://
path here against a real emulator). Writes are atomic: a reader sees the old object or the whole new
one, never a partial file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

GCS_SCHEME = "gs://"
# Parallel transfers are network-bound, so more threads than cores pays off.
DEFAULT_TRANSFER_THREADS = 16
GCS_TIMEOUT_S = 120


class StorageError(Exception):
    """A storage operation failed in a way the user can act on (missing file, bucket, credentials)."""


class StorageNotFound(StorageError):
    """The file or object does not exist."""


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size_bytes: int


def is_gcs(uri: str) -> bool:
    return uri.startswith(GCS_SCHEME)


def split_gcs(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, name = uri[len(GCS_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: expected gs://BUCKET/PATH")
    return bucket, name


def join(base: str, *parts: str) -> str:
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def read_bytes(uri: str) -> bytes:
    if not is_gcs(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageNotFound(f"no such file: {uri}") from None
    return _gcs_call(uri, lambda blob: blob.download_as_bytes(timeout=GCS_TIMEOUT_S, retry=_retry()))


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: the object appears complete or not at all."""
    if not is_gcs(uri):
        with _local_temp_beside(uri) as tmp:
            Path(tmp).write_bytes(data)
        return
    # A GCS object becomes visible only once its upload has finished, so uploads are atomic already.
    # Uploads are not retried by default; ours are idempotent (same name, same bytes), so we ask for it.
    _gcs_call(uri, lambda blob: blob.upload_from_string(data, timeout=GCS_TIMEOUT_S, retry=_retry()))


def upload(local_path: str, uri: str) -> None:
    """Copy a finished local file to `uri` (local or gs://), atomically."""
    if not is_gcs(uri):
        with _local_temp_beside(uri) as tmp:
            shutil.copyfile(local_path, tmp)
        return
    _gcs_call(uri, lambda blob: blob.upload_from_filename(local_path, timeout=GCS_TIMEOUT_S, retry=_retry()))


def download(uri: str, local_path: str) -> None:
    """Copy `uri` to a local file, atomically: an interrupted download leaves no file behind."""
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    with _local_temp_beside(local_path) as tmp:
        if is_gcs(uri):
            _gcs_call(uri, lambda blob: blob.download_to_filename(tmp, timeout=GCS_TIMEOUT_S, retry=_retry()))
        else:
            try:
                shutil.copyfile(uri, tmp)
            except FileNotFoundError:
                raise StorageNotFound(f"no such file: {uri}") from None


def move_local_into_place(local_path: str, uri: str) -> None:
    """Publish a finished local file at `uri`: a rename on the same disk, else an upload."""
    if is_gcs(uri):
        upload(local_path, uri)
        os.remove(local_path)
    else:
        try:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            os.replace(local_path, uri)
        except OSError as error:
            raise StorageError(f"cannot write {uri}: {error.strerror or error}") from None


def local_sha256(path: str) -> str:
    """Hex SHA-256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exists(uri: str) -> bool:
    if not is_gcs(uri):
        return os.path.exists(uri)
    return _gcs_call(uri, lambda blob: blob.exists(timeout=GCS_TIMEOUT_S, retry=_retry()))


def delete(uri: str) -> None:
    """Delete a file or object; a missing one is not an error."""
    if not is_gcs(uri):
        Path(uri).unlink(missing_ok=True)
        return
    with contextlib.suppress(StorageNotFound):
        _gcs_call(uri, lambda blob: blob.delete(timeout=GCS_TIMEOUT_S, retry=_retry()))


def delete_tree(prefix: str) -> None:
    """Delete every file under the folder `prefix` (and, locally, the folder itself)."""
    for info in list_files(prefix):
        delete(info.uri)
    if not is_gcs(prefix):
        shutil.rmtree(prefix, ignore_errors=True)


def list_files(prefix: str) -> list[FileInfo]:
    """Every file under the folder `prefix`, recursively, sorted by URI; [] when there is none."""
    if not is_gcs(prefix):
        return sorted(_walk_local(prefix), key=lambda f: f.uri)
    bucket, name = split_gcs(prefix)
    folder = name.rstrip("/") + "/" if name.strip("/") else ""
    client = _client(bucket)
    try:
        blobs = list(client.list_blobs(bucket, prefix=folder, timeout=GCS_TIMEOUT_S, retry=_retry()))
    except Exception as error:  # noqa: BLE001 - translated into a message naming the bucket
        raise _translate(error, prefix) from error
    return sorted(
        (FileInfo(f"{GCS_SCHEME}{bucket}/{b.name}", b.size or 0) for b in blobs if not b.name.endswith("/")),
        key=lambda f: f.uri,
    )


def copy_tree(source: str, destination: str, threads: int = DEFAULT_TRANSFER_THREADS) -> None:
    """Copy every file under the folder `source` to the same relative path under `destination`."""
    prefix = source.rstrip("/") + "/"
    copy_many(((f.uri, join(destination, f.uri[len(prefix) :])) for f in list_files(source)), threads)


def _walk_local(folder: str):
    # os.scandir rather than Path.rglob: it knows each entry's type without another system call.
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_dir():
            yield from _walk_local(entry.path)
        elif entry.is_file():
            yield FileInfo(entry.path, entry.stat().st_size)


def copy_many(pairs: Iterable[tuple[str, str]], threads: int = DEFAULT_TRANSFER_THREADS) -> None:
    """Copy (source, destination) pairs in parallel; each side may be local or gs://."""

    def copy_one(pair: tuple[str, str]) -> None:
        source, destination = pair
        if not is_gcs(destination):
            download(source, destination)
        elif not is_gcs(source):
            upload(source, destination)
        else:
            write_bytes(destination, read_bytes(source))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        # list() re-raises the first failure.
        list(pool.map(copy_one, list(pairs)))


def pyarrow_filesystem(uri: str):
    """A pyarrow filesystem for Ray's experiment storage at `uri`: None (Ray's own choice) except for
    gs:// under STORAGE_EMULATOR_HOST, where it points at the emulator like google-cloud-storage does."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if not is_gcs(uri) or not emulator:
        return None
    from pyarrow import fs

    scheme, _, host = emulator.rpartition("://")
    return fs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=scheme or "http")


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class _local_temp_beside:
    """A temporary file next to `path` that replaces `path` on success and vanishes on failure."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(
                dir=folder, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp"
            )
        except OSError as error:
            raise StorageError(f"cannot write {self.path}: {error.strerror or error}") from None
        os.close(fd)
        # mkstemp makes the file private (0600); a published file gets the permissions an ordinary
        # open() would give it, so that other users (a cluster's workers, a reviewer) can read it.
        os.chmod(self.tmp, 0o666 & ~_UMASK)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                os.replace(self.tmp, self.path)
                return
            except OSError as error:
                Path(self.tmp).unlink(missing_ok=True)
                raise StorageError(f"cannot write {self.path}: {error.strerror or error}") from None
        Path(self.tmp).unlink(missing_ok=True)


# --- GCS plumbing -----------------------------------------------------------------------------------

_client_lock = threading.Lock()


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY


@functools.cache
def _client_for_process(pid: int):
    # One client per process: a client's HTTP connections must not be shared across a fork.
    import google.auth
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client()
    credentials, project = google.auth.default()
    # Object reads and writes need no project; some environments (a laptop with user credentials)
    # do not name one.
    return storage.Client(credentials=credentials, project=project or "<none>")


def _client(bucket: str):
    from google.auth.exceptions import DefaultCredentialsError

    try:
        with _client_lock:
            return _client_for_process(os.getpid())
    except DefaultCredentialsError as error:
        raise StorageError(
            f"cannot access gs://{bucket}: no Google Cloud credentials found ({error}). "
            "Run `gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a "
            "service-account key file, or run on a VM whose service account can read the bucket."
        ) from None


def _gcs_call(uri: str, action: Callable):
    bucket, name = split_gcs(uri)
    if not name:
        raise StorageError(f"{uri!r} names a bucket, not an object")
    blob = _client(bucket).bucket(bucket).blob(name)
    try:
        return action(blob)
    except Exception as error:  # noqa: BLE001 - translated into a message naming the object
        raise _translate(error, uri) from error


def _translate(error: Exception, uri: str) -> Exception:
    from google.api_core import exceptions as gexc

    bucket, name = split_gcs(uri)
    if isinstance(error, gexc.NotFound):
        if not _bucket_exists(bucket):
            return StorageError(f"bucket gs://{bucket} does not exist (while accessing {uri})")
        return StorageNotFound(f"no such object: {uri}")
    if isinstance(error, gexc.Forbidden | gexc.Unauthorized):
        return StorageError(
            f"permission denied on gs://{bucket} (while accessing {uri}): the credentials in use "
            f"lack access to this bucket: {error}"
        )
    if isinstance(error, StorageError):
        return error
    return StorageError(f"{uri}: {type(error).__name__}: {error}")


def _bucket_exists(bucket: str) -> bool:
    try:
        return _client(bucket).bucket(bucket).exists(timeout=GCS_TIMEOUT_S, retry=_retry())
    except Exception:  # noqa: BLE001 - only used to word an error message
        return True
