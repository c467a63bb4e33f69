"""The one rule for every file the project writes: nothing a user already had is ever lost.

1. Write to a unique temporary name beside the target, fsync it, then rename it into place
   (`atomic_write`, `atomic_output`; `replace_dir` for model directories). A reader sees the old
   file or the new one, never half of one; a kill leaves at most a hidden temporary file.
2. Refuse when the target, or any side file of it (TARGET.partial, TARGET.progress.json, TARGET.lock,
   the predictions file beside a metrics file), is an input of the same command (`refuse_overlap`).
3. Hold an exclusive lock per output for the whole run (`OutputLock`, an flock on TARGET.lock): a
   second run on the same output is refused with a message naming the other run's pid. The kernel
   drops the lock when its process dies, so a killed run never blocks the next one.
4. Check the output folder before the slow part (loading a model): it must be writable and have
   roughly enough free space (`check_writable`).

Exceptions, on purpose: train_log.jsonl is appended a line at a time (readers skip a torn last
line), and model.label's OUT.partial is appended chunk by chunk for resume; both sit behind the lock.
The Trainer writes its own checkpoints; resume skips any that a kill left incomplete.
"""

from __future__ import annotations

import contextlib
import fcntl  # POSIX only (Linux, macOS): the machines this tool trains and serves on
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

# Side files the project puts beside an output file.
SIDE_SUFFIXES = (".partial", ".progress.json", ".lock")


class OutputError(ValueError):
    """An output that cannot be written, worded for the user (which path, why, what to do)."""


class OutputBusy(OutputError):
    """Another run holds the output's lock."""


# --------------------------------------------------------------------------- paths


def side_files(target: Path | str) -> list[Path]:
    """The target and the side files a command keeps beside it."""
    target = Path(target)
    return [target, *(target.with_name(target.name + suffix) for suffix in SIDE_SUFFIXES)]


def same_path(a: Path | str, b: Path | str) -> bool:
    """The same file: equal resolved paths, or (both existing) the same inode, e.g. a hard link."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overlap(outputs: dict[str, Path | str], inputs: dict[str, Path | str]) -> None:
    """Raise OutputError if an output or one of its side files is one of the inputs.

    Keys are the option names shown to the user, e.g. {"--output": ...}, {"--data": ...}."""
    for out_name, output in outputs.items():
        for written in side_files(output):
            for in_name, source in inputs.items():
                if source is not None and same_path(written, source):
                    what = "is" if Path(written) == Path(output) else f"would write {written}, which is"
                    raise OutputError(
                        f"{out_name} {output} {what} the {in_name} file {source}: the command reads it while "
                        f"writing, so it would be overwritten; choose another {out_name}"
                    )


def tmp_path_for(target: Path) -> Path:
    """A unique hidden temporary name beside target (same folder, so the rename stays on one disk)."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_output(target: Path | str, mode: str = "wb", encoding: str | None = None) -> Iterator:
    """A handle on a temporary file that becomes `target` when the block ends without an error.

    On any error (a full disk, a kill signal turned into an exception) the temporary file is
    removed and `target` is left exactly as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(target)
    try:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write(target: Path | str, data: bytes | str) -> None:
    """Write bytes or UTF-8 text to target by rule 1."""
    if isinstance(data, str):
        with atomic_output(target, "w", encoding="utf-8") as handle:
            handle.write(data)
    else:
        with atomic_output(target, "wb") as handle:
            handle.write(data)


def atomic_write_json(target: Path | str, obj, indent: int | None = 2) -> None:
    atomic_write(target, json.dumps(obj, indent=indent, ensure_ascii=False))


# Side directories of a directory output. No '.' in their names: remote code (trust_remote_code) is
# imported as the Python module transformers_modules.<directory name>, and a '.' would make that a path.
TMP_MARK, OLD_MARK = "_tmp_", "_old_"


def side_dir(target: Path, mark: str, tag: str | int | None = None) -> Path:
    return target.parent / f"{target.name}{mark}{os.getpid() if tag is None else tag}"


def recover_dir(target: Path, log=print) -> None:
    """Leftovers of a killed earlier write of directory `target`. A kill between replace_dir's two
    renames leaves the previous version only as TARGET_old_<tag>: put it back. A half-written
    TARGET_tmp_<tag> is deleted; it never held anything the user had."""
    for pattern in (TMP_MARK + "*", ".tmp-*"):  # .tmp-*: what merges before this naming left behind
        for stale in target.parent.glob(target.name + pattern):
            shutil.rmtree(stale, ignore_errors=True)
    olds = sorted(target.parent.glob(target.name + OLD_MARK + "*"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        olds.pop().rename(target)
        log(f"restored {target} from the copy a killed run had moved aside")
    for stale in olds:
        shutil.rmtree(stale, ignore_errors=True)


def replace_dir(new: Path, target: Path, old: Path) -> None:
    """Put directory `new` at `target` with renames only: target -> old, new -> target, rm old.

    A kill between the two renames leaves the previous model as `old`; the caller's recovery puts
    it back (finetune.merge.recover_or_clean), so a loadable model is never deleted before its
    replacement is in place."""
    if target.exists():
        target.rename(old)
    new.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- checks before the work


def _nearest_existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _strerror(err: OSError) -> str:
    return err.strerror or type(err).__name__


def check_writable(folder: Path | str, need_bytes: int = 0, what: str = "--output") -> None:
    """Raise OutputError unless files can be created in `folder` (or, while it does not exist yet, in
    the folder it would be made in) with about `need_bytes` free. Probed by creating a file, since
    permission bits say nothing for root or a read-only mount. Creates no folder."""
    folder = Path(folder)
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputError(f"{what}: {existing} is a file, not a folder")
    try:
        probe = tmp_path_for(existing / "write-probe")
        with open(probe, "wb") as handle:
            handle.write(b"0")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"{what}: cannot write in {existing}: {_strerror(err)}") from None
    free = shutil.disk_usage(existing).free
    if need_bytes and free < need_bytes:
        raise OutputError(
            f"{what}: only {free / 1e6:,.1f} MB free in {existing}, about {need_bytes / 1e6:,.1f} MB needed; "
            "free some space or choose another folder"
        )


def total_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


# --------------------------------------------------------------------------- the lock


def lock_path(target: Path | str) -> Path:
    target = Path(target)
    return target.with_name(target.name + ".lock")


class OutputLock:
    """Exclusive lock of one output for one run: `with OutputLock(path, "model.label"): ...`.

    TARGET.lock holds the owner's pid, host and start time, so a refused run can say who has it.
    The lock file is removed when the run ends."""

    def __init__(self, target: Path | str, command: str):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.command = command
        self._fd: int | None = None

    def _owner(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            return f"{info.get('command', 'a run')} pid {info['pid']} on {info.get('host', '?')}, started {started}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another run (its lock file is being written)"

    def _busy(self) -> OutputBusy:
        return OutputBusy(
            f"{self.target} is being written by {self._owner()}; wait for that run to finish or choose "
            f"another output (a killed run releases it: its lock is {self.path})"
        )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputError(f"cannot create the lock file {self.path}: {_strerror(err)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            # The holder before us may have removed the file after we opened it: then our lock is on
            # a file nobody else will see. Lock the file that is at the path now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            return
        raise self._busy()

    def release(self) -> None:
        if self._fd is None:
            return
        # Remove the file while still holding the lock, so no one else can be locking this inode.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
