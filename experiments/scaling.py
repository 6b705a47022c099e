"""The paper's scaling result at small scale: sample quality against forward Gflops, by model size and patch size.

    python -m experiments.scaling [--out results/scaling] [--steps 6000] [--halve-lr-at 4800] ...

1. Trains every cell of --sizes x --patches with train.py on the 5,000 real MNIST digits at 16x16
   (pixel space), all with one recipe, one seed, the same steps and batch, keeping a checkpoint
   every --eval-every steps.
2. Judges every checkpoint by --curve-samples unguided EMA samples (DPM-Solver++ 20 steps, as the
   paper's scaling plots sample without guidance): FD-digits (the Frechet distance in the digit
   judge's features, experiments/digits.py) and the judge's class accuracy (the paper's Figure 6).
3. At the last step, --eval-samples samples per cell for the table: FD-digits, class accuracy and
   Inception FID (of the first --fid-samples), each beside its floor (as many held-out real digits
   against the same reference).
4. Prints and writes scaling.md and scaling.json, and four figures: FD-digits against training
   steps, one panel per patch size (Figure 6); against forward Gflops with the correlation
   (Figure 8); against training compute, Gflops x batch x steps x 3 (Figure 9); and a sample grid
   per cell (Figure 2's look).
Every evaluation is stored beside its checkpoint, so a rerun only does what is missing, and a rerun
with a larger --steps continues every cell's training run where it stopped (the learning rate is
constant after warm-up, as in the paper, so a longer run extends the same curve). From --halve-lr-at
on, every cell continues at half the rate: the largest cell's stable rate falls as it trains.
"""
import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ditlib.checkpoints import read_checkpoint
from ditlib.command_line import settings_from
from ditlib.errors import one_line_errors
from ditlib.files import atomic_write, atomic_write_text
from ditlib.images import to_uint8_images
from ditlib.metrics import frechet_distance, image_features
from ditlib.runs import step_of
from experiments.digits import (
    ROOT,
    Recipe,
    accuracy,
    as_model_input,
    digit_distance,
    draw,
    fid_network,
    fid_reference,
    load_digit_model,
    load_mnist,
    real_digits,
    train,
    train_classifier,
    write_image_folder,
)
from models import DiT_models, count_forward_gmacs

SAMPLER, SAMPLER_STEPS = "dpm++", 20
# The recipe flags every cell shares; a stored evaluation counts only under the same recipe (--steps aside).
RECIPE = ("image_size", "eval_every", "global_batch_size", "lr", "warmup_steps", "ema_decay", "curve_samples",
          "eval_samples", "fid_samples", "reference", "digits")


def cell_facts(model_name: str, image_size: int) -> dict:
    """Width, depth, tokens, parameters and forward Gflops (the paper's Table 4 measure) of one cell."""
    with torch.device("meta"):
        model = DiT_models[model_name](input_size=image_size, in_channels=3, num_classes=10)
    return {"model": model_name, "width": model.pos_embed.shape[-1], "depth": len(model.blocks),
            "patch": model.patch_size, "tokens": model.x_embedder.num_patches,
            "params": sum(p.numel() for p in model.parameters()), "gflops": count_forward_gmacs(model)}


