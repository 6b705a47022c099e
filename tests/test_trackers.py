"""ditlib/trackers.py: TensorBoard and W&B get every number of metrics.jsonl and the sample grids."""
import math

import pytest
from helpers import PIXEL, only_experiment, read_metrics, run_main

pytestmark = pytest.mark.device  # on CUDA when present: see helpers.DEVICE


def test_report_to_tensorboard_and_wandb_get_every_number_and_grid(tmp_path, image_folder_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B without network: the run is written for `wandb sync`
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = {}
    for tracker in ("tensorboard", "wandb"):
        run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / tracker,
                 "--global-batch-size", "8", "--max-steps", "4", "--log-every", "2", "--ckpt-every", "100",
                 "--sample-every", "4", "--sample-steps", "2", "--sample-grid-size", "4", "--report-to", tracker,
                 *PIXEL)
        runs[tracker] = only_experiment(tmp_path / tracker)
    records = read_metrics(runs["tensorboard"])
    measured = ("steps_per_sec", "images_per_sec", "peak_memory_mb")  # of the machine, not of the training
    assert [{k: v for k, v in r.items() if k not in measured} for r in records] == \
        [{k: v for k,
          v in r.items() if k not in measured} for r in read_metrics(runs["wandb"])]  # trackers change nothing
    for record in records:
        assert record["grad_norm"] > 0 and math.isfinite(record["grad_norm"])
        quartiles = [q for q in range(4) if f"loss_q{q}" in record]
        assert quartiles, record
        for q in quartiles:  # DiT learns sigma: its loss is the mse plus the vb term
            assert record[f"loss_q{q}"] == pytest.approx(record[f"mse_q{q}"] + record[f"vb_q{q}"], rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(runs["tensorboard"] / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    for record in records:
        for key, value in record.items():
            if key != "step":
                logged = {e.step: e.value for e in events.Scalars(key)}
                assert logged[record["step"]] == pytest.approx(value, rel=1e-6), key
    (grid,) = events.Images("samples")
    assert (grid.step, grid.width, grid.height) == (4, 2 * 16 + 3 * 2, 2 * 16 + 3 * 2)

    (run,) = (runs["wandb"] / "wandb").glob("offline-run-*")
    assert run.name.endswith((runs["wandb"] / "wandb-run-id").read_text().strip())
    history = next(run.glob("run-*.wandb")).read_bytes()
    assert all(key.encode() in history for key in records[0])
    assert len(list(run.rglob("media/images/samples_*.png"))) == 1

    # A resumed run continues the same W&B run and the same TensorBoard curves.
    for tracker in ("tensorboard", "wandb"):
        run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / tracker,
                 "--global-batch-size", "8", "--max-steps", "6", "--log-every", "2", "--ckpt-every", "100",
                 "--report-to", tracker, "--resume", "auto", *PIXEL)
    run_ids = {r.name.rsplit("-", 1)[-1] for r in (runs["wandb"] / "wandb").glob("offline-run-*")}
    assert run_ids == {(runs["wandb"] / "wandb-run-id").read_text().strip()}
    events = EventAccumulator(str(runs["tensorboard"] / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6]


def test_wandb_without_a_login_is_one_line_before_any_work(tmp_path, image_folder_path, monkeypatch):
    """Without a key or offline mode, wandb.init fails (at once, or after minutes without network) after
    the experiment folder exists; the check comes first, and names the ways out."""
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no `wandb login` entry
    with pytest.raises(ValueError, match=r"--report-to wandb: no W&B login here .* set WANDB_MODE=offline"):
        run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size",
                 "8", "--report-to", "wandb", *PIXEL)
    assert not (tmp_path / "r").exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / "netrc").chmod(0o600)
    from ditlib.trackers import wandb_can_start
    assert wandb_can_start()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_can_start()
