"""Every byte of I/O for local paths and gs:// URIs, behind one small interface.

GCS goes through google-cloud-storage (which honours STORAGE_EMULATOR_HOST, so tests run every gs://
path here against a real emulator). Writes are atomic: a reader sees the old object or the whole new
one, never a partial file.

Past ~500 lines on purpose: every byte of I/O behind one interface, a local and a gs:// branch side by
side per operation.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pneumo_dist.errors import PneumoDistError

GCS_SCHEME = "gs://"
# Parallel transfers are network-bound, so more threads than cores pays off.
DEFAULT_TRANSFER_THREADS = 16
GCS_TIMEOUT_S = 120


class StorageError(PneumoDistError):
    """A storage operation failed in a way the user can act on (missing file, bucket, credentials)."""


class StorageNotFound(StorageError):
    """The file or object does not exist."""


class UnreadableFile(StorageError):
    """A local path exists but cannot be read as a file (a folder, no permission)."""


class UnsafeName(StorageError):
    """A name read from a manifest, export or CSV would leave the folder it must stay in."""


class AlreadyExists(StorageError):
    """create_exclusive found the file or object already there."""


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size_bytes: int
    version: str = ""  # changes when the content may have: a file's mtime, an object's generation


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


def parent(uri: str) -> str:
    """The folder holding `uri`, local or gs:// ("." for a bare local name)."""
    uri = uri.rstrip("/")
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def utc_timestamp() -> str:
    """Now, as the files we write record it: 2026-11-27T08:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def child(folder: str, name: str, read_from: str) -> str:
    """`folder` joined with `name`, a relative name read from the file `read_from` (a manifest, an
    export, a state file). Refuses anything that could land outside `folder`: an absolute path, a URI,
    `..`, a backslash or an empty part. A bucket object must never choose where a local file is written."""
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not parts
        or any(part in ("", ".", "..") for part in parts)
        or "\\" in name
        or ":" in parts[0]
        or "\x00" in name
    ):
        raise UnsafeName(
            f"{read_from} names {name!r}: expected a plain relative name inside {folder} "
            "(no absolute path, URI, '..' or backslash); refusing to read or write it"
        )
    return join(folder, name)


def read_bytes(uri: str) -> bytes:
    return _read(uri, None)


def read_prefix(uri: str, size: int) -> bytes:
    """A file's first `size` bytes (all of it when shorter): one ranged request on gs://."""
    return _read(uri, size)


def _read(uri: str, size: int | None) -> bytes:
    """The whole file (size None) or its first `size` bytes."""
    if not is_gcs(uri):
        try:
            with open(uri, "rb") as file:
                return file.read(-1 if size is None else size)
        except FileNotFoundError:
            raise StorageNotFound(f"no such file: {uri}") from None
        except OSError as error:  # a folder, no permission, an I/O error
            raise UnreadableFile(f"cannot read {uri}: {error.strerror or error}") from None
    # A whole object is read without a Range header: Cloud Storage sends no checksum for a part of one,
    # so only a whole download is checked.
    ranged = {} if size is None else {"start": 0, "end": size - 1}
    return _gcs_call(
        uri, lambda blob: blob.download_as_bytes(**ranged, timeout=GCS_TIMEOUT_S, retry=_retry())
    )


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


def read_bytes_and_generation(uri: str) -> tuple[bytes, int | None]:
    """An object's bytes and the generation they are of (gs:// only): what delete_if_generation takes.
    None: a store that keeps no generations (gcp-storage-emulator)."""

    def read(blob) -> tuple[bytes, int | None]:
        data = blob.download_as_bytes(timeout=GCS_TIMEOUT_S, retry=_retry())
        return data, None if blob.generation is None else int(blob.generation)

    return _gcs_call(uri, read)


def delete_if_generation(uri: str, generation: int | None) -> None:
    """Delete the object only if it is still that generation (gs:// only; GCS checks it atomically:
    https://cloud.google.com/storage/docs/request-preconditions). Raises StorageError otherwise,
    StorageNotFound when it is gone. None (a store without generations): unconditionally."""
    _gcs_call(uri, lambda blob: blob.delete(if_generation_match=generation, timeout=GCS_TIMEOUT_S))


