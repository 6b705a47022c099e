"""Experiment trackers for train.py --report-to: TensorBoard or Weights & Biases, beside metrics.jsonl.

Both are optional installs. Only rank 0 reports. Each record of metrics.jsonl is sent as it is
written (its numbers, under the same names), and each sample grid as an image.
"""
import netrc
import os
import secrets
import urllib.parse
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ditlib.errors import first_line
from ditlib.files import atomic_write

REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def require_tracker(report_to: str) -> None:
    """A one-line error, before any work, when the chosen tracker is not installed."""
    if report_to == "none":
        return
    try:
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (needs the tensorboard package)
        else:
            import wandb  # noqa: F401
    except ImportError:  # a ValueError: the scripts print it as one line
        raise ValueError(f"--report-to {report_to} needs the {PACKAGES[report_to]} package: "
                          f"pip install {PACKAGES[report_to]} (or pip install -r requirements-trackers.txt)") from None
    if report_to == "wandb" and not wandb_can_start():
        raise ValueError("--report-to wandb: no W&B login here (no WANDB_API_KEY, no `wandb login` entry in ~/.netrc); "
                         "log in, or set WANDB_MODE=offline to log locally and upload later with `wandb sync`")


def wandb_can_start() -> bool:
    """Offline or disabled runs need no account; online ones a key in the environment or ~/.netrc."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def numbers(record: dict) -> dict:
    """The record's numeric entries except the step (strings such as the FID sampler stay in the JSON)."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoard:
    """Event files in <experiment>/tensorboard. A resumed run first drops the events a killed run
    wrote after its last checkpoint (purge_step), so every curve is the resumed run's."""

    def __init__(self, experiment_dir: Path, flags: dict, resumed_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(experiment_dir / "tensorboard"),
                                    purge_step=None if resumed_step is None else resumed_step + 1)
        if resumed_step is None:
            self.writer.add_text("args", "\n".join(f"    --{k.replace('_', '-')} {v}" for k, v in flags.items()))

    def log(self, record: dict) -> None:
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per experiment folder: its id is kept in <experiment>/wandb-run-id, so a resumed
    run continues it. Values are plotted against the training step ("step"), which stays correct
    when a resumed run repeats steps a killed one had logged. WANDB_MODE=offline works without
    network (upload later with `wandb sync`); WANDB_PROJECT picks the project (default DiT)."""

    def __init__(self, experiment_dir: Path, flags: dict, resumed_step: Optional[int]):
        import wandb
        id_file = experiment_dir / "wandb-run-id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            with atomic_write(id_file) as handle:
                handle.write(f"{run_id}\n".encode())
        self.wandb = wandb
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "DiT"), name=experiment_dir.name, id=run_id,
                                  resume="allow", dir=str(experiment_dir), config=flags)
        except Exception as error:  # no network, a refused key: one line, not the client's traceback
            raise OSError(f"--report-to wandb: W&B could not start the run ({type(error).__name__}: "
                          f"{first_line(error)}); set WANDB_MODE=offline to log locally and upload later with "
                          f"`wandb sync`") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, record: dict) -> None:
        self.run.log({**numbers(record), "step": record["step"]})

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path)), "step": step})

    def close(self) -> None:
        self.run.finish()


def open_tracker(report_to: str, experiment_dir: Path, flags: dict, resumed_step: Optional[int]):
    """The tracker chosen by --report-to (rank 0 calls this), or None."""
    return {"none": lambda *a: None, "tensorboard": TensorBoard, "wandb": WandB}[report_to](
        experiment_dir, flags, resumed_step)
