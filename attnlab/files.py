"""One home for writing files that must never be half-written, and for the git commit a result records.

``atomic_write(path, write)`` runs ``write(f)`` into a temp file beside ``path`` (``.<name>.<random>.tmp``), flushes
and fsyncs it, ``os.replace``-s it over ``path`` and fsyncs the folder: a crash or failed write at any instant
leaves either the old file or the new one, never a torn one. ``atomic_path(path)`` is the same for writers that want
a file name (the ONNX exporter). The temp file is created with mode 0666 less the umask, like any other file
(``tempfile.mkstemp`` would make it 0600). Failures are one-line AttnlabErrors: a full disk says so and that the
previous file is kept, a read-only or forbidden destination names the path. ``remove_stale_temps(folder)`` deletes
temp files a kill left. ``held_lock(path)`` serialises read-modify-writes of one file by several processes.

Fault injection (tests, benchmarks/reliability.py): with ``ATTNLAB_KILL_IN_WRITE=<file name>:<n>`` the process
SIGKILLs itself during its n-th atomic write of a file of that name, after the temp file is written and before it
replaces the old one: the instant a crash must not change anything.
"""
import errno
import fcntl
import io
import json
import os
import secrets
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

from .errors import AttnlabError

TEMP_SUFFIX = ".tmp"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def atomic_write(path, write, what: str = "file") -> Path:
    """``write(f)`` (f a binary file) to ``path`` atomically; ``what`` names the file in errors ("checkpoint")."""
    path = Path(path)
    with atomic_path(path, what) as tmp:
        raw = _RecordingWriter(tmp)
        try:
            with io.BufferedWriter(raw, buffer_size=1 << 20) as f:
                write(f)
                f.flush()
                _maybe_kill(path.name)
                os.fsync(raw.fd)
        except Exception as err:
            raise raw.error or err  # torch hides an OSError from our write behind its own RuntimeError
    return path


def atomic_write_bytes(path, data: bytes, what: str = "file") -> Path:
    return atomic_write(path, lambda f: f.write(data), what)


def atomic_write_text(path, text: str, what: str = "file") -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_write_json(path, obj, what: str = "file") -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", what)


@contextmanager
def atomic_path(path, what: str = "file"):
    """Yield a fresh temp file name beside ``path``; on success it replaces ``path``, on any failure it is removed
    and the error is an AttnlabError (disk full / read-only / other OSError) naming ``path``."""
    path = _destination(Path(path), what)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 & ~umask
        yield tmp
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself reaches the disk, not only the file's data
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, AttnlabError) or not isinstance(err, Exception):
            raise
        raise write_error(err, path, what) from err


def _destination(path: Path, what: str) -> Path:
    """The file an atomic write replaces: a symlink's target (the link then points at the new file; replacing the
    link itself would cut it off). A device, FIFO or socket is refused: the rename would put a regular file in its
    place (``profile --out /dev/full`` run as root turned /dev/full into a JSON file)."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file() and not path.is_dir():
        raise AttnlabError(f"cannot write the {what} to {path}: it is a device, FIFO or socket, not a regular file")
    return path


@contextmanager
def held_lock(path, what: str = "file"):
    """Hold an exclusive lock for a read-modify-write of ``path`` (e.g. latency.json by two benches): on a sidecar
    ``.<name>.lock`` beside it, because the atomic replace gives ``path`` a new inode, which would drop a lock held
    on the file itself. Other holders wait; the kernel drops the lock when its holder dies."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.parent / f".{path.name}.lock", "a")
    except OSError as err:
        raise write_error(err, path, what) from err
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened for reading: the replace has happened, durability is best effort
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def save_figure(fig, path, what: str = "plot", **savefig_kwargs) -> Path:
    """A matplotlib figure written to ``path`` atomically (its format from the suffix), so a kill never leaves
    half a PNG where a committed plot was."""
    path = Path(path)
    with atomic_path(path, what) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return path


def write_error(err: Exception, path, what: str = "file") -> Exception:
    """The one-line AttnlabError for a failed write of ``path`` (the error itself if it is not about the disk)."""
    code = getattr(err, "errno", None)
    if Path(path).is_dir():
        return AttnlabError(f"cannot write {what} {path}: it is a folder; give a file path")
    kept = f"the previous {what} is kept" if Path(path).is_file() else f"no {what} was written"
    if code == errno.ENOSPC or "No space left" in str(err):
        return AttnlabError(f"no space left on device writing {path}; {kept}")
    if code in _READ_ONLY:
        return AttnlabError(f"cannot write {path}: {os.strerror(code).lower()} (choose a writable location)")
    if isinstance(err, OSError):
        return AttnlabError(f"could not write {what} {path} ({err.strerror or err}); {kept}")
    first = str(err).splitlines()[0] if str(err) else ""
    return AttnlabError(f"could not write {what} {path} ({type(err).__name__}: {first}); {kept}")


def portable_path(path) -> str:
    """``path`` as a record should keep it: relative to the working directory (the repository root, where attnlab
    runs) when it lies inside it, so records and reports read the same in any clone; else as given."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def writable_dir(folder, what: str = "output directory") -> Path:
    """Create ``folder`` (and parents) or raise a one-line AttnlabError saying why it cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in _READ_ONLY:
            raise AttnlabError(f"cannot create {what} {folder}: {os.strerror(err.errno).lower()} "
                               "(choose a writable location)") from None
        raise AttnlabError(f"cannot create {what} {folder}: {err.strerror or err}") from None
    return folder


def remove_stale_temps(folder) -> list[Path]:
    """Delete the temp files (``.<name>.<random>.tmp``) a killed writer left in ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        _remove(p)
    return stale


def git_commit(short: bool = False) -> str | None:
    """The commit of the attnlab source tree that is running, or None outside a git checkout."""
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        out = subprocess.run(cmd, cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


_WRITES: dict[str, int] = {}


def _maybe_kill(name: str) -> None:
    target = os.environ.get("ATTNLAB_KILL_IN_WRITE")
    if not target:
        return
    want, _, nth = target.rpartition(":")
    if want == name:
        _WRITES[name] = _WRITES.get(name, 0) + 1
        if _WRITES[name] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)


def _write_bytes(fd: int, data) -> int:
    """One os.write (the seam tests use to simulate a full disk)."""
    return os.write(fd, data)


class _RecordingWriter(io.RawIOBase):
    """Unbuffered writes to ``path`` that remember the OSError the OS gave (torch.save turns it into a RuntimeError
    saying 'unexpected pos')."""

    def __init__(self, path):
        super().__init__()
        self.fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        self.error = None

    def writable(self):
        return True

    def write(self, data):
        try:
            return _write_bytes(self.fd, data)
        except OSError as err:
            self.error = self.error or err
            raise

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


def _remove(p) -> None:
    """Delete ``p`` if it is there. A read-only filesystem answers EROFS even for a file that does not exist (a temp
    file whose creation it refused), so only an error about a file that exists is raised."""
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError:
        if os.path.lexists(p):
            raise
