"""The experiments' scripts, smoke-sized: they run end to end and write what they promise."""
import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_script
from PIL import Image

from models import DiT_models


@pytest.mark.slow  # the FID network over 80 digits, a judge trained twice: about 50 s on 2 cores
def test_sampler_sweep_smoke(tmp_path):
    from experiments import sampler_sweep

    torch.manual_seed(0)
    model = DiT_models["DiT-Nano/4"](input_size=16, in_channels=3, num_classes=10)
    with torch.no_grad():  # a model that is not zero at init, so samplers and intervals differ
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    checkpoint = tmp_path / "model.pt"
    torch.save({"ema": model.state_dict(), "model": model.state_dict(),
                "args": {"model": "DiT-Nano/4", "image_size": 16, "num_classes": 10, "vae": "none"}}, checkpoint)
    flags = ["--ckpt", str(checkpoint), "--out", str(tmp_path / "out"), "--samples", "20", "--reference", "20",
             "--plot", str(tmp_path / "sweep.png"), "--settings", "ddpm:4", "dpm++:3", "dpm++:3:0-0.5"]
    result = sampler_sweep.main(flags)
    rows = result["rows"]
    assert [(r["sampler"], r["steps"], r["interval"]) for r in rows] == [("ddpm", 4, None), ("dpm++", 3, None),
                                                                          ("dpm++", 3, (0.0, 0.5))]
    assert [r["nfe"] for r in rows] == [8, 6, 4]  # dpm++ 3 steps: t = 999, 666, 333; two lie outside [0, 0.5]
    assert rows[1]["fid"] != rows[2]["fid"]  # the interval changed the samples
    # Each row is the metrics of that setting's samples: redraw the dpm++ row with the same seed and score it here.
    from ditlib.images import to_uint8_images
    from ditlib.metrics import evaluate, extract, image_features
    from experiments.digits import accuracy, as_model_input, draw, fid_network, real_digits, train_classifier
    labels = torch.arange(10).repeat_interleave(2)
    samples, _ = draw(model.eval(), "dpm++", 3, None, 4.0, labels, batch_size=500, seed=0)
    network = fid_network()
    reference = extract(network, str(tmp_path / "out" / "fid_reference_16px_20.npz"), progress=False)
    expected = evaluate(image_features(network, to_uint8_images(samples)), reference)
    assert (rows[1]["fid"], rows[1]["sfid"]) == pytest.approx((expected["fid"], expected["sfid"]), rel=1e-6)
    real, targets, train_part, _ = real_digits(16)
    judge = train_classifier(as_model_input(real[train_part]), targets[train_part])
    assert rows[1]["accuracy"] == accuracy(judge, samples.mean(1, keepdim=True), labels)
    assert rows[1]["accuracy"] < 0.5  # random weights draw no digits (chance is 0.1)
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert (tmp_path / "out" / "sweep.md").read_text().count("\n") == 5
    stored = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert len(stored) == 3
    again = sampler_sweep.main(flags)  # everything stored: nothing is drawn again
    assert again["table"] == result["table"]


@pytest.mark.slow  # three train.py runs under torchrun and 5,000 PNGs: about a minute on 2 cores
def test_fine_tune_experiment_smoke(tmp_path):
    from experiments import fine_tune

    rows = fine_tune.main(["--out", str(tmp_path), "--pretrain-steps", "2", "--steps", "2", "--per-class-eval", "2",
                           "--reference", "20", "--global-batch-size", "16", "--nproc", "1"])
    assert set(rows) == {"fine-tuned from 0-4", "from scratch"}
    # The digits are balanced (2 per class), so the accuracy is the mean of the two halves' accuracies.
    assert all(r["accuracy"] == pytest.approx((r["accuracy_0_4"] + r["accuracy_5_9"]) / 2) for r in rows.values())
    log = next((tmp_path / "fine-tune").iterdir()) / "log.txt"
    assert "Initialised from" in log.read_text() and "re-initialised the label table" in log.read_text()
    assert "| fine-tuned from 0-4 | 2 |" in (tmp_path / "fine_tune.md").read_text()


