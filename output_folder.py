"""The output folder of a run: who owns it (a lock file), and the small files written there (config, metrics).

**Ownership.** One run writes into an output folder at a time. Rank 0 (the only process that writes checkpoints,
``metrics.jsonl`` and ``config.yaml``) creates ``<OUTPUT>/run.lock`` atomically before anything else is written
there; it names the run (process id, host, boot, start time, command). A second run finds it and stops with one
line naming the first. A lock whose run is gone is taken over with one log line:

- on this host (same host name and boot): gone when its process no longer exists, or the process with that id is
  another one (started at another time);
- on another host (a shared file system): its liveness cannot be checked from here, so the owner touches the lock
  every ``HEARTBEAT_S`` seconds and a lock untouched for ``STALE_AFTER_S`` seconds is taken as gone. Both times come
  from the file system's clock (a file touched here is the reference), so the hosts' clocks need not agree. A run
  paused for longer than that (SIGSTOP) can lose its folder; a run requeued within that time on another host is
  refused and can simply be requeued again.

A run that takes over removes only the temporary files of the run it replaces (``*.tmp.<its pid>``); temporary
files of any other process are never touched.

**Small files.** ``write_text`` and ``append_metrics`` replace a file atomically and turn a failed write (full disk,
quota, I/O error) into one ``OutputError`` line. ``metrics.jsonl`` holds strict JSON (a non-finite number is
written as ``null``), one row per epoch: writing epoch N's row drops rows of epoch N and later, which a run that
went back to an earlier checkpoint has replaced.
"""
from __future__ import annotations

import glob
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Optional

LOCK_NAME = 'run.lock'
METRICS_NAME = 'metrics.jsonl'
HEARTBEAT_S = 30
STALE_AFTER_S = 120  # four missed heartbeats
_TAKE_OVER_TRIES = 5


class OutputError(RuntimeError):
    """The output folder is in use by another run, or a file there cannot be written (user-facing, one line)."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


# -----------------------------------------------------------------------------------------------------------------
# Small files
# -----------------------------------------------------------------------------------------------------------------
def write_text(path: str, text: str, what: str = '') -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename); ``OutputError`` on failure, with the
    previous file, if any, unchanged."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"could not write {what or 'the file'} '{path}': {_reason(e)}; free space or choose "
                          f"another --output") from None
    finally:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def metrics_line(record: dict) -> str:
    """One row of ``metrics.jsonl``: strict JSON, non-finite numbers as null."""
    return json.dumps(_finite(record), allow_nan=False)


def read_metrics(folder: str) -> list[str]:
    """The lines of ``<folder>/metrics.jsonl`` (none if there is no file)."""
    try:
        with open(os.path.join(folder, METRICS_NAME), encoding='utf-8') as f:
            return [line.rstrip('\n') for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _row_epoch(line: str) -> Optional[int]:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get('epoch') if isinstance(row, dict) and isinstance(row.get('epoch'), int) else None


def has_metrics_row(folder: str, epoch: int) -> bool:
    return any(_row_epoch(line) == epoch for line in read_metrics(folder))


def append_metrics(folder: str, record: dict) -> None:
    """Write epoch ``record['epoch']``'s row, after the rows of earlier epochs (later ones are dropped: a run that
    went back to an earlier checkpoint replaces them); lines that are not rows are kept as they are."""
    epoch = record['epoch']
    kept = [line for line in read_metrics(folder) if (_row_epoch(line) is None or _row_epoch(line) < epoch)]
    write_text(os.path.join(folder, METRICS_NAME), '\n'.join(kept + [metrics_line(record)]) + '\n', 'metrics')


# -----------------------------------------------------------------------------------------------------------------
# Ownership
# -----------------------------------------------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:
        return ''


def _process_start(pid: int) -> Optional[int]:
    """When process ``pid`` started (clock ticks after boot, Linux), to tell it from a later process of the same id."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return int(f.read().rsplit(')', 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"
            + (f" ({owner['command']})" if owner.get('command') else ''))


def _fs_now(folder: str) -> float:
    """The file system's clock: the modification time of a file touched now (hosts' clocks may differ)."""
    probe = os.path.join(folder, f'.clock.{socket.gethostname()}.{os.getpid()}')
    try:
        with open(probe, 'w'):
            pass
        return os.stat(probe).st_mtime
    except OSError:
        return time.time()
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass


