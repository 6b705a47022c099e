"""Which sampler gives the official 250-step quality fastest? FID, sFID, class accuracy and wall time
of one model's samples under every sampler, step count and guidance interval, on the CPU.

    python experiments/sampler_sweep.py [--ckpt CKPT] [--out results/sampler-sweep] [--samples 1000]

Without --ckpt it trains the demo's model first (demo/mnist.py's recipe; continued if interrupted).
Every setting draws --samples digits (the same noise and labels: 100 per class by default) with
classifier-free guidance at --cfg-scale, timed; FID and sFID against --reference real digits the
model was trained on, class accuracy by the demo's CNN. Each finished setting is stored in
sweep.json, so a rerun only does what is missing. Writes sweep.md (the table) and a plot of FID
against sampling time.
"""
import argparse
import json
from pathlib import Path

import torch

from ditlib.command_line import settings_from
from ditlib.errors import one_line_errors
from ditlib.files import atomic_write_text
from ditlib.images import to_uint8_images
from ditlib.metrics import evaluate, image_features
from ditlib.samplers import Sampler
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

# sampler:steps[:LO-HI guidance interval]. Network evaluations per sample: one a step (each a doubled
# batch when guided); DDPM and DDIM are the IDDPM loops, dpm++ and unipc diffusers' solvers.
DEFAULT_SETTINGS = ["ddpm:250", "ddpm:100", "ddpm:50", "ddim:50", "ddim:25", "dpm++:25", "dpm++:20", "dpm++:15",
                    "dpm++:10", "unipc:20", "unipc:10", "ddpm:250:0-0.7", "dpm++:20:0-0.7", "dpm++:20:0.1-0.7"]


def parse_setting(text: str) -> tuple[str, int, tuple]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"a setting is sampler:steps[:LO-HI], got {text!r}")
    interval = tuple(float(v) for v in parts[2].split("-")) if len(parts) == 3 else None
    return parts[0], int(parts[1]), interval


def markdown(rows: list) -> list:
    lines = ["| sampler | steps | guidance interval | forward passes per image | time (s) | FID | sFID "
             "| class accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        interval = "-".join(f"{v:g}" for v in row["interval"]) if row["interval"] else "all steps"
        lines.append(f"| {row['sampler']} | {row['steps']} | {interval} | {row['nfe']:.0f} | {row['seconds']:.1f} | "
                     f"{row['fid']:.2f} | {row['sfid']:.2f} | {row['accuracy']:.3f} |")
    return lines


def plot(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    for sampler, marker in (("ddpm", "o"), ("ddim", "s"), ("dpm++", "^"), ("unipc", "D")):
        for with_interval in (False, True):
            chosen = sorted((r for r in rows if r["sampler"] == sampler and bool(r["interval"]) == with_interval),
                            key=lambda r: r["seconds"])
            if chosen:
                axis.plot([r["seconds"] for r in chosen], [r["fid"] for r in chosen], marker=marker,
                          linestyle="--" if with_interval else "-", fillstyle="none" if with_interval else "full",
                          label=sampler + (" + guidance interval" if with_interval else ""))
                for r in chosen:
                    axis.annotate(str(r["steps"]), (r["seconds"], r["fid"]), textcoords="offset points", xytext=(4, 4),
                                  fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("sampling time (s, log scale)")
    axis.set_ylabel("FID (lower is better)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sampler-sweep")
    parser.add_argument("--ckpt", type=Path, default=None, help="a pixel-space MNIST DiT (default: train the demo's)")
    add_recipe_flags(parser)
    parser.add_argument("--samples", type=int, default=1000, help="digits per setting (a multiple of 10)")
    parser.add_argument("--reference", type=int, default=1000, help="real training digits behind FID and sFID")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=500, help="samples per sampling batch")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="sampler:steps[:LO-HI] ...")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "sampler_sweep.png")
    args = parser.parse_args(argv)
    check_recipe_flags(args)
    args.out.mkdir(parents=True, exist_ok=True)

    digits, labels = load_mnist()
    checkpoint = args.ckpt
    if checkpoint is None:
        data = write_image_folder(digits, labels, args.out / "mnist")
        recipe = settings_from(Recipe, vars(args))
        checkpoint = final_checkpoint(train(recipe, data, args.out / "runs", "--log-every", "100"))
    model = load_digit_model(checkpoint)
    real, targets, train_part, _ = real_digits(model.input_size)
    classifier = train_classifier(as_model_input(real[train_part]), targets[train_part])
    network = fid_network()
    reference = fid_reference(network, real, train_part[: args.reference], args.out)
    class_labels = torch.arange(10).repeat_interleave(args.samples // 10)

    results_path = args.out / "sweep.json"
    stored = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for setting in args.settings:
        key = f"{checkpoint.resolve()}|{setting}|{args.samples}|{args.cfg_scale}|{args.reference}"
        if key in stored:
            continue
        sampler, steps, interval = parse_setting(setting)
        samples, seconds = draw(model, sampler, steps, interval, args.cfg_scale, class_labels, args.batch_size, seed=0)
        metrics = evaluate(image_features(network, to_uint8_images(samples), progress=False), reference)
        guided_steps = steps if interval is None else sum(
            interval[0] <= t / 1000 <= interval[1] for t in Sampler(sampler, steps).timesteps())
        stored[key] = {"sampler": sampler, "steps": steps, "interval": interval, "seconds": seconds,
                       "nfe": steps + guided_steps,  # a guided step runs the image twice (with and without label)
                       "fid": metrics["fid"], "sfid": metrics["sfid"],
                       "accuracy": accuracy(classifier, samples.mean(1, keepdim=True), class_labels)}
        print(markdown([stored[key]])[-1], flush=True)
        atomic_write_text(results_path, json.dumps(stored, indent=1))

    rows = [stored[f"{checkpoint.resolve()}|{s}|{args.samples}|{args.cfg_scale}|{args.reference}"]
            for s in args.settings]
    table = markdown(rows)
    atomic_write_text(args.out / "sweep.md", "\n".join(table) + "\n")
    print("\n".join(table))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.plot)
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    with one_line_errors():
        main()
