"""Folders that appear whole or not at all, even when the writer is interrupted or killed.

A folder is written under a staging name beside its target (``.<name>.<pid>.partial/<name>``) and renamed into
place once complete. A lock file beside the target (``.<name>.lock``, held with ``flock`` for the whole run)
keeps a second writer off the same target; whoever holds it may treat every staging folder of that target as
left behind by a killed run, and removes it (restoring a folder that an interrupted replacement had moved
aside). A replaced folder is moved aside only once the new one is complete, and removed only once the new one
is in place; SIGINT and SIGTERM wait while folders are being moved.
"""

import fcntl
import glob
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from .report import ConversionError, Interrupted, progress

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupted(signal_number, frame):
    raise Interrupted(signal_number, signal.Signals(signal_number).name)


@contextmanager
def interrupts_as_errors():
    """SIGINT and SIGTERM alike raise ``Interrupted``, so that cleanup runs and the run ends with one message."""
    if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread
        yield
        return
    previous = {number: signal.signal(number, _raise_interrupted) for number in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait until the block ends, then act as they would have (for steps that must not stop
    halfway: moving folders, removing them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {number: signal.signal(number, lambda number, frame: pending.append(number))
                for number in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


def _staging_name(target, pid):
    return f".{target.name}.{pid}.partial"


def staging_folders(target):
    """Every staging folder of ``target``, whatever run wrote it (not those of ``<target>.x``: pids are digits)."""
    pattern = re.compile(re.escape(_staging_name(target, "PID")).replace("PID", r"\d+"))
    return sorted(path for path in target.parent.glob(f".{glob.escape(target.name)}.*.partial")
                  if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink())


def _aside(target):
    """Where a replaced folder waits inside the staging folder (never the new folder's name)."""
    return f"{target.name}.replaced"


@contextmanager
def output_lock(target, job="conversion"):
    """Hold ``target``'s lock for the block; refuse if another process holds it (a ``job``, in the message).

    Creates missing parent folders (removed again if the block leaves no ``target``), then removes staging
    folders of killed runs: with the lock held, no other writer of ``target`` is alive.
    """
    target = Path(target).resolve()
    created = [parent for parent in (target.parent, *target.parent.parents) if not parent.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    try:
        descriptor = _acquire(lock, target, job)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        _recover(target, job)
        yield target
    finally:
        with signals_deferred():
            lock.unlink(missing_ok=True)  # while still held: a waiting process then locks a new file
            os.close(descriptor)
            if not target.exists():
                _remove_empty(created)


def _acquire(lock, target, job):
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise ConversionError(f"another {job} (pid {holder}) is writing {target}; its lock is {lock}") from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)  # the previous holder removed this file as we opened it: lock the new one


def _recover(target, job):
    """Remove the staging folders that killed runs left; put back a folder that one had moved aside."""
    for staging in staging_folders(target):
        aside = staging / _aside(target)
        with signals_deferred():
            if aside.is_dir() and not target.exists():
                aside.rename(target)
                progress(f"restored {target.name} from {staging.name}, where an interrupted replacement had moved it")
            shutil.rmtree(staging)
        progress(f"removed {staging.name}, left by an interrupted {job}")


def _remove_empty(folders):
    for folder in folders:  # innermost first
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def staged_folder(target, replace=False):
    """Yield an empty folder named like ``target``; on success it becomes ``target`` (replacing an empty folder, or
    with ``replace`` any), on failure or interruption nothing of it is left. Hold ``output_lock(target)``."""
    target = Path(target).resolve()
    staging = target.parent / _staging_name(target, os.getpid())
    staging.mkdir()
    try:
        folder = staging / target.name  # the final name, so that remote code caches under it
        folder.mkdir()
        yield folder
        with signals_deferred():
            if target.exists():
                if not replace and (not target.is_dir() or any(target.iterdir())):
                    raise ConversionError(f"{target} was filled meanwhile by another writer; nothing was replaced")
                target.rename(staging / _aside(target))
            try:
                folder.rename(target)
            except OSError:
                if (staging / _aside(target)).exists():
                    (staging / _aside(target)).rename(target)
                raise
    finally:
        with signals_deferred():
            shutil.rmtree(staging, ignore_errors=True)