class Judge:
    """What every sample set is measured with: the digit CNN, its reference digits and floors, and
    (built on first use, it is the slow part) Inception-v3 with its reference statistics."""

    def __init__(self, image_size: int, reference: int, cache_dir: Path):
        self.cache_dir = cache_dir
        self.real, self.targets, train_part, self.held_out = real_digits(image_size)
        self.classifier = train_classifier(as_model_input(self.real[train_part]), self.targets[train_part])
        self.fit_digits = train_part[:reference]
        self.reference = as_model_input(self.real[self.fit_digits])
        self.inception = None

    def digit_floor(self, samples: int) -> float:
        """FD-digits of as many held-out real digits: what a perfect model would score."""
        return digit_distance(self.classifier, as_model_input(self.real[self.held_out[:samples]]), self.reference)

    def digits(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        grey = images.mean(1, keepdim=True)
        return {"fd_digits": digit_distance(self.classifier, grey, self.reference),
                "accuracy": accuracy(self.classifier, grey, labels)}

    def fid(self, uint8_images: np.ndarray) -> float:
        if self.inception is None:
            network = fid_network()
            self.inception = network, fid_reference(network, self.real, self.fit_digits, self.cache_dir)
        network, reference = self.inception
        return frechet_distance(image_features(network, uint8_images), reference)


def judge_checkpoint(checkpoint: Path, judge: Judge, samples: int) -> tuple[dict, torch.Tensor]:
    """FD-digits and class accuracy of `samples` unguided EMA samples, classes balanced; (result, samples)."""
    labels = torch.arange(samples) % 10
    images, seconds = draw(load_digit_model(checkpoint), SAMPLER, SAMPLER_STEPS, None, 1.0, labels, batch_size=500,
                           seed=0)
    return {**judge.digits(images, labels), "sampling_seconds": seconds}, images


def stored(path: Path, recipe: dict, compute):
    """The result stored at `path` under this recipe, else compute() stored there."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.pop("recipe") == recipe:
            return saved
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**result, "recipe": recipe}, indent=1))
    return result


def training_record(experiment: Path) -> tuple[float, float]:
    """(mean loss over the last tenth of the run, seconds of training), from metrics.jsonl: each log
    record holds the speed of the steps since the one before, so resumed runs add up."""
    records = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    last_step = losses[-1]["step"]
    tail = [r["loss"] for r in losses if r["step"] > 0.9 * last_step] or [losses[-1]["loss"]]
    steps = np.diff([0] + [r["step"] for r in losses])
    return float(np.mean(tail)), float(sum(steps / np.array([r["steps_per_sec"] for r in losses])))


def judged_checkpoints(experiment: Path, eval_every: int) -> list:
    """The checkpoints on the --eval-every grid: a stop by SIGTERM leaves one at another step, kept only to resume."""
    checkpoints = sorted((experiment / "checkpoints").glob("*.pt"))
    return [c for c in checkpoints if step_of(c) > 0 and step_of(c) % eval_every == 0]


def latest_step(results: Path) -> int:
    return max((step_of(c) for c in results.glob("*/checkpoints/*.pt")), default=0)


def check_trained_as(results: Path, args, halve_at) -> None:
    """Refuse to continue or relabel a cell whose checkpoints were trained with another recipe: a
    batch, warm-up, EMA or size of their own, or another rate before or after the halving step."""
    for checkpoint in sorted(results.glob("*/checkpoints/*.pt")):
        saved, step = read_checkpoint(checkpoint)["args"], step_of(checkpoint)
        lr = args.lr / 2 if halve_at is not None and step > halve_at else args.lr
        for flag, now in (("global_batch_size", args.global_batch_size), ("warmup_steps", args.warmup_steps),
                          ("ema_decay", args.ema_decay), ("image_size", args.image_size), ("lr", lr)):
            if saved.get(flag) != now:
                raise SystemExit(f"{checkpoint} was trained with --{flag.replace('_', '-')} {saved.get(flag)}, this "
                                 f"grid asks for {now} at step {step}: it would be continued or reported as "
                                 f"another recipe; use another --out")


def run_cell(args, size: str, patch: int, data: Path, judge: Judge, recipe: dict) -> dict:
    """Train one cell to --steps (continuing its run; at --lr / 2 past --halve-lr-at), judge each
    checkpoint, and the last one in full."""
    model_name = f"DiT-{size}/{patch}"
    results = args.out / "runs" / model_name.replace("/", "-")
    halve_at = args.halve_lr_at if 0 < args.halve_lr_at < args.steps else None
    check_trained_as(results, args, halve_at)

    def run(steps: int, lr: float, *extra: str) -> Path:
        return train(replace(settings_from(Recipe, vars(args)), model=model_name, max_steps=steps, lr=lr), data,
                     results, "--ckpt-every", str(args.eval_every),
                     "--log-every", str(math.gcd(args.log_every, args.eval_every)), *extra)  # a record per checkpoint

    if halve_at is None:
        experiment = run(args.steps, args.lr)
    else:
        if latest_step(results) < halve_at:
            run(halve_at, args.lr)
        experiment = run(args.steps, args.lr / 2, "--allow-changed-args")

    def recipe_at(step: int) -> dict:
        """A checkpoint's evaluation depends on the halving only if the checkpoint comes after it."""
        return {**recipe, "halve_lr_at": halve_at} if halve_at is not None and step > halve_at else recipe

    checkpoints = judged_checkpoints(experiment, args.eval_every)
    steps = [step_of(c) for c in checkpoints]
    if steps[-1] != args.steps:
        raise SystemExit(f"{experiment}: the last checkpoint is step {steps[-1]}, not --steps {args.steps}")
    curve = []
    for step, checkpoint in zip(steps, checkpoints):
        point = stored(experiment / "evaluations" / f"{step:07d}.json", recipe_at(step),
                       lambda: judge_checkpoint(checkpoint, judge, args.curve_samples)[0])
        curve.append({"step": step, **point})

    samples_file = experiment / "evaluations" / f"final-{args.steps:07d}.npz"

    def final() -> dict:
        result, images = judge_checkpoint(checkpoints[-1], judge, args.eval_samples)
        grey = to_uint8_images(images)[..., 0]
        with atomic_write(samples_file) as handle:
            np.savez_compressed(handle, grey)
        return {**result, "fid": judge.fid(grey[: args.fid_samples])}  # balanced labels: classes stay balanced

    loss, train_seconds = training_record(experiment)
    cell = {**cell_facts(model_name, args.image_size), "size": size, "steps": args.steps, "curve": curve,
            "loss": loss, "train_seconds": train_seconds,
            **stored(experiment / "evaluations" / f"final-{args.steps:07d}.json", recipe_at(args.steps), final)}
    cell["compute"] = cell["gflops"] * args.global_batch_size * args.steps * 3  # Gflop, the paper's Figure 9
    cell["samples_file"] = str(samples_file)
    print(f"[scaling] {model_name}: FD-digits {cell['fd_digits']:.1f}, accuracy {cell['accuracy']:.3f}, "
          f"FID {cell['fid']:.1f}", flush=True)
    return cell


def correlation(x: list, y: list) -> float:
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 else float("nan")


def markdown(cells: list, floors: dict, args) -> list:
    points = [p["step"] for p in cells[0]["curve"]]
    lines = ["| model | width x depth | patch | tokens | params | Gflops | train compute (TFLOP) | final loss | "
             + " | ".join(f"FD-digits @{step}" for step in points)
             + f" | FD-digits-{args.eval_samples} | class accuracy | FID-{args.fid_samples} | train time |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(points) + "---|---|---|---|"]
    for c in cells:
        curve = " | ".join(f"{p['fd_digits']:.1f} ({p['accuracy']:.2f})" for p in c["curve"])
        lines.append(f"| {c['model']} | {c['width']} x {c['depth']} | {c['patch']} | {c['tokens']} | "
                     f"{c['params'] / 1e6:.2f}M | {c['gflops']:.4f} | {c['compute'] / 1e3:.2f} | {c['loss']:.4f} | "
                     f"{curve} | {c['fd_digits']:.1f} | {c['accuracy']:.3f} | {c['fid']:.1f} | "
                     f"{c['train_seconds'] / 60:.1f} min |")
    lines.append("| held-out real digits (the floor) | | | | | | | | " + " | ".join(
        f"{floors['curve']:.1f}" for _ in points) + f" | {floors['final']:.1f} | {floors['accuracy']:.3f} | "
        f"{floors['fid']:.1f} | |")
    return lines


def plot(cells: list, floors: dict, args, prefix: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(c["size"] for c in cells))
    patches = sorted({c["patch"] for c in cells}, reverse=True)
    colours = dict(zip(sizes, plt.cm.viridis(np.linspace(0.1, 0.85, len(sizes)))))
    markers = dict(zip(patches, "s^o"))
    curve_label = f"FD-digits, {args.curve_samples} unguided samples"
    written = []

    figure, axes = plt.subplots(1, len(patches), figsize=(4.2 * len(patches), 3.6), sharey=True, squeeze=False)
    for axis, patch in zip(axes[0], patches):
        for c in (c for c in cells if c["patch"] == patch):
            axis.plot([p["step"] for p in c["curve"]], [p["fd_digits"] for p in c["curve"]], "-o",
                      color=colours[c["size"]], label=c["model"])
        axis.axhline(floors["curve"], color="grey", linestyle=":", label="real digits")
        axis.set(title=f"patch size {patch}", xlabel="training steps", yscale="log")
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel(curve_label)
    written.append(save(figure, prefix.with_name(prefix.name + "_fd_vs_steps.png")))

    figure, axis = plt.subplots(figsize=(5.2, 4))
    for c in cells:
        axis.scatter(c["gflops"], c["fd_digits"], color=colours[c["size"]], marker=markers[c["patch"]], s=50,
                     label=c["model"])
    r = correlation(np.log10([c["gflops"] for c in cells]), np.log10([c["fd_digits"] for c in cells]))
    axis.axhline(floors["final"], color="grey", linestyle=":", label="real digits")
    axis.set(xscale="log", yscale="log", xlabel="forward Gflops per image",
             ylabel=f"FD-digits, {args.eval_samples} unguided samples",
             title=f"FD-digits vs Gflops: r = {r:.2f} (log-log)")
    axis.legend(fontsize=7, ncol=2)
    written.append(save(figure, prefix.with_name(prefix.name + "_fd_vs_gflops.png")))

    figure, axis = plt.subplots(figsize=(5.2, 4))
    for c in cells:
        compute = [c["gflops"] * 1e9 * args.global_batch_size * p["step"] * 3 for p in c["curve"]]
        axis.plot(compute, [p["fd_digits"] for p in c["curve"]], "-", marker=markers[c["patch"]],
                  color=colours[c["size"]], label=c["model"])
    axis.set(xscale="log", yscale="log", xlabel="training compute (FLOPs: Gflops x batch x steps x 3)",
             ylabel=curve_label, title="FD-digits vs training compute")
    axis.legend(fontsize=7, ncol=2)
    written.append(save(figure, prefix.with_name(prefix.name + "_fd_vs_compute.png")))

    figure, axes = plt.subplots(len(sizes), len(patches), figsize=(2.6 * len(patches), 2.9 * len(sizes)),
                                squeeze=False)
    for c in cells:
        axis = axes[sizes.index(c["size"])][patches.index(c["patch"])]
        with np.load(c["samples_file"]) as stored_samples:
            digits = stored_samples["arr_0"]
        rows = min(6, len(digits) // 10)  # balanced labels: each row holds the classes 0-9
        axis.imshow(digits[: rows * 10].reshape(rows, 10, *digits.shape[1:]).transpose(0, 2, 1, 3).reshape(
            rows * digits.shape[1], 10 * digits.shape[2]), cmap="gray", vmin=0, vmax=255)
        axis.set_title(f"{c['model']}: FD {c['fd_digits']:.0f}, acc {c['accuracy']:.2f}", fontsize=8)
        axis.axis("off")
    written.append(save(figure, prefix.with_name(prefix.name + "_samples.png")))
    return written


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "scaling")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "scaling", help="prefix of the four PNGs")
    parser.add_argument("--sizes", nargs="+", default=["Pico", "Nano", "Micro"], help="DiT-<size>/<patch> models")
    parser.add_argument("--patches", nargs="+", type=int, default=[8, 4, 2])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--eval-every", type=int, default=600, help="steps between checkpoints that are judged")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3, help="constant after warm-up; DiT-Micro/2 diverges at 3e-3")
    parser.add_argument("--halve-lr-at", type=int, default=4800, help="from this step every cell trains at --lr / 2 "
                        "(0: never); at a constant 1.5e-3 DiT-Micro/2 spikes near step 5,950")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--curve-samples", type=int, default=500, help="samples judged at each checkpoint")
    parser.add_argument("--eval-samples", type=int, default=1000, help="samples judged at the end (<= 1,000: the "
                                                                       "held-out real digits behind the floor)")
    parser.add_argument("--fid-samples", type=int, default=500, help="of those, how many Inception FID takes "
                                                                     "(Inception-v3 is the slow part on a CPU)")
    parser.add_argument("--reference", type=int, default=1000, help="real training digits behind both distances")
    parser.add_argument("--digits", type=int, default=None, help="train on this many of the 5,000 digits (smoke tests)")
    parser.add_argument("--nproc", type=int, default=2, help="train.py processes (torchrun, one thread each)")
    args = parser.parse_args(argv)
    unknown = [f"DiT-{s}/{p}" for s in args.sizes for p in args.patches if f"DiT-{s}/{p}" not in DiT_models]
    if unknown:
        raise SystemExit(f"not in models.DiT_models: {', '.join(unknown)}")
    for flag, value in (("--steps", args.steps), ("--nproc", args.nproc),
                        ("--global-batch-size", args.global_batch_size)):
        if value < 1:
            raise SystemExit(f"{flag} must be at least 1, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise SystemExit(f"--lr must be a positive number, got {args.lr}")
    if args.eval_every < 1:
        raise SystemExit(f"--eval-every must be at least 1 (steps between judged checkpoints), got {args.eval_every}")
    for flag, value in (("--steps", args.steps), ("--halve-lr-at", args.halve_lr_at)):
        if value < 0 or value % args.eval_every:
            raise SystemExit(f"{flag} {value} must be a multiple of --eval-every {args.eval_every}")
    if not 2 <= args.eval_samples <= 1000 or max(args.curve_samples, args.fid_samples) > args.eval_samples:
        raise SystemExit("--eval-samples must lie in [2, 1000] (the held-out digits), and --curve-samples and "
                         "--fid-samples not above it")

    digits, labels = load_mnist()
    if args.digits is not None:
        keep = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[: args.digits].numpy()
        digits, labels = digits[keep], labels[keep]
    data = write_image_folder(digits, labels, args.out / "mnist")
    recipe = {k: getattr(args, k) for k in RECIPE}
    judge = Judge(args.image_size, args.reference, args.out)

    cells = [run_cell(args, size, patch, data, judge, recipe) for size in args.sizes for patch in args.patches]

    held_out = judge.held_out[: args.eval_samples]
    floors = stored(args.out / f"floors-{args.eval_samples}.json", recipe, lambda: {
        "curve": judge.digit_floor(args.curve_samples), "final": judge.digit_floor(args.eval_samples),
        "accuracy": accuracy(judge.classifier, as_model_input(judge.real[held_out]), judge.targets[held_out]),
        "fid": judge.fid(judge.real[held_out[: args.fid_samples]])})
    log_gflops = np.log10([c["gflops"] for c in cells])
    log_fd = np.log10([c["fd_digits"] for c in cells])
    summary = {"r_log_fd_digits_log_gflops": correlation(log_gflops, log_fd),
               "r_log_fd_digits_log_params": correlation(np.log10([c["params"] for c in cells]), log_fd),
               "r_fid_log_gflops": correlation(log_gflops, [c["fid"] for c in cells]),
               "r_loss_log_gflops": correlation(log_gflops, [c["loss"] for c in cells]),
               "best_cell": min(cells, key=lambda c: c["fd_digits"])["model"]}
    table = markdown(cells, floors, args) + [
        "", f"Pearson correlation of log FD-digits-{args.eval_samples} with log10 Gflops: "
        f"{summary['r_log_fd_digits_log_gflops']:.3f}; with log10 parameters: "
        f"{summary['r_log_fd_digits_log_params']:.3f}; of FID-{args.fid_samples} with log10 Gflops: "
        f"{summary['r_fid_log_gflops']:.3f}; of the final loss with "
        f"log10 Gflops: {summary['r_loss_log_gflops']:.3f}."]
    plots = plot(cells, floors, args, args.plots)
    atomic_write_text(args.out / "scaling.json", json.dumps({"cells": cells, "floors": floors, "summary": summary},
                                                            indent=1))
    atomic_write_text(args.out / "scaling.md", "\n".join(table) + "\n")
    print("\n".join(table))
    return {"cells": cells, "floors": floors, "summary": summary, "table": table, "plots": plots}


if __name__ == "__main__":
    with one_line_errors():
        main()
