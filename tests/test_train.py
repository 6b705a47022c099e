"""train.py end to end on CPU: DDP, resume, grids, accumulation, fine-tuning, errors, reliability."""
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from helpers import (
    DDP,
    DDP_DEVICE,
    DEVICE,
    PIXEL,
    ROOT,
    assert_same_state,
    latent_args,
    load,
    make_image_folder,
    only_experiment,
    read_metrics,
    run_main,
    run_script,
)
from PIL import Image

from diffusion import create_diffusion
from ditlib.errors import SettingError
from ditlib.files import atomic_torch_save
from models import DiT

pytestmark = pytest.mark.device  # on CUDA when present: see helpers.DEVICE


def test_torchrun_two_processes(tmp_path, image_folder_path):
    result = run_script("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / "results",
                        "--global-batch-size", "4", "--max-steps", "3", "--log-every", "1", "--ckpt-every", "100",
                        *PIXEL, *DDP, nproc=2)
    experiment = only_experiment(tmp_path / "results")
    assert experiment.name == "000-DiT-Nano-4"
    assert [p.name for p in (experiment / "checkpoints").iterdir()] == ["0000003.pt"]
    log = (experiment / "log.txt").read_text()
    assert "(step=0000003) Train Loss:" in log
    assert f"2 process(es) on {'cpu' if DDP_DEVICE == 'cpu' else 'cuda:0'}" in log
    assert "Time Left: 0:00:00" in log.split("(step=0000003)")[1].splitlines()[0]  # the last of 3 steps
    assert "model and EMA identical on all 2 ranks" in log  # the EMA starts from the broadcast weights
    records = read_metrics(experiment)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["images_per_sec"] == pytest.approx(4 * r["steps_per_sec"]) for r in records)
    checkpoint = load(experiment / "checkpoints" / "0000003.pt")
    assert checkpoint["args"]["global_batch_size"] == 4 and checkpoint["train_steps"] == 3
    assert len(checkpoint["rng"]) == 2
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # three two-process runs through a VAE: about a minute on 2 cores (make test resumes in-process)
def test_resume_is_bit_identical_across_ranks_epochs_and_vae(tmp_path, image_folder_path, tiny_vae_path):
    # 16 images, global batch 4 on 2 ranks: 4 steps per epoch, so 7 steps cross an epoch boundary
    # and the stop at step 3 falls mid-epoch. Flips, VAE draws, label dropout and noise all use RNG.
    common = ["--data-path", image_folder_path, "--global-batch-size", "4", "--log-every", "1",
              "--ckpt-every", "100", "--lr", "1e-3", "--ema-decay", "0.9", *latent_args(tiny_vae_path)]
    common += DDP
    run_script("train.py", *common, "--results-dir", tmp_path / "straight", "--max-steps", "7", nproc=2)
    run_script("train.py", *common, "--results-dir", tmp_path / "split", "--max-steps", "3", nproc=2)
    resumed = run_script("train.py", *common, "--results-dir", tmp_path / "split", "--max-steps", "7",
                         "--resume", "auto", nproc=2)
    assert "Resumed from" in resumed.stderr and "(epoch 0, batch 3)" in resumed.stderr
    straight = only_experiment(tmp_path / "straight")
    split = only_experiment(tmp_path / "split")
    a, b = load(straight / "checkpoints" / "0000007.pt"), load(split / "checkpoints" / "0000007.pt")
    assert (a["epoch"], a["position"]) == (b["epoch"], b["position"]) == (1, 3)
    assert_same_state(a, b)
    assert [r["loss"] for r in read_metrics(straight)] == [r["loss"] for r in read_metrics(split)]


def test_resume_from_a_path_continues_that_experiment(tmp_path, image_folder_path):
    # Two persistent data-loader workers, 2 steps per epoch: the resumed run crosses epochs as the
    # straight one does and ends with the same weights.
    args = ["--data-path", image_folder_path, "--global-batch-size", "8", "--log-every", "1", "--ckpt-every", "100",
            *PIXEL, "--num-workers", "2"]
    run_main("train.py", *args, "--results-dir", tmp_path / "straight", "--max-steps", "5")
    results = ["--results-dir", tmp_path / "results"]
    run_main("train.py", *args, *results, "--max-steps", "3", "--resume", "auto")  # nothing to resume: a fresh start
    experiment = only_experiment(tmp_path / "results")
    run_main("train.py", *args, *results, "--max-steps", "5", "--resume", experiment / "checkpoints" / "0000003.pt")
    assert only_experiment(tmp_path / "results") == experiment
    assert [r["step"] for r in read_metrics(experiment)] == [1, 2, 3, 4, 5]
    straight = load(only_experiment(tmp_path / "straight") / "checkpoints" / "0000005.pt")
    assert_same_state(load(experiment / "checkpoints" / "0000005.pt"), straight)
    # From step 3 again, now that the run went on to 5: a branch in a new folder, the first run left whole.
    run_main("train.py", *args, *results, "--max-steps", "5", "--resume", experiment / "checkpoints" / "0000003.pt")
    branch = tmp_path / "results" / "001-DiT-Nano-4"
    assert [r["step"] for r in read_metrics(experiment)] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_metrics(branch)] == [4, 5]
    assert "Branching from" in (branch / "log.txt").read_text()
    assert sorted(p.name for p in (branch / "checkpoints").iterdir()) == ["0000005.pt"]
    assert_same_state(load(branch / "checkpoints" / "0000005.pt"), straight)


def test_resume_from_another_models_checkpoint_names_the_mismatch(tmp_path, image_folder_path, trained_checkpoint):
    with pytest.raises(ValueError, match=r"--resume .*0000003.pt: the run was started with other values of flags that "
                                         r"define the model, its data or its start \(--image-size 32 -> 16; "
                                         r"--model DiT-Nano/2 -> DiT-Nano/4; --vae .*tiny-vae -> none\); start a new"):
        run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size",
                 "4", *PIXEL, "--resume", trained_checkpoint)


def test_mixed_precision_and_checkpointing_train(tmp_path):
    # One class of flat grey images: easy enough that 40 steps must cut the loss clearly.
    data = make_image_folder(tmp_path / "flat", classes=1, per_class=16)
    for png in data.rglob("*.png"):
        from PIL import Image
        Image.new("RGB", (16, 16), (200, 60, 30)).save(png)
    for precision in ("bf16", "fp16"):
        results = tmp_path / precision
        run_main("train.py", "--data-path", data, "--results-dir", results, "--global-batch-size", "4",
                 "--max-steps", "40", "--log-every", "10", "--ckpt-every", "100", "--lr", "3e-3",
                 "--warmup-steps", "5", "--grad-checkpointing", "--grad-clip", "1.0",
                 "--mixed-precision", precision, *PIXEL[:-6], "--num-classes", "1", "--num-workers", "0")
        losses = [r["loss"] for r in read_metrics(only_experiment(results))]
        assert losses[-1] < 0.5 * losses[0], (precision, losses)


