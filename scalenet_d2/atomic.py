"""Writing outputs atomically: a reader, or a crash, never sees half a file."""

import io
import os
import tempfile
from typing import Callable, Dict, Mapping

import torch

__all__ = ["write_atomically", "bytes_writer", "torch_writer", "torch_file_writer", "atomic_torch_save"]


def write_atomically(writers: Mapping[str, Callable[[str], None]]) -> None:
    """Writes several files all or none: each writer(tmp_path) writes a temporary file beside its
    target; only when every one succeeded are they renamed into place."""
    temps: Dict[str, str] = {}
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, writer in writers.items():
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"output {path}: folder {directory} does not exist")
            base, ext = os.path.splitext(os.path.basename(path))
            fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=directory)
            os.close(fd)
            temps[path] = tmp
            writer(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the outputs private
        for path, tmp in temps.items():
            os.replace(tmp, path)
        temps.clear()
        for directory in {os.path.dirname(os.path.abspath(p)) for p in writers}:
            _fsync_directory(directory)  # the renames themselves survive a power cut
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def bytes_writer(data: bytes) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return write


def torch_writer(obj) -> Callable[[str], None]:
    """A writer of `obj` in torch.save format, serialised now (errors surface before any file is written)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return bytes_writer(buf.getvalue())


def torch_file_writer(obj) -> Callable[[str], None]:
    """A writer of `obj` in torch.save format straight to the file (no copy in memory: large
    checkpoints), flushed to disk before the rename."""

    def write(path: str) -> None:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    return write


def atomic_torch_save(obj, path: str) -> None:
    """torch.save that leaves either the old file or the complete new one, never a partial one."""
    write_atomically({path: torch_writer(obj)})
