"""Writing files so that a kill, a full disk or a failed write never leaves a wrong or half file.

Every file a script produces (checkpoints, sample PNGs, .npz batches, statistics, downloads) is
written through atomic_write: to a temporary name beside it, then renamed over it in one step.
"""
import errno
import hashlib
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

import torch

# .{final name}.{pid}-{8 hex}.tmp: the names atomic_write gives its temporary files (and, before
# it, the mkstemp names .{final name}.{random}.tmp of earlier versions).
TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_-]+\.tmp$")


@contextmanager
def atomic_write(path: Union[str, Path], expected_bytes: Optional[int] = None) -> Iterator[BinaryIO]:
    """A binary handle whose contents replace `path` only once they are completely written and
    synced. The temporary file gets the permissions any new file gets (0666 less the umask) and is
    removed if the write fails. A full disk is one OSError naming the path, the bytes needed
    (expected_bytes, else what was written before the disk filled) and what is free."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    written = 0
    try:
        with open(tmp, "xb") as handle:
            yield handle
            written = handle.tell()
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        written = written or (tmp.stat().st_size if tmp.exists() else 0)
        tmp.unlink(missing_ok=True)
        limit = storage_limit(error)
        needed = f"{format_bytes(expected_bytes)} needed" if expected_bytes else \
            f"more than the {format_bytes(written)} written before it stopped"
        if limit == errno.EFBIG:
            raise OSError(errno.EFBIG, f"cannot write {path}: File too large ({needed}; the process's file-size "
                                       f"limit, ulimit -f, or the file system's largest file); files already "
                                       f"there are intact") from None
        if limit is not None:
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC, f"cannot write {path}: No space left on device ({needed}, "
                                        f"{format_bytes(free)} free); files already there are intact") from None
        raise


@contextmanager
def atomic_folder(path: Union[str, Path]) -> Iterator[Path]:
    """A new folder to fill, which replaces `path` only once it is complete: a failed or killed
    write never leaves half a folder, nor one whose files mix an earlier version's with this one's.
    A kill between the two renames leaves the earlier folder beside it as .{name}.*.old."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            earlier = staging.with_suffix(".old")
            path.rename(earlier)
            staging.rename(path)
            shutil.rmtree(earlier)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def storage_limit(error: BaseException) -> Optional[int]:
    """The errno of a full disk, a quota or a file-size limit behind an error, however deeply it is
    chained (torch.save reports one as a RuntimeError from its zip writer with the OSError as its
    context); None when it is none of these."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def atomic_torch_save(obj, path: Union[str, Path]) -> None:
    """torch.save through atomic_write: a kill, a failure or a full disk never leaves half a file."""
    with atomic_write(path, expected_bytes=tensor_bytes(obj)) as handle:
        torch.save(obj, handle)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """A text file (a report, a JSON record) written through atomic_write."""
    with atomic_write(path) as handle:
        handle.write(text.encode())


def tensor_bytes(obj) -> int:
    """The bytes of all tensors in a nested dict/list (about the size torch.save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def remove_stale_temporaries(folder: Union[str, Path], older_than: float) -> tuple[int, int]:
    """Delete the temporary files atomic_write leaves when its process is killed mid-write, if they
    were last modified before `older_than` (a live writer keeps touching its own). Returns (files, bytes)."""
    count = freed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    for path in folder.iterdir():
        if TEMPORARY_NAME.match(path.name) and path.is_file():
            stat = path.stat()
            if stat.st_mtime < older_than:
                path.unlink(missing_ok=True)
                count, freed = count + 1, freed + stat.st_size
    return count, freed


def require_writable(folder: Union[str, Path], contents: str) -> None:
    """Create, sync and remove a small file in folder, so that one a run cannot write in (its
    permissions, a read-only mount, a quota) is found before the work whose results it is to hold.
    A probe left by a kill has atomic_write's temporary name, which remove_stale_temporaries clears."""
    probe = Path(folder) / f".write-probe.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(probe, "xb") as handle:
            handle.write(b"\0")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        probe.unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write in {folder} ({contents}): {error.strerror or error}; "
                                   f"checked before any work") from None


def check_output_folder(folder: Union[str, Path], what: str) -> None:
    """Find out before the work whose results an output folder (`what`: the flag that names it) is
    to hold whether they can be written there (a file in the way, or a read-only destination, was
    found only when they were). Nothing is created: the folder is probed if it exists, else the
    nearest folder above it, where it will be made."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {folder} is a file, not a folder" if existing == folder.absolute() else
                         f"{what}: {folder} cannot be created, as {existing} is a file")
    require_writable(existing, what)


def check_output_file(path: Union[str, Path], flag: str) -> None:
    """An output file's folder, checked and created before the work whose result it is to hold."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    check_output_folder(path.parent, f"the folder of {flag} {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)


def file_digest(path: Union[str, Path]) -> str:
    """SHA-256 of a file, read in 16 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def format_bytes(count: float) -> str:
    if count < 1000:
        return f"{int(count)} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        count /= 1000
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}"
