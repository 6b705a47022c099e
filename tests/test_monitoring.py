"""ditlib/monitoring.py: the log line's running metrics and FID during training (the grids, the
health checks and stop requests end to end in test_train.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import DDP, DDP_DEVICE, PIXEL, load, only_experiment, read_metrics, run_main, run_script

from ditlib.command_line import settings_from
from ditlib.metrics import InceptionNetwork, frechet_distance, read_npz, statistics
from ditlib.monitoring import Monitoring, RunningMetrics, rank_fid_features
from ditlib.processes import distributed
from ditlib.samplers import Sampler
from models import DiT_models


@pytest.mark.slow  # two two-process runs, the FID network twice: about a minute on 2 cores
def test_fid_monitoring_logs_the_right_fid_and_leaves_training_unchanged(tmp_path, image_folder_path,
                                                                         fidelity_inception_path):
    # torch-fidelity's own network class: building it draws random numbers, which must not reach
    # the DiT's initialisation or the training stream.

    import train
    inception = ["--inception", fidelity_inception_path]
    run_main("evaluate.py", image_folder_path, "--image-size", "16", "--save-stats", tmp_path / "ref.npz", *inception)
    # A fast EMA, so its samples (and FID) change between evaluations and tell the weights apart.
    common = ["--data-path", image_folder_path, "--global-batch-size", "4", "--max-steps", "4", "--log-every", "1",
              "--ckpt-every", "4", "--lr", "1e-2", "--ema-decay", "0.5", *PIXEL]
    run_script("train.py", *common, *DDP, "--results-dir", tmp_path / "plain", nproc=2)
    run_script("train.py", *common, *DDP, "--results-dir", tmp_path / "fid", "--fid-every", "2", "--fid-ref",
               tmp_path / "ref.npz", "--fid-samples", "5", "--fid-sampler", "dpm++", "--fid-steps", "3", *inception,
               nproc=2)
    experiment = only_experiment(tmp_path / "fid")
    fids = [r for r in read_metrics(experiment) if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4]
    assert all(r["fid_samples"] == 5 and (r["fid_sampler"], r["fid_steps"]) == ("dpm++", 3) for r in fids)
    assert "EMA weights, dpm++ 3 steps, cfg-scale 1.0" in (experiment / "log.txt").read_text()
    losses = [r["loss"] for r in read_metrics(experiment) if "loss" in r]
    assert losses == [r["loss"] for r in read_metrics(only_experiment(tmp_path / "plain"))]  # training RNG untouched
    plain_ema = load(only_experiment(tmp_path / "plain") / "checkpoints" / "0000004.pt")["ema"]
    checkpoint = load(experiment / "checkpoints" / "0000004.pt")
    assert all(torch.equal(plain_ema[k], v) for k, v in checkpoint["ema"].items())

    # The logged FID at step 4 is that of the saved EMA's samples, each rank's share included.
    ema = DiT_models["DiT-Nano/4"](input_size=16, in_channels=3, num_classes=2)
    ema.load_state_dict(checkpoint["ema"])
    settings = settings_from(Monitoring, vars(train.parse_args([*map(str, common), "--fid-samples", "5",
                                                                 "--fid-sampler", "dpm++", "--fid-steps", "3"])))
    network = InceptionNetwork(str(fidelity_inception_path), torch.device(DDP_DEVICE))
    ema = ema.eval().to(DDP_DEVICE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run's processes
    try:
        shares = [rank_fid_features(ema, None, network, Sampler("dpm++", 3), settings, rank, 2, 3, 16, 2,
                                    torch.device(DDP_DEVICE)) for rank in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    assert [len(share) for share in shares] == [3, 2]
    expected = frechet_distance(statistics(np.concatenate(shares)), read_npz(tmp_path / "ref.npz"))
    assert fids[1]["fid"] == pytest.approx(expected, rel=1e-3)
    assert fids[0]["fid"] != fids[1]["fid"]


def test_loss_terms_are_averaged_by_timestep_quartile():
    with distributed("cpu"):
        running = RunningMetrics(1000, torch.device("cpu"))
        t = torch.tensor([0, 249, 250, 999, 998])
        running.add_terms(t, {"loss": torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0]), "mse": torch.tensor([1.0, 1, 1, 1, 1])})
        running.add_step(torch.tensor(2.0), torch.tensor(3.0))
        running.add_step(torch.tensor(4.0), torch.tensor(float("inf")))  # an fp16 step the scaler skipped
        record = running.reduce()
    assert record == {"loss": 3.0, "grad_norm": 3.0, "loss_q0": 1.5, "loss_q1": 3.0, "loss_q3": 5.0,
                      "mse_q0": 1.0, "mse_q1": 1.0, "mse_q3": 1.0}  # no sample in q2, no vb term


def fid_share_with_a_stop(rank: int, store_path: str, out_dir: str, stop_after: int) -> None:
    """One of two ranks sampling its FID share; rank 1 is asked to stop after stop_after batches."""
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        ema = DiT_models["DiT-Nano/4"](input_size=16, in_channels=3, num_classes=2).eval()
        stop, batches = {"name": None}, []

        def network(images):
            batches.append(len(images))
            if rank == 1 and len(batches) == stop_after:
                stop["name"] = "SIGTERM"
            return (torch.zeros(len(images), 2048),)

        settings = Monitoring(fid_samples=5, num_classes=2)
        share = rank_fid_features(ema, None, network, Sampler("ddim", 2), settings, rank, 2, 3, 16, 2,
                                  torch.device("cpu"), stop)
        result = {"batches": batches, "rows": None if share is None else len(share)}
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stop_after,expected", [
    (99, [{"batches": [2, 1], "rows": 3}, {"batches": [2], "rows": 2}]),  # uneven shares, no stop
    (1, [{"batches": [2], "rows": None}, {"batches": [2], "rows": None}]),  # rank 1 stopped: both end
])
def test_a_stop_on_any_rank_ends_every_ranks_fid_share_at_the_next_batch(tmp_path, stop_after, expected):
    """Issue 34 case 7: an FID during training ran to its end after SIGTERM. Every rank asks before
    each batch (the same number of times, though rank 0's share can be a batch longer)."""
    mp.spawn(fid_share_with_a_stop, args=(str(tmp_path / "store"), str(tmp_path), stop_after), nprocs=2)
    assert [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)] == expected
