"""File I/O at the edges: every file this project writes goes through an atomic writer here.

A writer creates a temporary file next to the target and renames it into place, so a reader (or a
resumed sweep after kill -9) sees either the old file or the complete new one, never half of it.
torch is imported by the functions that use it: the results store (utils/runs.py) writes through
this module, and train_linear.py checks its command line before torch is imported.
"""
import io
import json
import os
import socket
import tempfile
import time
from pathlib import Path


def _default_file_mode() -> int:
    """The mode a plain open() would give (0o666 minus the umask); mkstemp's 0o600 would hide
    results from collaborators."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


HOST = socket.gethostname()
# A writer's temporary file names its host and process, so a later start can tell the leftovers of a
# killed writer (its process is gone) from the live temporary file of another process.
_TMP_SUFFIX = ".tmp"
STALE_TMP_AGE_S = 24 * 3600  # a temporary file from another host is left alone for this long


def _tmp_prefix(name: str) -> str:
    return f".{name}.{HOST}.{os.getpid()}."


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a pid below 1 names no single process: kill()
    would address a whole group, so it is taken as alive and judged by its heartbeat instead)."""
    if pid < 1:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder) -> int:
    """Delete the temporary files that killed writers left in `folder` (not recursive): those of
    this host whose process is gone, and any older than a day. Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[:-len(_TMP_SUFFIX)].rsplit(".", 2)  # [.target.host, pid, random]
        try:
            mine_dead = (len(parts) == 3 and parts[0].endswith(f".{HOST}") and parts[1].isdigit()
                         and not process_alive(int(parts[1])))
            old = now - entry.stat().st_mtime > STALE_TMP_AGE_S
        except (ValueError, FileNotFoundError):
            continue
        if mine_dead or old:
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename. A failure (a full disk, a
    read-only folder) is an OSError naming `path`, not the temporary file or no file at all (a
    failed write() names none), so the user's message says where."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path.name), suffix=_TMP_SUFFIX)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise
    return path


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` with `path` as its file name (kept when it names a file of its own other than a temporary)."""
    if exc.filename is not None and not str(exc.filename).endswith(_TMP_SUFFIX):
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def torch_bytes(obj) -> bytes:
    """What torch.save writes for `obj` (tensors and plain types), in memory: the same bytes for the
    same content, so a checkpoint's hash can be taken before it is written."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_torch_bytes(data: bytes):
    """The object in `torch_bytes` output, without unrestricted unpickling (weights_only)."""
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def atomic_torch_save(path, obj) -> Path:
    """torch.save into memory, then an atomic write; objects must be tensors and plain types so
    that `load_torch_file` (weights_only=True) can read them back."""
    return atomic_write_bytes(path, torch_bytes(obj))


def atomic_save_figure(fig, stem, formats=("png", "pdf"), **savefig) -> list:
    """A matplotlib figure as stem.png, stem.pdf, ... (dpi 150 unless given), each written atomically."""
    savefig.setdefault("dpi", 150)
    written = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, **savefig)
        written.append(atomic_write_bytes(Path(f"{stem}.{fmt}"), buf.getvalue()))
    return written


def load_torch_file(path, what: str, fix: str):
    """Load a file written by `atomic_torch_save` without unrestricted unpickling.

    Raises UserError (one line naming `fix`) when the file is missing, truncated or not ours."""
    import torch

    from utils.cli import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}. {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, random bytes...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what} {path} is unreadable or not a file this tool wrote ({first[:120]}). "
                        f"{fix}") from None