def create_exclusive(uri: str, data: bytes) -> None:
    """Create `uri` holding `data` only if nothing is there yet, else raise AlreadyExists: a lock that
    two processes (or two machines, on GCS) cannot both take."""
    if not is_gcs(uri):
        try:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(uri, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise AlreadyExists(f"{uri} already exists") from None
        except OSError as error:  # a file where a folder must be, a read-only or pseudo file system
            raise StorageError(f"cannot write {uri}: {error.strerror or error}") from None
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return
    from google.api_core.exceptions import PreconditionFailed

    def create(blob) -> None:
        # Generation 0 means "no live object": GCS makes the check and the write one atomic step
        # (https://cloud.google.com/storage/docs/request-preconditions). The look first is for stores
        # that ignore preconditions, such as gcp-storage-emulator: there it is the only check.
        if blob.exists(timeout=GCS_TIMEOUT_S, retry=_retry()):
            raise AlreadyExists(f"{uri} already exists")
        blob.upload_from_string(data, if_generation_match=0, timeout=GCS_TIMEOUT_S)

    try:
        _gcs_call(uri, create)
    except AlreadyExists:
        raise
    except StorageError as error:
        if isinstance(error.__cause__, PreconditionFailed):
            raise AlreadyExists(f"{uri} already exists") from None
        raise


def delete_tree(prefix: str) -> None:
    """Delete every file under the folder `prefix` (and, locally, the folder itself). Symbolic links are
    removed, never followed: what they point to is not ours."""
    if is_gcs(prefix):
        for info in list_files(prefix):
            delete(info.uri)
    elif os.path.islink(prefix):
        os.unlink(prefix)
    elif os.path.isdir(prefix):
        # rmtree never follows links inside the tree (it unlinks them), and on Linux it walks by file
        # descriptor, so a link swapped in during the walk cannot redirect it either.
        try:
            shutil.rmtree(prefix)
        except OSError as error:
            where = error.filename or prefix
            raise StorageError(f"cannot delete {where}: {error.strerror or error}") from None


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
        (
            FileInfo(f"{GCS_SCHEME}{bucket}/{b.name}", b.size or 0, str(b.generation))
            for b in blobs
            if not b.name.endswith("/")
        ),
        key=lambda f: f.uri,
    )


def describe_files(uris: list[str]) -> dict[str, FileInfo]:
    """FileInfo of each of these files that exists (a folder is not a file): local files by stat, gs://
    objects by listing each folder once rather than one request per object."""
    found: dict[str, FileInfo] = {}
    for uri in (uri for uri in uris if not is_gcs(uri)):
        try:
            info = os.stat(uri)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            found[uri] = FileInfo(uri, info.st_size, str(info.st_mtime_ns))
    wanted = {uri for uri in uris if is_gcs(uri)}
    for folder in sorted({parent(uri) for uri in wanted}):
        found.update((info.uri, info) for info in list_files(folder) if info.uri in wanted)
    return found


def copy_tree(source: str, destination: str, threads: int = DEFAULT_TRANSFER_THREADS) -> None:
    """Copy every file under the folder `source` to the same relative path under `destination`. An object
    whose name would leave `destination` (GCS allows "a/../../b") is refused, not copied."""
    prefix = source.rstrip("/") + "/"
    pairs = [(f.uri, child(destination, f.uri[len(prefix) :], source)) for f in list_files(source)]
    copy_many(pairs, threads)


# A process works in a local folder and keeps what it writes in a folder `uri`: the same folder (a local
# run), or elsewhere (gs://; another worker's folder). These copy and delete there only when `uri` is
# elsewhere, so that their callers need not ask.


def is_same_folder(local_folder: str, uri: str) -> bool:
    return not is_gcs(uri) and os.path.realpath(local_folder) == os.path.realpath(uri)


def publish(local_folder: str, uri: str, names: Iterable[str] | None = None) -> None:
    """Copy the files `names` of `local_folder` (default: all, subfolders included) to `uri`."""
    if is_same_folder(local_folder, uri):
        return
    if names is None:
        copy_tree(local_folder, uri)
    else:
        copy_many((os.path.join(local_folder, name), join(uri, name)) for name in names)


def fetch(uri: str, local_folder: str, names: Iterable[str]) -> None:
    """Copy the files `names` of `uri` into `local_folder`."""
    if not is_same_folder(local_folder, uri):
        copy_many((join(uri, name), os.path.join(local_folder, name)) for name in names)


def discard(local_folder: str, uri: str, names: Iterable[str]) -> None:
    """Delete the files `names` from `local_folder` and from `uri`; a missing one is not an error."""
    elsewhere = not is_same_folder(local_folder, uri)
    for name in names:
        delete(os.path.join(local_folder, name))
        if elsewhere:
            delete(join(uri, name))


def _walk_local(folder: str, ancestors: tuple[tuple[int, int], ...] = ()):
    # os.scandir rather than Path.rglob: it knows each entry's type without another system call.
    try:
        entries = list(os.scandir(folder))
        here = os.stat(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as error:  # no permission, a link loop the system itself stopped
        raise StorageError(f"cannot list {folder}: {error.strerror or error}") from None
    ancestors = (*ancestors, (here.st_dev, here.st_ino))
    for entry in entries:
        if entry.is_dir():  # follows links: a source folder may link to where the images really are
            target = entry.stat()
            if (target.st_dev, target.st_ino) in ancestors:
                raise StorageError(
                    f"{entry.path} is a symbolic link loop: it leads back to a folder above it"
                )
            yield from _walk_local(entry.path, ancestors)
        elif entry.is_file():
            entry_stat = entry.stat()
            yield FileInfo(entry.path, entry_stat.st_size, str(entry_stat.st_mtime_ns))


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


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this id exists: a lock or folder named after a dead one is
    stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def give_ordinary_permissions(path: str) -> None:
    """mkstemp makes a file private (0600); a file to publish gets the permissions an ordinary open()
    would give it, so that other users (a cluster's workers, a reviewer) can read it."""
    os.chmod(path, 0o666 & ~_UMASK)


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
        give_ordinary_permissions(self.tmp)
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
