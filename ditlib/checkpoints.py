"""Reading checkpoint files safely: why a .pt is refused, what a damaged one looks like, and where
the DiT weights sit inside the kinds of file users have (ours, the official train.py's, a bare
state dict, .safetensors)."""
import errno
import pickle
import types
from pathlib import Path
from typing import Union

import torch

from ditlib.errors import first_line

# The official train.py pickles its parsed flags, a Namespace object. This is the global's name in
# those files (data, not an import): it is read back as a types.SimpleNamespace with the same
# attributes, and no other class is unpickled.
NAMESPACE = "argparse.Namespace"
CHECKPOINT_GLOBALS = [(types.SimpleNamespace, NAMESPACE)]


class DamagedCheckpoint(ValueError):
    """The file is there and readable but is not a loadable checkpoint: truncated, overwritten, or
    not a PyTorch file at all. Only this moves a checkpoint aside under --resume auto; an I/O error
    (EIO, EACCES, a lost mount, no memory) is an OSError or MemoryError and touches nothing."""


# Errors of the storage, not of the bytes: the file may be fine, so it is reported and left alone.
IO_ERRNOS = {errno.EIO, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN,
             errno.EHOSTDOWN, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ENXIO, errno.ENODEV,
             errno.EREMOTEIO, errno.ECONNRESET, errno.ENOLINK}


def read_checkpoint(path: Union[str, Path]):
    """torch.load with weights_only=True, allowing the official flags' Namespace and nothing else, so official
    train.py checkpoints load while pickled code is never run. A file that needs any other global
    is refused with a one-line error that names it and says how to convert a trusted file. A file
    whose bytes are wrong is a DamagedCheckpoint; a failure of the storage or the memory is an
    OSError or MemoryError naming the file."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        foreign = [name for name in unsafe_globals(path, error) if name != NAMESPACE]
        if foreign:
            raise ValueError(
                f"{path} needs the Python global(s) {', '.join(foreign)} to load, which a checkpoint of weights does "
                f"not; loading it would run code from the file, so it is refused. If you trust the file, convert it "
                f"once: python -c \"import torch; c = torch.load('{path}', weights_only=False); "
                f"c = c.state_dict() if hasattr(c, 'state_dict') else {{k: c[k] for k in ('model', 'ema') if k in c}}; "
                f"torch.save(c, 'converted.pt')\"") from None
        failure = error
    except MemoryError:
        raise MemoryError(f"not enough memory to read {path}") from None
    except Exception as error:
        failure = error
    storage = storage_error(failure)
    if storage is None:
        storage = read_through(path)  # the bytes read back: if they cannot, the storage failed, not the file
    if storage is not None:
        raise OSError(storage.errno, f"cannot read {path}: {storage.strerror or first_line(storage)} (the file was "
                                     f"left as it is)") from None
    raise DamagedCheckpoint(f"{path} is not a readable PyTorch checkpoint ({type(failure).__name__}: "
                            f"{first_line(failure)})") from None


def storage_error(error: BaseException):
    """The OSError of the storage behind an error (torch.load wraps some in RuntimeError), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in IO_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def read_through(path: Union[str, Path]):
    """None when every byte of the file can be read, else the OSError reading it raised."""
    try:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    except OSError as error:
        return error
    return None


def unsafe_globals(path: Union[str, Path], error: Exception) -> list:
    """The globals (module.name) a checkpoint would import, without unpickling it."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: read the name from the unpickler's own message
        marker = "Unsupported global: GLOBAL "
        text = str(error)
        return [text.split(marker, 1)[1].split()[0]] if marker in text else []


def checkpoint_args(checkpoint) -> dict:
    """A train.py checkpoint's saved command line as a dict: ours store a dict, the official script
    a Namespace (read back as a SimpleNamespace); anything else (a bare state dict) has none."""
    if not isinstance(checkpoint, dict):
        return {}
    args = checkpoint.get("args")
    if isinstance(args, types.SimpleNamespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def weights_in(checkpoint, path: Union[str, Path], weights: str = "ema") -> dict:
    """The state dict a loaded checkpoint holds: train.py checkpoints (ours and the official
    script's, recognised by their "ema" entry as the official find_model does) give `weights`."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a train.py checkpoint")
    if isinstance(checkpoint.get("ema"), dict) or isinstance(checkpoint.get("model"), dict):  # a train.py checkpoint
        if not isinstance(checkpoint.get(weights), dict):
            raise ValueError(f"{path} is a training checkpoint without {weights!r} weights")
        return checkpoint[weights]
    return checkpoint


def load_state_dict(path: Union[str, Path], weights: str = "ema") -> dict:
    """The DiT weights in a checkpoint file, read safely (see read_checkpoint)."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    return weights_in(read_checkpoint(path), path, weights)