def test_sample_grid_and_sigterm_checkpoint(tmp_path, image_folder_path):
    results = tmp_path / "results"
    command = [sys.executable, "train.py", "--data-path", str(image_folder_path), "--results-dir", str(results),
               "--global-batch-size", "4", "--log-every", "1", "--ckpt-every", "100000", "--sample-every", "2",
               "--sample-steps", "4", "--sample-grid-size", "4", *PIXEL]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    for line in process.stdout:
        if "(step=0000003)" in line or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    output = process.stdout.read()
    assert process.wait(timeout=60) == 0, output
    assert "Stopped by SIGTERM" in output
    experiment = only_experiment(results)
    checkpoints = sorted((experiment / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and int(checkpoints[0].stem) >= 3
    grid = experiment / "samples" / "0000002.png"
    from PIL import Image
    assert Image.open(grid).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 grid, torchvision's 2px padding


def test_sigterm_interrupts_a_running_fid_and_checkpoints_its_step(tmp_path, image_folder_path):
    """Issue 34 case 7: a SIGTERM during FID-in-training waited for the FID (5 min 28 s), past a
    scheduler's grace period, and no checkpoint of that step was due. Now the FID stops within a
    batch and the step is saved."""
    from helpers import fid_network_path
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    command = [sys.executable, "train.py", "--data-path", str(image_folder_path), "--results-dir",
               str(tmp_path / "r"), "--global-batch-size", "4", "--log-every", "1", "--ckpt-every", "1000",
               "--fid-every", "2", "--fid-ref", str(tmp_path / "ref.npz"), "--fid-samples", "100000",
               "--fid-steps", "2", "--inception", str(fid_network_path()), *PIXEL]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "(step=0000002) Train Loss" in line:
            break
    time.sleep(3)  # inside the FID: 100,000 samples take hours here
    process.send_signal(signal.SIGTERM)
    try:
        output = "".join(lines) + process.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the run was still in its FID 60 s after SIGTERM:\n" + "".join(lines) + process.communicate()[0])
    assert process.returncode == 0, output
    assert re.search(r"\(step=0000002\) FID-100000 not measured: stopped by SIGTERM after [\d.]+ s", output), output
    assert "Stopped by SIGTERM at step 2" in output
    experiment = only_experiment(tmp_path / "r")
    assert [p.name for p in (experiment / "checkpoints").iterdir()] == ["0000002.pt"]
    assert load(experiment / "checkpoints" / "0000002.pt")["train_steps"] == 2
    assert not any("fid" in r for r in read_metrics(experiment))


def test_a_checkpoint_folder_that_cannot_be_written_is_found_before_training(tmp_path, image_folder_path,
                                                                             monkeypatch):
    """Issue 34 case 9: checkpoints/ that the run may not write in was found at the first save,
    after the steps were trained. Now it is the first thing found, in one line."""
    from helpers import refuse_writes_in
    common = ["--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size", "4",
              "--max-steps", "3", "--ckpt-every", "3", "--log-every", "1", *PIXEL]
    run_main("train.py", *common)
    checkpoints = only_experiment(tmp_path / "r") / "checkpoints"
    refuse_writes_in(monkeypatch, checkpoints)
    with pytest.raises(PermissionError, match=f"cannot write in {re.escape(str(checkpoints))} \\(where the "
                                              f"checkpoints go\\): Permission denied; checked before any work"):
        run_main("train.py", *common, "--max-steps", "6", "--resume", "auto")
    log = (checkpoints.parent / "log.txt").read_text()
    assert log.count("Train Loss") == 3 and "Resumed" not in log  # nothing trained after the first run
    assert [p.name for p in checkpoints.iterdir()] == ["0000003.pt"]


def test_a_local_vae_retrained_in_place_is_not_resumed_into(tmp_path, image_folder_path, tiny_vae_path):
    """Issue 34, second pass: the run recorded a local VAE by its path only, so a resume after the
    folder was rewritten went on training in the new VAE's latents, exit 0."""
    from diffusers.models import AutoencoderKL
    shutil.copytree(tiny_vae_path, tmp_path / "vae")
    common = ["--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size", "4",
              *latent_args(tmp_path / "vae")]
    run_main("train.py", *common, "--max-steps", "1")
    run_main("train.py", *common, "--max-steps", "2", "--resume", "auto")  # the same files: it goes on
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(2)
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match=rf"other values of flags that define the model, its data or its start \(the "
                                         rf"files of --vae {re.escape(str(tmp_path / 'vae'))} \(SHA-256 [0-9a-f]{{64}} "
                                         rf"-> [0-9a-f]{{64}}\)\)"):
        run_main("train.py", *common, "--max-steps", "3", "--resume", "auto")
    assert sorted(p.name for p in (only_experiment(tmp_path / "r") / "checkpoints").iterdir()) == \
        ["0000001.pt", "0000002.pt"]


def test_a_folder_named_as_a_hub_vae_is_not_taken_for_a_local_one(tmp_path, image_folder_path, monkeypatch):
    """--vae ema means the hub's VAE even beside a folder called ema (as load_vae reads it); the
    recording of local VAEs by hash ended such a run in a KeyError."""
    import train
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ema").mkdir()

    def reached(*args):
        raise ValueError("the data and the VAE are loaded next")
    monkeypatch.setattr(train, "load_data", reached)
    with pytest.raises(ValueError, match="the data and the VAE are loaded next"):
        run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--max-steps", "1",
                 "--global-batch-size", "4", "--model", "DiT-Nano/2", "--image-size", "32", "--vae", "ema",
                 "--num-classes", "2", "--num-workers", "0", "--device", DEVICE)