@pytest.mark.slow  # twelve short train.py runs, a judge and the FID network: about four minutes on 2 cores
def test_scaling_experiment_smoke(tmp_path):
    from experiments import scaling

    flags = ["--out", str(tmp_path / "out"), "--plots", str(tmp_path / "plots" / "scaling"), "--sizes", "Pico", "Nano",
             "--patches", "8", "4", "--steps", "2", "--eval-every", "1", "--global-batch-size", "8",
             "--curve-samples", "10", "--eval-samples", "20", "--fid-samples", "20", "--reference", "20", "--digits",
             "100", "--nproc", "1"]
    result = scaling.main(flags)
    cells = result["cells"]
    assert [c["model"] for c in cells] == ["DiT-Pico/8", "DiT-Pico/4", "DiT-Nano/8", "DiT-Nano/4"]
    assert [(c["width"], c["depth"], c["patch"], c["tokens"]) for c in cells] == [
        (64, 4, 8, 4), (64, 4, 4, 16), (128, 4, 8, 4), (128, 4, 4, 16)]
    # Forward Gflops grow with width and with tokens, and the compute column is Gflops x batch x steps x 3.
    assert cells[0]["gflops"] < cells[1]["gflops"] and cells[2]["gflops"] < cells[3]["gflops"]
    assert cells[0]["gflops"] < cells[2]["gflops"] and cells[1]["gflops"] < cells[3]["gflops"]
    assert all(c["compute"] == pytest.approx(c["gflops"] * 8 * 2 * 3) for c in cells)
    assert all([p["step"] for p in c["curve"]] == [1, 2] for c in cells)  # every --eval-every checkpoint judged
    assert all(math.isfinite(c["loss"]) and c["train_seconds"] > 0 for c in cells)

    # The final numbers are those of the cell's last EMA weights: redraw the first cell's samples and judge them here.
    from ditlib.images import to_uint8_images
    from experiments.digits import draw, load_digit_model
    run = next((tmp_path / "out" / "runs" / "DiT-Pico-8").iterdir())
    images, _ = draw(load_digit_model(run / "checkpoints" / "0000002.pt"), scaling.SAMPLER, scaling.SAMPLER_STEPS,
                     None, 1.0, torch.arange(20) % 10, batch_size=500, seed=0)
    judge = scaling.Judge(16, 20, tmp_path / "out")
    expected = judge.digits(images, torch.arange(20) % 10)
    assert cells[0]["fd_digits"] == pytest.approx(expected["fd_digits"], rel=1e-6)
    assert cells[0]["accuracy"] == expected["accuracy"]
    assert cells[0]["fid"] == pytest.approx(judge.fid(to_uint8_images(images)[..., 0]), rel=1e-6)
    with np.load(cells[0]["samples_file"]) as stored:
        assert np.array_equal(stored["arr_0"], to_uint8_images(images)[..., 0])
    floors = result["floors"]
    assert floors["final"] == pytest.approx(judge.digit_floor(20), rel=1e-6) and floors["accuracy"] > 0.5
    assert all(c["fd_digits"] > floors["final"] for c in cells)  # two steps from a zero output layer: no digits yet

    stored = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert stored["summary"] == result["summary"] and stored["floors"] == floors
    assert [path.name for path in result["plots"]] == ["scaling_fd_vs_steps.png", "scaling_fd_vs_gflops.png",
                                                       "scaling_fd_vs_compute.png", "scaling_samples.png"]
    assert all(path.stat().st_size > 0 for path in result["plots"])
    assert (tmp_path / "out" / "scaling.md").read_text().count("| DiT-") == 4

    evaluations = sorted((tmp_path / "out" / "runs").glob("*/*/evaluations/*.json"))
    written = {path: path.stat().st_mtime_ns for path in evaluations}
    again = scaling.main(flags)  # every evaluation is stored: nothing is sampled again
    assert again["table"] == result["table"]
    assert {path: path.stat().st_mtime_ns for path in evaluations} == written

    # Training continues, at half the rate past --halve-lr-at, and only the new step is judged.
    longer = scaling.main([*flags, "--steps", "3", "--halve-lr-at", "2"])
    assert all([p["step"] for p in c["curve"]] == [1, 2, 3] for c in longer["cells"])
    assert all(c["curve"][:2] == old["curve"] for c, old in zip(longer["cells"], cells))
    assert {path: path.stat().st_mtime_ns for path in evaluations} == written
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000001.pt", "0000002.pt", "0000003.pt"]
    assert longer["cells"][0]["samples_file"].endswith("final-0000003.npz") and Path(cells[0]["samples_file"]).is_file()
    assert "Resumed from" in (run / "log.txt").read_text()
    assert "--lr 0.0015 -> 0.00075" in (run / "log.txt").read_text()
    steps_and_rates = [(step, torch.load(run / "checkpoints" / f"{step:07d}.pt", weights_only=False)["args"]["lr"])
                       for step in (2, 3)]
    assert steps_and_rates == [(2, 0.0015), (3, 0.00075)]
    final = json.loads((run / "evaluations" / "final-0000003.json").read_text())
    assert final["recipe"]["halve_lr_at"] == 2 and "halve_lr_at" not in json.loads(
        (run / "evaluations" / "0000002.json").read_text())["recipe"]

    # A fresh run that crosses the halving in one call: to the halving step at --lr, then at half of it.
    scaling.main([*flags, "--out", str(tmp_path / "fresh"), "--sizes", "Pico", "--patches", "8", "--halve-lr-at", "1"])
    fresh = next((tmp_path / "fresh" / "runs" / "DiT-Pico-8").iterdir())
    assert [torch.load(fresh / "checkpoints" / f"{step:07d}.pt", weights_only=False)["args"]["lr"]
            for step in (1, 2)] == [0.0015, 0.00075]


