"""One writer at a time of a dataset folder, local or gs:// (make_shards' destination)."""

from __future__ import annotations

import contextlib
import json
import os
import socket

from pneumo_dist import storage
from pneumo_dist.errors import PneumoDistError


class FolderBusy(PneumoDistError):
    """Another make_shards is writing the folder; the message names it."""


@contextlib.contextmanager
def hold(destination: str, work_folder: str, name: str):
    """Only one make_shards writes `destination` at a time, across processes and machines, by the lock
    file `name` in `work_folder` (removed, with the folders this made if they are left empty). A local
    folder: an exclusive flock on its lock file, which the kernel releases when its process dies, so a
    dead run's lock is no lock and no takeover can race. A bucket: an object created only if absent
    (if_generation_match=0); one left by a dead process of this host is taken over by a delete
    conditional on the generation that was found stale, so of two processes that found it stale only
    one takes it. One from another host must be removed by hand."""
    uri = storage.join(work_folder, name)
    created = not storage.is_gcs(destination) and not os.path.exists(destination)
    owner = json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "started_utc": storage.utc_timestamp()}
    ).encode()
    held = hold_local(uri, destination, owner) if not storage.is_gcs(uri) else None
    if held is None:
        _take_bucket(uri, destination, owner)
    try:
        yield
    finally:
        storage.delete(uri)  # before the flock goes: a waiting process then finds no file, or a new one
        if held is not None:
            os.close(held)
        if not storage.is_gcs(destination):
            with contextlib.suppress(OSError):  # rmdir removes only empty folders
                os.rmdir(work_folder)
                if created:
                    os.rmdir(destination)


def hold_local(path: str, destination: str, owner: bytes) -> int:
    """-> the file descriptor holding the flock on `path` (written with `owner`)."""
    import fcntl

    for _ in range(10):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # a file where a folder must be, a read-only or pseudo file system
            raise storage.StorageError(f"cannot write {path}: {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderBusy(
                f"{destination} is being written by another make_shards (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, since {holder.get('started_utc')})"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner, 0)
            return fd
        os.close(fd)  # locked a file its holder had just removed: open the new one
    raise FolderBusy(f"{destination}: could not take its lock {path}; run again")


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _take_bucket(uri: str, destination: str, owner: bytes) -> None:
    try:
        storage.create_exclusive(uri, owner)
        return
    except storage.AlreadyExists:
        pass
    released, generation, holder = False, None, {}
    try:
        content, generation = storage.read_bytes_and_generation(uri)
        holder = json.loads(content)
    except storage.StorageNotFound:  # released meanwhile
        released = True
    except ValueError:
        pass
    holder = holder if isinstance(holder, dict) else {}
    pid = holder.get("pid")
    ours = holder.get("host") == socket.gethostname() and isinstance(pid, int)
    stale = ours and not storage.process_alive(pid)
    taken = False
    if stale or released:
        with contextlib.suppress(storage.StorageError):  # another process was quicker: not ours
            if stale:
                storage.delete_if_generation(uri, generation)  # only the exact object found stale
            storage.create_exclusive(uri, owner)
            taken = True
    if not taken:
        raise FolderBusy(
            f"{destination} is being written by another make_shards (host {holder.get('host')}, pid "
            f"{pid}, since {holder.get('started_utc')}). If that run is no longer alive, delete {uri} "
            "and run again"
        )


# --- the manifest -----------------------------------------------------------------------------------