def test_a_file_named_as_the_results_dir_is_one_line(tmp_path, image_folder_path):
    """Issue 34, second pass: it was "[Errno 17] File exists: 'r'", naming no flag."""
    (tmp_path / "r").write_text("notes")
    with pytest.raises(ValueError, match=f"^--results-dir: {re.escape(str(tmp_path / 'r'))} is a file, not a folder$"):
        run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--max-steps", "1",
                 "--global-batch-size", "4", *PIXEL)
    assert (tmp_path / "r").read_text() == "notes"


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path, image_folder_path):
    common = ["--data-path", image_folder_path, "--global-batch-size", "4", "--max-steps", "40", "--lr", "1e30", *PIXEL]
    result = run_script("train.py", *common, "--results-dir", tmp_path / "results", "--ckpt-every", "1", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    bad_step = int(result.stderr.split("loss became non-finite at step ")[1].split()[0])
    checkpoints = sorted((only_experiment(tmp_path / "results") / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"{s:07d}.pt" for s in range(1, bad_step)]  # checked at every save
    assert f"the last checkpoint, {checkpoints[-1]}, is intact" in result.stderr
    assert all(torch.isfinite(v).all() for v in load(checkpoints[-1])["model"].values())
    # Without checkpoints, the check runs every 10 steps and says nothing was saved.
    with pytest.raises(FloatingPointError, match=r"\(seen at step 10;.*no checkpoint was written"):
        run_main("train.py", *common, "--results-dir", tmp_path / "none", "--ckpt-every", "100")
    assert not any((tmp_path / "none").rglob("*.pt"))


@pytest.mark.parametrize("case,message", [
    ("missing-data", "--data-path is required"),
    ("empty-data", "holds no images in class sub-folders"),
    ("odd-image-size", "--image-size 36 must be a positive multiple of 8"),
    ("patch-mismatch", "input_size 18 is not divisible by patch_size 4 (the model's input for --image-size 18)"),
    ("too-few-images", "fewer than one global batch of 64"),
    ("bad-vae", "--vae must be ema, mse, none or a local AutoencoderKL folder"),
    ("fid-without-reference", "--fid-every needs --fid-ref STATS.npz"),
    ("fid-reference-missing", "--fid-ref nothing.npz: no such file"),
    ("tensorboard-missing", "--report-to tensorboard needs the tensorboard package: pip install tensorboard"),
    ("wandb-missing", "--report-to wandb needs the wandb package: pip install wandb"),
])
def test_bad_inputs_fail_before_work(tmp_path, image_folder_path, case, message, monkeypatch):
    args = {"data": ["--data-path", image_folder_path], "batch": ["--global-batch-size", "4"], "rest": PIXEL}
    if case == "missing-data":
        args["data"] = []
    elif case == "empty-data":
        (tmp_path / "empty").mkdir()
        args["data"] = ["--data-path", tmp_path / "empty"]
    elif case == "odd-image-size":
        args["rest"] = ["--image-size", "36", "--vae", "ema", "--device", DEVICE]
    elif case == "patch-mismatch":
        args["rest"] = PIXEL[:2] + ["--image-size", "18", "--vae", "none", "--device", DEVICE]
    elif case == "too-few-images":
        args["batch"] = ["--global-batch-size", "64"]
    elif case == "bad-vae":
        args["rest"] = PIXEL[:4] + ["--vae", "no-such-vae", "--device", DEVICE]
    elif case == "fid-without-reference":
        args["rest"] = PIXEL + ["--fid-every", "2"]
    elif case == "fid-reference-missing":
        args["rest"] = PIXEL + ["--fid-every", "2", "--fid-ref", "nothing.npz"]
    elif case.endswith("-missing"):  # as if the optional package were not installed
        package = case.removesuffix("-missing")
        monkeypatch.setitem(sys.modules, package, None)
        monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
        args["rest"] = PIXEL + ["--report-to", package]
    with pytest.raises(ValueError, match=re.escape(message)):  # run_cli makes it one line (tested above)
        run_main("train.py", *args["data"], *args["batch"], *args["rest"], "--results-dir", tmp_path / "r")
    assert not any((tmp_path / "r").rglob("*.pt"))


def test_batch_not_divisible_by_world_size(tmp_path, image_folder_path):
    import train
    args = train.parse_args([str(a) for a in ("--data-path", image_folder_path, "--results-dir", tmp_path / "r",
                                              "--global-batch-size", "5", *PIXEL)])
    with pytest.raises(SettingError, match="global_batch_size 5 is not divisible by the world size 2") as error:
        train.train(args, rank=1, world_size=2, device=torch.device("cpu"), scope=ExitStack())  # before any collective
    assert str(error.value.as_flag()) == "--global-batch-size 5 is not divisible by the world size 2"


@pytest.mark.slow  # inductor compiles forward and backward: over a minute on 2 cores
def test_compile_matches_eager(tmp_path, image_folder_path):
    args = ["--data-path", image_folder_path, "--global-batch-size", "4", "--max-steps", "2", "--log-every", "1",
            *PIXEL]
    run_script("train.py", *args, "--results-dir", tmp_path / "eager")
    run_script("train.py", *args, "--results-dir", tmp_path / "compiled", "--compile", timeout=600)
    eager = [r["loss"] for r in read_metrics(only_experiment(tmp_path / "eager"))]
    compiled = [r["loss"] for r in read_metrics(only_experiment(tmp_path / "compiled"))]
    assert compiled == pytest.approx(eager, rel=1e-4)


# ---- reliability: damaged checkpoints, changed flags, leftovers, full disks ---------------------------

def test_damaged_checkpoint_is_moved_aside_and_the_one_before_resumed(tmp_path, image_folder_path):
    args = ["--data-path", image_folder_path, "--global-batch-size", "4", "--log-every", "100", "--ckpt-every", "1",
            *PIXEL]
    run_main("train.py", *args, "--results-dir", tmp_path / "straight", "--max-steps", "3")
    results = ["--results-dir", tmp_path / "results"]
    run_main("train.py", *args, *results, "--max-steps", "2")
    checkpoints = only_experiment(tmp_path / "results") / "checkpoints"
    (checkpoints / "0000002.pt").write_bytes((checkpoints / "0000002.pt").read_bytes()[:5000])  # killed mid-copy
    with pytest.raises(ValueError,
                       match=re.escape(f"{checkpoints / '0000002.pt'} is not a readable PyTorch checkpoint")):
        run_main("train.py", *args, *results, "--max-steps", "3", "--resume", checkpoints / "0000002.pt")
    run_main("train.py", *args, *results, "--max-steps", "3", "--resume", "auto")
    log = (checkpoints.parent / "log.txt").read_text()
    assert "0000002.pt is not a readable PyTorch checkpoint" in log
    assert "moved it aside to 0000002.pt.corrupt, trying the checkpoint before it" in log
    assert "Resumed from" in log and "0000001.pt at step 1" in log
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0000001.pt", "0000002.pt", "0000002.pt.corrupt",
                                                             "0000003.pt"]
    assert_same_state(load(checkpoints / "0000003.pt"),
                      load(only_experiment(tmp_path / "straight") / "checkpoints" / "0000003.pt"))
    for name in ("0000001.pt", "0000002.pt", "0000003.pt"):
        (checkpoints / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="--resume auto: no checkpoint in .*checkpoints can be read"):
        run_main("train.py", *args, *results, "--max-steps", "4", "--resume", "auto")


def test_resume_compares_the_saved_flags(tmp_path, image_folder_path):
    args = ["--data-path", image_folder_path, "--results-dir", tmp_path / "results", "--global-batch-size", "4",
            "--ckpt-every", "1", *PIXEL]
    run_main("train.py", *args, "--max-steps", "1")
    resume = [*args, "--resume", "auto"]
    with pytest.raises(ValueError,
                       match=r"flags that define the model, its data or its start \(--image-size 16 -> 24\)"):
        run_main("train.py", *resume, "--image-size", "24")
    with pytest.raises(ValueError, match=r"flags differ from the run's \(--ema-decay 0.9999 -> 0.99; --lr 0.0001 -> "
                                         r"0.001\); pass the run's values, or --allow-changed-args"):
        run_main("train.py", *resume, "--lr", "1e-3", "--ema-decay", "0.99")
    run_main("train.py", *resume, "--max-steps", "2", "--log-every", "1")
    experiment = only_experiment(tmp_path / "results")
    log = (experiment / "log.txt").read_text()
    assert "Continuing with changed flags: --log-every 100 -> 1; --max-steps 1 -> 2" in log
    run_main("train.py", *resume, "--max-steps", "3", "--log-every", "1", "--lr", "1e-3", "--allow-changed-args")
    log = (experiment / "log.txt").read_text()
    assert "Continuing with changed flags: --max-steps 2 -> 3; --lr 0.0001 -> 0.001" in log
    assert load(experiment / "checkpoints" / "0000003.pt")["args"]["lr"] == 1e-3
    assert [r["lr"] for r in read_metrics(experiment)] == [1e-4, 1e-3]


def test_leftovers_of_killed_runs_are_cleaned_and_reused(tmp_path, image_folder_path):
    import fcntl
    results = tmp_path / "results"
    args = ["--data-path", image_folder_path, "--results-dir", results, "--global-batch-size", "4", "--max-steps", "1",
            *PIXEL]
    # A run killed before its first checkpoint leaves a folder with a log and no checkpoint: the next run reuses it.
    dead = results / "000-DiT-Nano-4"
    (dead / "checkpoints").mkdir(parents=True)
    (dead / "log.txt").write_text("[2026-11-23 10:00:00] Experiment directory created at ...\n")
    stale = dead / "checkpoints" / ".0000005.pt.4242-0123abcd.tmp"
    stale.write_bytes(b"x" * 523_000)
    os.utime(stale, (time.time() - 600, time.time() - 600))
    old_umask = os.umask(0o002)
    try:
        run_main("train.py", *args)
    finally:
        os.umask(old_umask)
    log = (dead / "log.txt").read_text()
    assert f"Reusing {dead}: the run that made it stopped before writing a checkpoint" in log
    assert "Removed 1 temporary file(s) of an interrupted checkpoint write (523.0 KB)" in log
    assert sorted(p.name for p in (dead / "checkpoints").iterdir()) == ["0000001.pt"]
    assert (dead / "checkpoints" / "0000001.pt").stat().st_mode & 0o777 == 0o664  # the umask's, as every file
    assert (dead / "log.txt").read_text().startswith("[2026-11-23 10:00:00]")  # appended to, not replaced

    # A folder whose run is alive (it holds the lock) is never reused or resumed into.
    live = results / "001-DiT-Nano-4"
    live.mkdir()
    with open(live / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run_main("train.py", *args)
        assert (results / "002-DiT-Nano-4" / "checkpoints" / "0000001.pt").is_file()
        assert sorted(p.name for p in live.iterdir()) == [".lock"]
        (live / "checkpoints").mkdir()
        atomic_torch_save(load(dead / "checkpoints" / "0000001.pt"), live / "checkpoints" / "0000001.pt")
        with pytest.raises(ValueError, match=f"--resume: {live} is in use by another run that is still alive"):
            run_main("train.py", *args, "--resume", live / "checkpoints" / "0000001.pt", "--max-steps", "2")


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MB tmpfs where the OS lets this process mount one (root on Linux), else None."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    yield mount if made.returncode == 0 else None
    if made.returncode == 0:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_and_keeps_the_checkpoints(tmp_path, image_folder_path, small_disk, monkeypatch):
    results = (small_disk or tmp_path) / "results"
    args = ["--data-path", image_folder_path, "--results-dir", results, "--global-batch-size", "4", "--ckpt-every", "1",
            "--log-every", "100", *PIXEL]
    run_main("train.py", *args, "--max-steps", "1")
    checkpoints = only_experiment(results) / "checkpoints"
    if small_disk is not None:  # fill the disk to 100 KB short of full
        with open(small_disk / "filler", "wb") as filler:
            filler.write(b"\0" * (shutil.disk_usage(small_disk).free - 100_000))
    else:  # no tmpfs: writes into the folder fail as a full disk does
        from ditlib import files
        real_open = open

        class FullDisk:
            def __init__(self, handle):
                self.handle = handle

            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            def __getattr__(self, name):
                return getattr(self.handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

        monkeypatch.setattr(files, "open", lambda path, mode: FullDisk(real_open(path, mode)), raising=False)
    with pytest.raises(OSError) as error:
        run_main("train.py", *args, "--max-steps", "2", "--resume", "auto")
    message = str(error.value)
    assert re.fullmatch(rf"\[Errno 28\] cannot write {re.escape(str(checkpoints / '0000002.pt'))}: No space left on "
                        rf"device \(20\.\d MB needed, [\d.]+ (KB|MB|GB) free\); files already there are intact",
                        message)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0000001.pt"]  # no temporary file left behind
    assert load(checkpoints / "0000001.pt")["train_steps"] == 1


# ---- learning-rate schedules and checkpoint retention ----------------------------------------------


def test_decaying_schedule_resumes_where_it_stopped(tmp_path, image_folder_path):
    # 16 images at batch 4: --epochs 1 stops the first part at step 4 of a 6-step decay.
    args = ["--data-path", image_folder_path, "--global-batch-size", "4", "--log-every", "1", "--ckpt-every", "100",
            "--lr", "1e-3", "--lr-min", "1e-4", "--lr-schedule", "cosine", "--max-steps", "6", *PIXEL]
    run_main("train.py", *args, "--results-dir", tmp_path / "straight")
    run_main("train.py", *args, "--results-dir", tmp_path / "split", "--epochs", "1")
    run_main("train.py", *args, "--results-dir", tmp_path / "split", "--resume", "auto")
    straight, split = only_experiment(tmp_path / "straight"), only_experiment(tmp_path / "split")
    expected = [1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    assert [r["lr"] for r in read_metrics(straight)] == pytest.approx(expected)
    assert [r["lr"] for r in read_metrics(split)] == [r["lr"] for r in read_metrics(straight)]
    assert_same_state(load(straight / "checkpoints" / "0000006.pt"), load(split / "checkpoints" / "0000006.pt"))


def test_keep_last_never_deletes_the_checkpoint_resumed_from(tmp_path, image_folder_path):
    args = ["--data-path", image_folder_path, "--results-dir", tmp_path / "results", "--global-batch-size", "4",
            "--ckpt-every", "1", *PIXEL]
    run_main("train.py", *args, "--max-steps", "5", "--keep-last", "2", "--keep-every", "3")
    checkpoints = only_experiment(tmp_path / "results") / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0000003.pt", "0000004.pt", "0000005.pt"]
    run_main("train.py", *args, "--max-steps", "7", "--keep-last", "1", "--resume", checkpoints / "0000005.pt")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0000005.pt", "0000007.pt"]
    assert "Deleted 0000006.pt (--keep-last 1)" in (checkpoints.parent / "log.txt").read_text()


# ---- gradient accumulation --------------------------------------------------------------------------

def test_gradient_accumulation_equals_the_whole_batch_and_resumes_exactly(tmp_path, image_folder_path, monkeypatch):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import train
    syncs = []

    class CountingDDP(train.DDP):  # counts gradient all-reduces (one call per bucket)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

            def hook(state, bucket):
                syncs.append(1)
                return default_hooks.allreduce_hook(None, bucket)
            self.register_comm_hook(None, hook)

    monkeypatch.setattr(train, "DDP", CountingDDP)
    args = ["--data-path", image_folder_path, "--global-batch-size", "8", "--log-every", "1", "--ckpt-every", "100",
            "--lr", "1e-3", *PIXEL]
    states, losses, sync_counts = {}, {}, {}
    for k in (1, 2, 4):
        syncs.clear()
        run_main("train.py", *args, "--results-dir", tmp_path / f"k{k}", "--max-steps", "2", "--grad-accum-steps", k)
        experiment = only_experiment(tmp_path / f"k{k}")
        states[k], losses[k] = load(experiment / "checkpoints" / "0000002.pt"), read_metrics(experiment)
        sync_counts[k] = len(syncs)
    assert sync_counts[2] == sync_counts[4] == sync_counts[1] > 0  # one all-reduce per step, not per micro-batch
    for k in (2, 4):  # the same update as the whole batch, up to float summation order
        assert [r["loss"] for r in losses[k]] == pytest.approx([r["loss"] for r in losses[1]], rel=1e-5)
        # AdamW ignores a gradient's scale, so the weights alone would not see a missing 1/K: the norm does.
        assert [r["grad_norm"] for r in losses[k]] == pytest.approx([r["grad_norm"] for r in losses[1]], rel=1e-5)
        for name, value in states[1]["model"].items():
            assert torch.allclose(states[k]["model"][name], value, rtol=1e-4, atol=1e-6), name
    # With clipping (which does see the scale) and with fp16's loss scaler: K = 2 still equals K = 1.
    for variant, flags in (("clip", ["--grad-clip", "0.05"]), ("fp16", ["--mixed-precision", "fp16"])):
        runs = {}
        for k in (1, 2):
            folder = tmp_path / f"{variant}{k}"
            run_main("train.py", *args, *flags, "--results-dir", folder, "--max-steps", "2", "--grad-accum-steps", k)
            experiment = only_experiment(folder)
            runs[k] = read_metrics(experiment), load(experiment / "checkpoints" / "0000002.pt")
        assert [r["grad_norm"] for r in runs[2][0]] == pytest.approx([r["grad_norm"] for r in runs[1][0]], rel=1e-3)
        assert [r["loss"] for r in runs[2][0]] == pytest.approx([r["loss"] for r in runs[1][0]], rel=1e-3)
        if variant == "clip":  # in fp16, Adam's first steps amplify the rounding of near-zero gradients to +-lr
            for name, value in runs[1][1]["model"].items():
                assert torch.allclose(runs[2][1]["model"][name], value, rtol=1e-4, atol=1e-6), name
    # Stopped at an epoch's end (16 images, batch 8: 2 steps) and resumed: bit for bit.
    accumulate = [*args, "--grad-accum-steps", "2", "--max-steps", "3"]
    run_main("train.py", *accumulate, "--results-dir", tmp_path / "straight")
    run_main("train.py", *accumulate, "--results-dir", tmp_path / "split", "--epochs", "1")
    run_main("train.py", *accumulate, "--results-dir", tmp_path / "split", "--resume", "auto")
    assert_same_state(load(only_experiment(tmp_path / "straight") / "checkpoints" / "0000003.pt"),
                      load(only_experiment(tmp_path / "split") / "checkpoints" / "0000003.pt"))
    with pytest.raises(ValueError, match="--grad-accum-steps 3 does not divide the per-process batch 8"):
        run_main("train.py", *args, "--results-dir", tmp_path / "bad", "--grad-accum-steps", "3")


# ---- fine-tuning: --init-from ---------------------------------------------------------------------------

def test_init_from_loads_reinitialises_and_refuses_by_name(tmp_path, image_folder_path):
    from ditlib.diffusers_format import to_diffusers
    from models import DiT_models
    data = ["--data-path", image_folder_path, "--global-batch-size", "4", "--ckpt-every", "1"]
    run_main("train.py", *data, *PIXEL, "--results-dir", tmp_path / "source", "--max-steps", "2", "--lr", "1e-2",
             "--ema-decay", "0.5")
    source = only_experiment(tmp_path / "source") / "checkpoints" / "0000002.pt"
    source_ema = load(source)["ema"]

    def fine_tune(name, *flags):  # lr 0: the weights after one step are the initial ones
        run_main("train.py", *data, *PIXEL, "--results-dir", tmp_path / name, "--max-steps", "1", "--lr", "0", *flags)
        experiment = only_experiment(tmp_path / name)
        return load(experiment / "checkpoints" / "0000001.pt"), (experiment / "log.txt").read_text()

    same, log = fine_tune("same", "--init-from", source)
    assert same["train_steps"] == 1 and same["args"]["init_from"] == str(source)
    assert all(torch.equal(same["model"][name], value) for name, value in source_ema.items())
    # The EMA starts as a copy; one update of equal weights moves it only by rounding.
    assert all(torch.allclose(same["ema"][name], value, rtol=1e-6, atol=1e-9) for name, value in source_ema.items())
    assert f"Initialised from {source}: loaded 52 of 52 tensors" in log

    more_classes, log = fine_tune("classes", "--init-from", source, "--num-classes", "5")
    torch.manual_seed(0)  # the run's seed: the table is the one the model itself initialises
    fresh = DiT_models["DiT-Nano/4"](input_size=16, in_channels=3, num_classes=5).state_dict()
    table = "y_embedder.embedding_table.weight"
    assert torch.equal(more_classes["model"][table], fresh[table]) and more_classes["model"][table].shape == (6, 128)
    assert all(torch.equal(more_classes["model"][n], v) for n, v in source_ema.items() if n != table)
    assert "re-initialised the label table as the model does ((3, 128) there, (6, 128) here)" in log

    larger, log = fine_tune("size", "--init-from", source, "--image-size", "24")
    assert torch.equal(larger["model"]["pos_embed"], DiT_models["DiT-Nano/4"](input_size=24, in_channels=3).pos_embed)
    assert "rebuilt the fixed sin-cos position table for the new grid ((1, 16, 128) there, (1, 36, 128) here)" in log

    with pytest.raises(ValueError, match=r"--init-from .* does not fit this model: x_embedder.proj.weight is "
                                         r"\(128, 3, 4, 4\) there, \(128, 3, 2, 2\) here.*"
                                         r"look like --model DiT-Nano/4"):
        fine_tune("patch", "--init-from", source, "--model", "DiT-Nano/2")

    model = DiT_models["DiT-Nano/4"](input_size=16, in_channels=3, num_classes=2)
    model.load_state_dict(source_ema)
    to_diffusers(model).save_pretrained(tmp_path / "exported")
    from_folder, _ = fine_tune("from-diffusers", "--init-from", tmp_path / "exported")
    assert all(torch.equal(from_folder["model"][name], source_ema[name]) for name in source_ema)

    run_main("train.py", *data, *PIXEL, "--results-dir", tmp_path / "same", "--max-steps", "2", "--lr", "0",
             "--init-from", source, "--resume", "auto")
    assert "--resume wins over --init-from" in (only_experiment(tmp_path / "same") / "log.txt").read_text()


def test_tiny_dit_training_drives_loss_down():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=4)
    diffusion = create_diffusion("")
    # Four fixed "images", one per class: a bright quadrant on a dark background.
    data = -torch.ones(4, 1, 8, 8)
    for label, (row, col) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        data[label, :, row:row + 4, col:col + 4] = 1.0
    labels = torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    gate = model.blocks[0].adaLN_modulation[-1].weight

    history = []
    for step in range(300):
        batch = torch.randint(0, 4, (32,))
        t = torch.randint(0, diffusion.num_timesteps, (32,))
        loss = diffusion.training_losses(model, data[batch], t, model_kwargs=dict(y=labels[batch]))["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert gate.grad is None or torch.count_nonzero(gate.grad) == 0  # zero-init final layer blocks it
        optimizer.step()
        history.append(loss.item())

    assert torch.count_nonzero(gate) > 0  # the adaLN-Zero gates have left zero
    start, end = sum(history[:30]) / 30, sum(history[-30:]) / 30
    assert end < 0.5 * start, (start, end)


# ---- every flag checked before any work; what a failing run gives back ---------------------------

@pytest.mark.parametrize("flags,message", [
    (["--lr", "1e38"], "--lr must lie in [0, 3.40282e+37), got 1e+38 (AdamW's first step divides it by 0.1"),
    (["--lr", "nan"], "--lr must lie in [0, 3.40282e+37), got nan"),
    (["--grad-clip", "-1"], "--grad-clip must be a positive gradient norm, got -1.0 (a negative one reverses"),
    (["--grad-clip", "0"], "--grad-clip must be a positive gradient norm, got 0.0"),
    (["--sample-every", "-1"], "--sample-every must be >= 0 (0: never), got -1"),
    (["--fid-every", "-1"], "--fid-every must be >= 0 (0: never), got -1"),
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0 (0: never), got -5"),
    (["--class-dropout-prob", "1.5"], "--class-dropout-prob must lie in [0, 1), got 1.5"),
    (["--weight-decay", "-0.1"], "--weight-decay must lie in [0, inf], got -0.1"),
    (["--sample-steps", "1"], "--sample-steps must be at least 2 for DiT's learned-variance sampling, got 1"),
    (["--fid-steps", "1"], "--fid-steps must be at least 2 for DiT's learned-variance sampling, got 1"),
    (["--fid-steps", "5000"], "--fid-steps 5000: "),
    (["--fid-sampler", "dpm++", "--fid-steps", "1000"], "--fid-steps 1000: --sampler dpm++ visits only 999"),
    (["--sample-cfg-scale", "nan"], "--sample-cfg-scale must be a number >= 1.0 (1.0 turns guidance off), got nan"),
    (["--fid-cfg-scale", "0.5"], "--fid-cfg-scale must be a number >= 1.0"),
    (["--fid-every", "2", "--fid-ref", "REF", "--fid-samples", "1"], "--fid-samples must be at least 2"),
    (["--fid-ref", "REF"], "--fid-ref only applies with --fid-every K (without it no FID is measured)"),  # issue 34
    (["--num-workers", "-1"], "--num-workers must be 0 or more, got -1"),  # issue 34: after the folder was made
])
def test_every_bad_flag_is_one_line_before_any_work(tmp_path, image_folder_path, flags, message):
    """Table of issue 21: each bad value stops the run before any folder, checkpoint or output exists
    (before, the sampling flags of grids and FID failed at their first use, after training)."""
    (tmp_path / "ref.npz").write_bytes(b"")
    flags = [str(tmp_path / "ref.npz") if flag == "REF" else flag for flag in flags]
    with pytest.raises(ValueError, match=re.escape(message)):
        run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--max-steps", "3",
                 "--global-batch-size", "4", *PIXEL, *flags)
    assert not (tmp_path / "r").exists()


def test_a_failing_run_gives_back_the_callers_signal_handlers(tmp_path, image_folder_path):
    """main() called from Python (a sweep, a notebook) keeps its Ctrl-C however the run ends."""
    def mine(signum, frame):
        pass

    previous = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(FloatingPointError, match="loss became non-finite"):
            run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--max-steps", "40",
                     "--global-batch-size", "4", "--lr", "1e30", *PIXEL)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_longer_resumed_run_keeps_the_decay_it_started_with(tmp_path, image_folder_path):
    """README's own example: a cosine run resumed with a larger --max-steps. Its rate must not jump
    back up (before: 1.55e-4 at step 4, 5.05e-4 at step 5); the curve keeps its length, then --lr-min."""
    args = ["--data-path", image_folder_path, "--global-batch-size", "4", "--log-every", "1", "--ckpt-every", "100",
            "--lr", "1e-3", "--lr-min", "1e-4", "--lr-schedule", "cosine", *PIXEL]
    run_main("train.py", *args, "--results-dir", tmp_path / "r", "--max-steps", "6", "--epochs", "1")
    run_main("train.py", *args, "--results-dir", tmp_path / "r", "--max-steps", "9", "--resume", "auto")
    experiment = only_experiment(tmp_path / "r")
    expected = [1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)] + [1e-4] * 3
    assert [r["lr"] for r in read_metrics(experiment)] == pytest.approx(expected)
    log = (experiment / "log.txt").read_text()
    assert "keeps the length of 6 steps it was started with (--max-steps is now 9)" in log


def test_resume_auto_does_not_ignore_another_init_from(tmp_path, image_folder_path):
    common = ["--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size", "4",
              "--ckpt-every", "1", *PIXEL]
    run_main("train.py", *common, "--max-steps", "1")
    source = next((tmp_path / "r").glob("*/checkpoints/0000001.pt"))
    with pytest.raises(ValueError, match=r"--init-from None -> .*0000001.pt\); start a new run"):
        run_main("train.py", *common, "--max-steps", "2", "--init-from", source, "--resume", "auto")


def test_metrics_jsonl_holds_each_step_once_after_a_resume(tmp_path, image_folder_path):
    """A killed run logged past its last checkpoint; the resumed run drops those records, as
    TensorBoard's purge does, so a reader sees one curve."""
    args = ["--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size", "4",
            "--log-every", "1", "--ckpt-every", "2", *PIXEL]
    run_main("train.py", *args, "--max-steps", "4")
    experiment = only_experiment(tmp_path / "r")
    (experiment / "checkpoints" / "0000004.pt").unlink()  # killed after logging step 4, before its checkpoint
    with open(experiment / "metrics.jsonl", "a") as handle:  # and a few more lines it had written
        handle.write(json.dumps({"step": 5, "loss": 9.0}) + "\n")
    run_main("train.py", *args, "--max-steps", "6", "--resume", "auto")
    assert [r["step"] for r in read_metrics(experiment)] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 9.0 for r in read_metrics(experiment))