@pytest.mark.parametrize("flag", ["--steps", "--halve-lr-at"])
def test_scaling_steps_must_fall_on_the_eval_grid(tmp_path, flag):
    from experiments import scaling

    with pytest.raises(SystemExit, match=f"{flag} 700 must be a multiple of --eval-every 600"):
        scaling.main(["--out", str(tmp_path), "--steps", "1200", flag, "700"])


@pytest.mark.parametrize("flags, message", [(["--steps", "0"], "--steps must be at least 1, got 0"),
                                            (["--nproc", "0"], "--nproc must be at least 1, got 0"),
                                            (["--global-batch-size", "0"], "--global-batch-size must be at least 1"),
                                            (["--lr", "nan"], "--lr must be a positive number, got nan"),
                                            (["--lr", "-1"], "--lr must be a positive number, got -1.0")])
def test_scaling_checks_its_own_flags_before_any_work(tmp_path, flags, message):
    """Issue 34: these ended in CalledProcessError from train.py after the set-up (about 50 s)."""
    from experiments import scaling

    with pytest.raises(SystemExit, match=re.escape(message)):
        scaling.main(["--out", str(tmp_path), *flags])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("every", ["0", "-600"])
def test_scaling_refuses_an_eval_every_below_one(tmp_path, every):
    from experiments import scaling

    with pytest.raises(SystemExit, match=f"--eval-every must be at least 1 .*, got {every}"):  # was ZeroDivisionError
        scaling.main(["--out", str(tmp_path), "--eval-every", every])