class OutputLock:
    """Ownership of an output folder for this process (see the module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.me = {
            'pid': os.getpid(),
            'host': socket.gethostname(),
            'boot_id': _boot_id(),
            'pid_start': _process_start(os.getpid()),
            'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
            'command': ' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
            'run_id': uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None
        self.held = False

    # -- state of a lock found in the folder
    def _read(self, path: Optional[str] = None) -> tuple[Optional[dict], str]:
        try:
            with open(path or self.path, encoding='utf-8') as f:
                text = f.read()
        except FileNotFoundError:
            return None, ''
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        return (owner if isinstance(owner, dict) else {}), text

    def _gone(self, owner: dict) -> Optional[str]:
        """Why the run named by ``owner`` is gone, or None while it may be running."""
        if owner.get('host') == self.me['host'] and owner.get('boot_id', '') == self.me['boot_id']:
            pid = owner.get('pid')
            if not isinstance(pid, int) or not _pid_exists(pid):
                return 'its process no longer exists'
            started = owner.get('pid_start')
            now = _process_start(pid)
            if started is not None and now is not None and started != now:
                return 'its process id now belongs to another process'
            return None
        if owner.get('host') == self.me['host']:
            return 'this host has restarted since'
        try:
            age = _fs_now(self.folder) - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return 'it was removed'
        if age > STALE_AFTER_S:
            return f'no heartbeat for {age:.0f} s (another host: liveness is judged by the heartbeat)'
        return None

    # -- taking and giving back
    def _create(self) -> bool:
        """Create the lock with our content, atomically; False if one exists."""
        text = json.dumps(self.me)
        tmp = f'{self.path}.tmp.{os.getpid()}'
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # fails if a lock exists; never shows a half-written one
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: an exclusive create instead
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                f.write(text)
            return True
        finally:
            os.remove(tmp)

    def _take_over(self, stale_text: str) -> bool:
        """Move the stale lock out of the way, unless another run replaced it meanwhile (then it is put back)."""
        grave = f'{self.path}.stale.{os.getpid()}'
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return False
        if self._read(grave)[1] != stale_text:  # a fresh lock of a run that took over first: give it back
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
            os.remove(grave)
            return False
        os.remove(grave)
        return True

    def acquire(self) -> Optional[str]:
        """Own the folder, or raise ``OutputError`` naming the run that does. Returns a line for the log when a
        stale lock was taken over (None otherwise)."""
        try:
            return self._acquire()
        except OSError as e:  # a full disk or a folder that became unwritable
            raise OutputError(f"could not write the lock '{self.path}': {_reason(e)}; free space or choose another "
                              f"--output") from None

    def _acquire(self) -> Optional[str]:
        note = None
        for _ in range(_TAKE_OVER_TRIES):
            if self._create():
                self.held = True
                self._start_heartbeat()
                return note
            owner, text = self._read()
            if owner is None:
                continue  # released meanwhile: try again
            why = self._gone(owner) if owner else self._unreadable_gone()
            if why is None:
                raise OutputError(f"output folder '{self.folder}' is in use by another run: {_describe(owner)}; "
                                  f"wait for it to end, or pass another --output or --tag (its lock: '{self.path}')")
            if self._take_over(text):
                removed = self._remove_temporary_files(owner.get('pid'))
                who = _describe(owner) if owner else 'an unreadable lock'
                note = (f'output folder: took over the lock of an earlier run ({who}): {why}'
                        + (f'; removed its {removed} temporary files' if removed else ''))
        raise OutputError(f"output folder '{self.folder}': could not take the lock '{self.path}' (other runs are "
                          f"starting there at the same time?); rerun, or pass another --output or --tag")

    def _unreadable_gone(self) -> Optional[str]:
        """A lock that does not parse (written by hand, or the file system lost it): gone once it is old."""
        try:
            age = _fs_now(self.folder) - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return 'it was removed'
        return f'an unreadable lock untouched for {age:.0f} s' if age > STALE_AFTER_S else None

    def _remove_temporary_files(self, pid: Any) -> int:
        """Remove the temporary files (``*.tmp.<pid>``) the run that held the lock left; no one else's."""
        if not isinstance(pid, int):
            return 0
        removed = 0
        for path in glob.glob(os.path.join(glob.escape(self.folder), f'*.tmp.{pid}')):
            try:
                os.remove(path)
                removed += 1
            except OSError:
                pass
        return removed

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass
        self._heartbeat = threading.Thread(target=beat, name='output-lock-heartbeat', daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        """Give the folder back: remove the lock if it is still ours."""
        self._stop.set()
        if not self.held:
            return
        self.held = False
        owner, _ = self._read()
        if owner and owner.get('run_id') == self.me['run_id']:
            try:
                os.remove(self.path)
            except OSError:
                pass


_held: Optional[OutputLock] = None


def lock_output_folder(folder: str) -> Optional[str]:
    """Own ``folder`` for this process until ``release_output_folder`` (see ``OutputLock.acquire``)."""
    global _held
    if _held is not None and _held.held and _held.folder == folder:
        return None
    lock = OutputLock(folder)
    note = lock.acquire()
    _held = lock
    return note


def release_output_folder() -> None:
    global _held
    if _held is not None:
        _held.release()
        _held = None