def test_init_from_sources_that_cannot_fit_are_named_before_any_download(tmp_path, image_folder_path, tiny_vae_path,
                                                                          monkeypatch):
    from ditlib import pretrained

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded before checking the shape")

    monkeypatch.setattr(pretrained, "download_model", no_download)
    (tmp_path / "empty").mkdir()
    common = ["--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size", "4",
              "--max-steps", "1", *PIXEL]
    for source, message in (
            (tmp_path / "empty", "not a diffusers DiT folder (no config.json in it or in its transformer/)"),
            (tiny_vae_path, "a diffusers AutoencoderKL folder, not a DiTTransformer2DModel one"),
            ("DiT-XL-2-256x256.pt", "holds DiT-XL/2 weights (depth 28, width 1152, patch 2, 4 channels, adaln-zero); "
                                    "this model has depth 4, width 128, patch 4, 3 channels")):
        with pytest.raises(ValueError, match=re.escape(message)):
            run_main("train.py", *common, "--init-from", source)
    assert not (tmp_path / "r").exists()


def test_fid_reference_may_be_images(tmp_path, image_folder_path):
    """--fid-ref an .npz of images (as evaluate.py accepts) ended in KeyError: 'mu'."""
    from helpers import fid_network_path
    np.savez(tmp_path / "images.npz", arr_0=np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size", "4",
             "--max-steps", "1", "--fid-every", "1", "--fid-ref", tmp_path / "images.npz", "--fid-samples", "2",
             "--fid-steps", "2", "--inception", fid_network_path(), *PIXEL)
    (record,) = [r for r in read_metrics(only_experiment(tmp_path / "r")) if "fid" in r]
    assert record["step"] == 1 and np.isfinite(record["fid"]) and record["fid"] > 0


