"""File I/O at the edges: every file this project writes goes through an atomic writer here.

A writer creates a temporary file next to the target and renames it into place, so a reader (or a
resumed sweep after kill -9) sees either the old file or the complete new one, never half of it.
"""
import io
import json
import os
import tempfile
from pathlib import Path

import torch


def _default_file_mode() -> int:
    """The mode a plain open() would give (0o666 minus the umask); mkstemp's 0o600 would hide
    results from collaborators."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def atomic_write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_torch_save(path, obj) -> Path:
    """torch.save into memory, then an atomic write; objects must be tensors and plain types so
    that `load_torch_file` (weights_only=True) can read them back."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


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
    from utils.cli import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}. {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, random bytes...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what} {path} is unreadable or not a file this tool wrote ({first[:120]}). {fix}") from None