def test_scaling_training_record_adds_up_the_time_of_resumed_runs(tmp_path):
    from experiments import scaling

    # 100 steps at 10 steps/s, then (a resumed run) 100 at 5 and 200 at 20: 10 + 20 + 10 = 40 seconds.
    records = [{"step": 100, "loss": 0.5, "steps_per_sec": 10.0}, {"step": 150, "fid": 80.0},
               {"step": 200, "loss": 0.3, "steps_per_sec": 5.0}, {"step": 400, "loss": 0.1, "steps_per_sec": 20.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loss, seconds = scaling.training_record(tmp_path)
    assert seconds == pytest.approx(40.0)
    assert loss == pytest.approx(0.1)  # the mean of the records past 90% of the last step: only step 400


def test_scaling_judges_only_the_eval_every_checkpoints(tmp_path):
    from experiments import scaling

    (tmp_path / "checkpoints").mkdir()
    for step in (480, 600, 670, 1200, 1800):  # 480 and 670: where SIGTERM stopped two runs
        (tmp_path / "checkpoints" / f"{step:07d}.pt").touch()
    judged = scaling.judged_checkpoints(tmp_path, 600)
    assert [int(c.stem) for c in judged] == [600, 1200, 1800]


@pytest.mark.slow  # two trainings, a judge and the FID network: over a minute on 2 cores
def test_ablation_script_smoke(tmp_path):
    out = tmp_path / "ablation"
    result = run_script("experiments.block_ablation", "--out", out, "--max-steps", "3", "--global-batch-size", "32",
                        "--log-every", "1", "--per-class", "1", "--sample-steps", "2", "--fid-reference", "30",
                        "--designs", "adaln", "in-context", timeout=600)
    report = json.loads((out / "ablation.json").read_text())
    assert [r["block"] for r in report["rows"]] == ["adaln", "in-context"]
    # Three steps draw blobs: near-chance classes, far from real digits (the held-out floor).
    assert all(r["steps"] == 3 and r["fid"] > 2 * report["fid_floor"] and r["class_accuracy"] < 0.5
               for r in report["rows"])
    with torch.device("meta"):
        params = {b: sum(p.numel() for p in DiT_models["DiT-Nano/4"](input_size=16, in_channels=3, num_classes=10,
                                                                    block=b).parameters() if p.requires_grad)
                  for b in ("adaln", "in-context")}
    assert {r["block"]: r["params"] for r in report["rows"]} == params
    assert (out / "ablation.md").read_text().count("\n") == 2 + 2 + 1
    with Image.open(out / "loss_curves.png") as curves:  # a drawn figure, not an empty canvas
        pixels = np.asarray(curves.convert("L"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and len(np.unique(pixels)) > 10
    assert "table, JSON and loss curves" in result.stdout


@pytest.mark.slow  # two short train.py runs, the judge and twelve small sample sets: about two minutes on 2 cores
def test_sit_vs_dit_smoke(tmp_path):
    from experiments import sit_vs_dit

    flags = ["--out", str(tmp_path), "--steps", "2", "--seeds", "0", "--samples", "20", "--digits", "100",
             "--nproc", "1"]
    rows = sit_vs_dit.main(flags)["rows"]
    assert [(r["objective"], r["sampler"], r["evaluations"]) for r in rows] == [
        (objective, name, evaluations) for objective, names in sit_vs_dit.SAMPLERS.items() for name in names
        for evaluations in sit_vs_dit.EVALUATIONS]
    assert all(math.isfinite(r["fd_digits"]) and r["fd_digits_std"] == 0 for r in rows)  # one seed: no spread
    sit = torch.load(next((tmp_path / "runs" / "SiT-seed0").rglob("0000002.pt")), weights_only=True)
    assert (sit["args"]["model"], sit["args"]["path_type"], sit["args"]["global_seed"]) == ("SiT-Nano/4", "Linear", 0)
    # Stored results are reused: a rerun trains and samples nothing.
    runs = (tmp_path / "runs.json").read_text()
    sit_vs_dit.main(flags)
    assert (tmp_path / "runs.json").read_text() == runs and (tmp_path / "sit_vs_dit.png").is_file()


def test_scaling_refuses_to_continue_or_relabel_a_grid_trained_otherwise(tmp_path):
    """Issue 34: a constant-rate grid rerun with --halve-lr-at 200 was reported as halved although
    nothing was retrained, and a changed --global-batch-size was continued without a word."""
    from experiments import scaling

    recipe = dict(global_batch_size=64, warmup_steps=100, ema_decay=0.995, image_size=16, lr=1.5e-3)
    checkpoints = tmp_path / "000-DiT-Pico-8" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (200, 400):  # trained at a constant rate
        torch.save({"args": recipe}, checkpoints / f"{step:07d}.pt")
    grid = argparse.Namespace(**recipe)
    scaling.check_trained_as(tmp_path, grid, None)  # the same recipe: continued
    with pytest.raises(SystemExit, match="0000400.pt was trained with --lr 0.0015, this grid asks for 0.00075 at step"):
        scaling.check_trained_as(tmp_path, grid, 200)
    with pytest.raises(SystemExit, match="trained with --global-batch-size 64, this grid asks for 32"):
        scaling.check_trained_as(tmp_path, argparse.Namespace(**{**recipe, "global_batch_size": 32}), None)