def test_a_wrong_fid_reference_is_refused_before_training_and_the_checkpoint_precedes_the_fid(tmp_path,
                                                                                          image_folder_path):
    """Issue 34: statistics of the wrong shape were accepted at start and the run failed at its first
    FID, before that step's checkpoint was written; now they are refused before any folder exists, and
    a due checkpoint is written before the evaluations of its step."""
    from helpers import fid_network_path
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    common = ["--data-path", image_folder_path, "--global-batch-size", "4", "--max-steps", "1", "--fid-every", "1",
              "--fid-samples", "2", "--fid-steps", "2", "--inception", fid_network_path(), *PIXEL]
    with pytest.raises(ValueError, match="its statistics have 64 dimensions, the FID network's pool3 features 2048"):
        run_main("train.py", *common, "--results-dir", tmp_path / "r", "--fid-ref", tmp_path / "small.npz")
    assert not (tmp_path / "r").exists()
    np.savez(tmp_path / "images.npz", arr_0=np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    run_main("train.py", *common, "--results-dir", tmp_path / "ok", "--fid-ref", tmp_path / "images.npz")
    log = (only_experiment(tmp_path / "ok") / "log.txt").read_text()
    assert log.index("Saved checkpoint") < log.index("FID-2:")


def test_train_records_the_block_and_sampling_rebuilds_it(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=4)
    run_main("train.py", "--data-path", data, "--results-dir", tmp_path / "results", "--model", "DiT-Nano/4",
             "--image-size", "16", "--vae", "none", "--num-classes", "2", "--num-workers", "0", "--device", DEVICE,
             "--global-batch-size", "4", "--max-steps", "2", "--block", "cross-attention")
    checkpoint_path = next((tmp_path / "results").rglob("0000002.pt"))
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["args"]["block"] == "cross-attention"
    run_main("sample.py", "--ckpt", checkpoint_path, "--class-labels", "0", "1", "--num-sampling-steps", "2",
             "--output", tmp_path / "grid.png", "--device", DEVICE)
    # A bare state dict carries no args: the design is read from its weights.
    torch.save(checkpoint["ema"], tmp_path / "bare.pt")
    bare = ["--ckpt", tmp_path / "bare.pt", "--model", "DiT-Nano/4", "--image-size", "16", "--vae", "none",
            "--num-classes", "2", "--class-labels", "0", "--num-sampling-steps", "2", "--device", DEVICE]
    run_main("sample.py", *bare, "--output", tmp_path / "bare.png")
    assert Image.open(tmp_path / "grid.png").size == (38, 20) and Image.open(tmp_path / "bare.png").size == (16, 16)
    # Forcing another design on those weights names the one they hold.
    with pytest.raises(ValueError, match="--block cross-attention"):
        run_main("sample.py", *bare, "--block", "adaln-zero", "--output", tmp_path / "x.png")


# ---- SiT: the same network, trained on SiT's transport ------------------------------------------

SIT = ["--model", "SiT-Nano/4", "--image-size", "16", "--vae", "none", "--num-classes", "2", "--num-workers", "0",
       "--device", DEVICE]


def test_a_sit_trains_resumes_bit_identically_and_records_its_transport(tmp_path, image_folder_path):
    args = ["--data-path", image_folder_path, "--global-batch-size", "4", "--log-every", "1", "--ckpt-every", "2",
            "--lr", "1e-3", *SIT, "--path-type", "GVP", "--grad-accum-steps", "2"]
    run_main("train.py", *args, "--results-dir", tmp_path / "straight", "--max-steps", "4")
    run_main("train.py", *args, "--results-dir", tmp_path / "stopped", "--max-steps", "2")
    run_main("train.py", *args, "--results-dir", tmp_path / "stopped", "--max-steps", "4", "--resume", "auto")
    straight = only_experiment(tmp_path / "straight")
    final = load(straight / "checkpoints" / "0000004.pt")
    assert_same_state(load(only_experiment(tmp_path / "stopped") / "checkpoints" / "0000004.pt"), final)
    assert {k: final["args"][k] for k in ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps")} == \
        {"path_type": "GVP", "prediction": "velocity", "loss_weight": None, "train_eps": 0, "sample_eps": 0}
    assert final["model"]["final_layer.linear.weight"].shape[0] == 4 * 4 * 6  # SiT's learn_sigma: 2 x 3 channels
    losses = [r["loss"] for r in read_metrics(straight) if "loss" in r]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    assert "SiT Parameters:" in (straight / "log.txt").read_text()
    # A changed objective is another run, not a continuation.
    with pytest.raises(ValueError, match="--path-type GVP -> Linear"):
        run_main("train.py", *args[:-4], "--grad-accum-steps", "2", "--results-dir", tmp_path / "stopped",
                 "--max-steps", "6", "--resume", "auto")


def test_a_sit_samples_through_every_command(tmp_path, image_folder_path):
    run_main("train.py", "--data-path", image_folder_path, "--global-batch-size", "4", "--max-steps", "2",
             "--results-dir", tmp_path / "r", *SIT, "--sample-every", "2", "--sample-steps", "3",
             "--sample-grid-size", "4")
    experiment = only_experiment(tmp_path / "r")
    assert (experiment / "samples" / "0000002.png").is_file()  # the grid: SiT's ODE, as SiT's train.py
    checkpoint = experiment / "checkpoints" / "0000002.pt"
    for sampler in ("ode", "sde"):
        run_main("sample.py", "--ckpt", checkpoint, "--sampler", sampler, "--num-sampling-steps", "3",
                 "--class-labels", "0", "1", "--device", DEVICE, "--output", tmp_path / f"{sampler}.png")
        assert Image.open(tmp_path / f"{sampler}.png").size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    run_main("sample_ddp.py", "--ckpt", checkpoint, "--sampler", "sde", "--num-sampling-steps", "3",
             "--per-proc-batch-size", "2", "--num-fid-samples", "3", "--sample-dir", tmp_path / "s",
             "--device", DEVICE)
    batch = next((tmp_path / "s").glob("*.npz"))
    assert "-sde" in batch.name
    meta = json.loads((tmp_path / "s" / batch.stem / "meta.json").read_text())
    assert (meta["sampler"], meta["path_type"], meta["diffusion_form"], meta["last_step"]) == \
        ("sde", "Linear", "sigma", "Mean")


@pytest.mark.parametrize("flags, message", [
    (["--model", "DiT-Nano/4", "--path-type", "GVP"], "--path-type applies to SiT models only, not --model DiT-Nano/4"),
    (["--model", "DiT-Nano/4", "--train-eps", "0.001"], "--train-eps applies to SiT models only"),
    (["--model", "SiT-Nano/4", "--fid-sampler", "ddim", "--fid-every", "1", "--fid-ref", "REF"],
     "--fid-sampler must be ode or sde for a SiT model, got 'ddim'"),
    (["--model", "SiT-Nano/4", "--fid-sampler", "sde", "--fid-steps", "1"], "--fid-steps must be at least 2"),
])
def test_flags_of_the_other_objective_are_refused_by_name(tmp_path, image_folder_path, flags, message):
    reference = image_folder_path / "class_0" / "000.png"
    args = ["--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--image-size", "16", "--vae", "none",
            "--num-classes", "2", *[reference if flag == "REF" else flag for flag in flags]]
    with pytest.raises(ValueError, match=re.escape(message)):
        run_main("train.py", *args)
    assert not (tmp_path / "r").exists()


def test_init_from_moves_weights_between_dit_and_sit(tmp_path, image_folder_path):
    common = ["--data-path", image_folder_path, "--global-batch-size", "4", "--max-steps", "1"]
    run_main("train.py", *common, *PIXEL, "--results-dir", tmp_path / "dit")
    dit = only_experiment(tmp_path / "dit") / "checkpoints" / "0000001.pt"
    run_main("train.py", *common, *SIT, "--results-dir", tmp_path / "sit", "--init-from", dit)
    tensors = len(load(dit)["model"])
    log = (only_experiment(tmp_path / "sit") / "log.txt").read_text()
    assert f"Initialised from {dit}: loaded {tensors} of {tensors} tensors" in log
    sit = only_experiment(tmp_path / "sit") / "checkpoints" / "0000001.pt"
    run_main("train.py", *common, *PIXEL, "--results-dir", tmp_path / "back", "--init-from", sit)
    assert f"loaded {tensors} of {tensors} tensors" in (only_experiment(tmp_path / "back") / "log.txt").read_text()
