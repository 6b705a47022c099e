"""The paper's scaling result at small scale: FID against forward Gflops, by model size and by patch size.

    python experiments/scaling.py [--out results/scaling] [--steps 2400] [--global-batch-size 32]

1. Trains every cell of --sizes x --patches with train.py on the 5,000 real MNIST digits at 16x16
   (pixel space), all with one recipe, one seed, the same steps and batch; --fid-every takes an FID
   of --fid-samples EMA samples at a third, two thirds and the end of the run (unguided, as the
   paper's scaling plots; DPM-Solver++ 20 steps, the fast sampler that keeps quality).
2. Draws --eval-samples digits per cell from the final EMA (classes balanced, same sampler,
   unguided) for the table's FID against --reference real digits and the class accuracy.
3. Prints and writes scaling.md and scaling.json, and three plots: FID vs training steps, one panel
   per patch size (the paper's Figure 6); FID vs forward Gflops with the correlation (Figure 8);
   FID vs training compute, Gflops x batch x steps x 3 (Figure 9).
A rerun skips finished cells and continues an unfinished training run (whose train time then counts
only the part run last).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from experiments.digits import (
    ROOT,
    accuracy,
    as_model_input,
    draw,
    fid_network,
    fid_reference,
    final_checkpoint,
    load_digit_model,
    load_mnist,
    real_digits,
    train,
    train_classifier,
    write_image_folder,
)
from images import to_uint8_images
from metrics import fid_helper_network, frechet_distance, image_features
from models import DiT_models, count_forward_gmacs

SAMPLER, SAMPLER_STEPS = "dpm++", 20


def cell_facts(model_name: str, image_size: int) -> dict:
    """Width, depth, tokens, parameters and forward Gflops (the paper's Table 4 measure) of one cell."""
    with torch.device("meta"):
        model = DiT_models[model_name](input_size=image_size, in_channels=3, num_classes=10)
    return {"model": model_name, "width": model.pos_embed.shape[-1], "depth": len(model.blocks),
            "patch": model.patch_size, "tokens": model.x_embedder.num_patches,
            "params": sum(p.numel() for p in model.parameters()), "gflops": count_forward_gmacs(model)}


def train_cell(args, model_name: str, data: Path, reference_file: Path) -> tuple[Path, float]:
    """train.py for one cell (continuing an unfinished run); (experiment folder, seconds)."""
    recipe = argparse.Namespace(**{**vars(args), "model": model_name, "max_steps": args.steps})
    fid_every = max(1, args.steps // 3)
    started = time.time()
    experiment = train(recipe, data, args.out / "runs" / model_name.replace("/", "-"),
                       "--log-every", str(max(1, args.steps // 60)), "--fid-every", str(fid_every),
                       "--fid-ref", str(reference_file), "--fid-samples", str(args.fid_samples),
                       "--fid-sampler", SAMPLER, "--fid-steps", str(SAMPLER_STEPS), "--fid-cfg-scale", "1",
                       "--inception", str(fid_helper_network()))
    return experiment, time.time() - started


def judge_cell(checkpoint: Path, classifier, network, reference: dict, samples: int) -> dict:
    """FID and class accuracy of `samples` unguided EMA samples, classes balanced."""
    labels = torch.arange(samples) % 10
    images, seconds = draw(load_digit_model(checkpoint), SAMPLER, SAMPLER_STEPS, None, 1.0, labels, batch_size=500,
                           seed=0)
    return {"fid": frechet_distance(image_features(network, to_uint8_images(images)), reference),  # no sFID, P/R
            "accuracy": accuracy(classifier, images.mean(1, keepdim=True), labels), "sampling_seconds": seconds}


def read_curve(experiment: Path) -> tuple[list, float]:
    """([(step, FID)] logged by --fid-every, the loss averaged over the last tenth of the run)."""
    records = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["fid"]) for r in records if "fid" in r]
    losses = [r for r in records if "loss" in r]
    last_step = losses[-1]["step"]
    tail = [r["loss"] for r in losses if r["step"] > 0.9 * last_step] or [losses[-1]["loss"]]
    return curve, float(np.mean(tail))


def correlation(x: list, y: list) -> float:
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 else float("nan")


def markdown(cells: list, args) -> list:
    fid_columns = [f"FID-{args.fid_samples} @{step}" for step, _ in cells[0]["curve"]]
    lines = ["| model | width x depth | patch | tokens | params | Gflops | train compute (TFLOP) | final loss | "
             + " | ".join(fid_columns) + f" | FID-{args.eval_samples} | class accuracy | train time |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(fid_columns) + "---|---|---|"]
    for c in cells:
        curve = " | ".join(f"{fid:.1f}" for _, fid in c["curve"])
        lines.append(f"| {c['model']} | {c['width']} x {c['depth']} | {c['patch']} | {c['tokens']} | "
                     f"{c['params'] / 1e6:.2f}M | {c['gflops']:.4f} | {c['compute'] / 1e3:.2f} | {c['loss']:.4f} | "
                     f"{curve} | {c['fid']:.2f} | {c['accuracy']:.3f} | {c['train_seconds'] / 60:.1f} min |")
    return lines


def plot(cells: list, args, prefix: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(c["size"] for c in cells))
    patches = sorted({c["patch"] for c in cells}, reverse=True)
    colours = dict(zip(sizes, plt.cm.viridis(np.linspace(0.1, 0.85, len(sizes)))))
    markers = dict(zip(patches, "s^o"))
    written = []

    figure, axes = plt.subplots(1, len(patches), figsize=(4.2 * len(patches), 3.6), sharey=True, squeeze=False)
    for axis, patch in zip(axes[0], patches):
        for c in (c for c in cells if c["patch"] == patch):
            steps, fids = zip(*c["curve"])
            axis.plot(steps, fids, "-o", color=colours[c["size"]], label=c["model"])
        axis.set(title=f"patch size {patch}", xlabel="training steps")
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel(f"FID-{args.fid_samples} (unguided)")
    written.append(save(figure, prefix.with_name(prefix.name + "_fid_vs_steps.png")))

    figure, axis = plt.subplots(figsize=(5.2, 4))
    for c in cells:
        axis.scatter(c["gflops"], c["fid"], color=colours[c["size"]], marker=markers[c["patch"]], s=50,
                     label=c["model"])
    r = correlation(np.log10([c["gflops"] for c in cells]), [c["fid"] for c in cells])
    axis.set(xscale="log", xlabel="forward Gflops per image", ylabel=f"FID-{args.eval_samples} (unguided)",
             title=f"FID vs Gflops: correlation {r:.2f} (with log Gflops)")
    axis.legend(fontsize=7, ncol=2)
    written.append(save(figure, prefix.with_name(prefix.name + "_fid_vs_gflops.png")))

    figure, axis = plt.subplots(figsize=(5.2, 4))
    for c in cells:
        compute = [c["gflops"] * 1e9 * args.global_batch_size * step * 3 for step, _ in c["curve"]]
        axis.plot(compute, [fid for _, fid in c["curve"]], "-", marker=markers[c["patch"]],
                  color=colours[c["size"]], label=c["model"])
    axis.set(xscale="log", xlabel="training compute (FLOPs: Gflops x batch x steps x 3)",
             ylabel=f"FID-{args.fid_samples} (unguided)", title="FID vs training compute")
    axis.legend(fontsize=7, ncol=2)
    written.append(save(figure, prefix.with_name(prefix.name + "_fid_vs_compute.png")))
    return written


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "scaling")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "scaling", help="prefix of the three PNGs")
    parser.add_argument("--sizes", nargs="+", default=["Pico", "Nano", "Micro"], help="DiT-<size>/<patch> models")
    parser.add_argument("--patches", nargs="+", type=int, default=[8, 4, 2])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--fid-samples", type=int, default=200, help="samples of each --fid-every FID on the way")
    parser.add_argument("--eval-samples", type=int, default=1000, help="samples of each final FID and accuracy")
    parser.add_argument("--reference", type=int, default=1000, help="real digits behind the FID statistics")
    parser.add_argument("--digits", type=int, default=None, help="train on this many of the 5,000 digits (smoke tests)")
    parser.add_argument("--nproc", type=int, default=2, help="train.py processes (torchrun, one thread each)")
    args = parser.parse_args(argv)
    unknown = [f"DiT-{s}/{p}" for s in args.sizes for p in args.patches if f"DiT-{s}/{p}" not in DiT_models]
    if unknown:
        raise SystemExit(f"not in models.DiT_models: {', '.join(unknown)}")

    digits, labels = load_mnist()
    if args.digits is not None:
        keep = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[: args.digits].numpy()
        digits, labels = digits[keep], labels[keep]
    data = write_image_folder(digits, labels, args.out / "mnist")
    real, targets, train_part, _ = real_digits(args.image_size)
    network = fid_network()
    reference = fid_reference(network, real, train_part[: args.reference], args.out)
    reference_file = args.out / f"fid_reference_{args.image_size}px_{args.reference}.npz"
    classifier = None

    recipe = {k: getattr(args, k) for k in ("image_size", "steps", "global_batch_size", "lr", "warmup_steps",
                                            "ema_decay", "fid_samples", "eval_samples", "reference", "digits")}
    cells = []
    for size in args.sizes:
        for patch in args.patches:
            model_name = f"DiT-{size}/{patch}"
            stored = args.out / "cells" / f"{size}-{patch}.json"
            if stored.is_file() and json.loads(stored.read_text())["recipe"] == recipe:
                cells.append(json.loads(stored.read_text()))
                print(f"[scaling] {model_name}: done earlier", flush=True)
                continue
            experiment, seconds = train_cell(args, model_name, data, reference_file)
            if classifier is None:
                classifier = train_classifier(as_model_input(real[train_part]), targets[train_part])
            curve, loss = read_curve(experiment)
            cell = {**cell_facts(model_name, args.image_size), "size": size, "recipe": recipe, "curve": curve,
                    "loss": loss, "train_seconds": seconds,
                    **judge_cell(final_checkpoint(experiment), classifier, network, reference, args.eval_samples)}
            cell["compute"] = cell["gflops"] * args.global_batch_size * args.steps * 3  # Gflop (paper's Figure 9)
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps(cell, indent=1))
            cells.append(cell)
            print(f"[scaling] {model_name}: FID {cell['fid']:.2f}, accuracy {cell['accuracy']:.3f}", flush=True)

    log_gflops = np.log10([c["gflops"] for c in cells])
    summary = {"r_fid_log_gflops": correlation(log_gflops, [c["fid"] for c in cells]),
               "r_fid_log_params": correlation(np.log10([c["params"] for c in cells]), [c["fid"] for c in cells]),
               "r_loss_log_gflops": correlation(log_gflops, [c["loss"] for c in cells])}
    table = markdown(cells, args)
    table += ["",
              f"Pearson correlation of FID-{args.eval_samples} with log10 Gflops: {summary['r_fid_log_gflops']:.3f}; "
              f"with log10 parameters: {summary['r_fid_log_params']:.3f}; final loss with log10 Gflops: "
              f"{summary['r_loss_log_gflops']:.3f}."]
    plots = plot(cells, args, args.plots)
    (args.out / "scaling.json").write_text(json.dumps({"cells": cells, "summary": summary}, indent=1))
    (args.out / "scaling.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return {"cells": cells, "summary": summary, "table": table, "plots": plots}


if __name__ == "__main__":
    main()
