"""The paper's block-design ablation (its Figure 5: in-context, cross-attention, adaLN, adaLN-Zero)
at small scale, on the real MNIST digits of the demo, on the CPU.

    python experiments/block_ablation.py [--out results/block-ablation] [--max-steps 3000]

Each design trains with the demo's recipe (same config, steps, data order and seed; only --block
differs), then 100 digits per class are drawn from its EMA weights without guidance (the paper's
FID protocol) and judged by the demo's CNN (class accuracy) and by FID against 4,000 real digits.
Writes ablation.json, ablation.md (the table) and loss_curves.png; an interrupted run continues.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ditlib.command_line import settings_from
from ditlib.errors import one_line_errors
from ditlib.files import atomic_write_text
from ditlib.images import to_uint8_images
from ditlib.metrics import evaluate, image_features
from experiments.digits import (
    ROOT,
    Recipe,
    accuracy,
    add_recipe_flags,
    as_model_input,
    check_recipe_flags,
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
from models import BLOCK_DESIGNS


def plot_losses(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    for design, (steps, losses) in curves.items():
        axis.plot(steps, losses, label=design, linewidth=1.3)
    axis.set_xlabel("training step")
    axis.set_ylabel("training loss (mean of each logged interval)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "block-ablation")
    add_recipe_flags(parser)
    # The recipe README's ablation table was measured with (the demo's own recipe is tuned for time).
    parser.set_defaults(max_steps=3000, global_batch_size=128, lr=3e-3, warmup_steps=200, ema_decay=0.998,
                        sample_steps=100, per_class=100, fid_reference=4000, nproc=1)
    parser.add_argument("--designs", nargs="+", choices=BLOCK_DESIGNS, default=list(BLOCK_DESIGNS))
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    check_recipe_flags(args)

    digits, labels = load_mnist()
    data = write_image_folder(digits, labels, args.out / "mnist")
    real, targets, train_part, held_out = real_digits(args.image_size)
    classifier = train_classifier(as_model_input(real[train_part]), targets[train_part])
    network = fid_network()
    reference = fid_reference(network, real, train_part[: args.fid_reference], args.out)

    rows, curves = [], {}
    for design in args.designs:
        experiment = train(settings_from(Recipe, vars(args)), data, args.out / "runs" / design, "--block", design,
                           "--log-every", str(args.log_every))
        records = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "loss" in r]
        curves[design] = ([r["step"] for r in records], [r["loss"] for r in records])
        tail = [r["loss"] for r in records[-max(len(records) // 10, 1):]]  # the last tenth of training
        sample_labels = torch.arange(10).repeat_interleave(args.per_class)
        samples, _ = draw(load_digit_model(final_checkpoint(experiment)), "ddpm", args.sample_steps, None, 1.0,
                          sample_labels, batch_size=len(sample_labels), seed=0)
        metrics = evaluate(image_features(network, to_uint8_images(samples), progress=True), reference)
        checkpoint = torch.load(final_checkpoint(experiment), map_location="cpu", weights_only=True)
        rows.append({
            "block": design, "params": sum(v.numel() for k, v in checkpoint["ema"].items() if k != "pos_embed"),
            "steps": checkpoint["train_steps"], "final_loss": float(np.mean(tail)),
            "class_accuracy": accuracy(classifier, samples.mean(1, keepdim=True), sample_labels),
            "fid": metrics["fid"], "precision": metrics["precision"], "recall": metrics["recall"],
        })
        print(f"[ablation] {rows[-1]}", flush=True)

    floor = evaluate(image_features(network, real[held_out[: 10 * args.per_class]]), reference)["fid"]
    table = ["| block | trained params | steps | final loss | class accuracy | FID | precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['block']} | {r['params']:,} | {r['steps']} | {r['final_loss']:.4f} | {r['class_accuracy']:.3f} "
              f"| {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |" for r in rows]
    table.append(f"| (held-out real digits) | | | | | {floor:.2f} | | |")
    atomic_write_text(args.out / "ablation.md", "\n".join(table) + "\n")
    atomic_write_text(args.out / "ablation.json", json.dumps({"rows": rows, "fid_floor": floor, "args": {
        k: str(v) for k, v in vars(args).items()}}, indent=1))
    plot_losses(curves, args.out / "loss_curves.png")
    print("\n".join(table))
    print(f"[ablation] table, JSON and loss curves in {args.out}")


if __name__ == "__main__":
    with one_line_errors():
        main()
