"""Does SiT's claim hold on a CPU: is DiT's network better trained as a flow (SiT: Linear path,
velocity) than with DDPM, at equal training and equal sampling cost?

    python -m experiments.sit_vs_dit [--out results/sit-vs-dit] [--steps 3000] [--seeds 0 1 2]

The demo's cell (`DiT-Nano/4` and `SiT-Nano/4`, 16x16 pixels, the 5,000 real MNIST digits, batch
64, lr 3e-3 after 100 warm-up steps, EMA 0.995) is trained with each objective for --steps steps
per seed, the same data, batch, rate and seed for both. Each EMA model then draws 1,000 unguided
samples (100 per class, the same noise for every sampler) at 20, 50 and 250 network evaluations:
DiT with its ancestral sampler and DPM-Solver++, SiT with its ODE (Heun, two evaluations a step)
and its SDE (Euler-Maruyama with SiT's defaults). Each sample set is judged by FD-digits and the
class accuracy of the digit classifier (experiments/scaling.py's judge). Every result is stored as
it is made, so a rerun does only what is missing; writes sit_vs_dit.json, .md and a figure.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ditlib.errors import one_line_errors
from ditlib.files import atomic_write_text
from ditlib.samplers import FlowSampler, Sampler
from ditlib.weights import ModelSource, load_model_for_sampling
from experiments.digits import ROOT, Recipe, draw, final_checkpoint, load_mnist, train, write_image_folder
from experiments.scaling import Judge

EVALUATIONS = (20, 50, 250)
SAMPLERS = {"DiT": ("ddpm", "dpm++"), "SiT": ("ode-heun", "sde-euler")}


def sampler_at(name: str, evaluations: int, transport):
    """A sampler spending `evaluations` network evaluations per sample."""
    if name in ("ddpm", "dpm++"):
        return Sampler(name, evaluations)
    if name == "ode-heun":  # torchdiffeq's heun2: two evaluations per step, steps + 1 grid points
        return FlowSampler(transport, "ode", evaluations // 2 + 1, method="heun2")
    return FlowSampler(transport, "sde", evaluations)  # steps - 1 Euler steps and the last step


def evaluate_run(checkpoint: Path, objective: str, judge: Judge, samples: int) -> dict:
    model, _, config = load_model_for_sampling(ModelSource(ckpt=str(checkpoint)), torch.device("cpu"),
                                               default_vae="none")
    labels = torch.arange(samples) % 10
    results = {}
    for name in SAMPLERS[objective]:
        for evaluations in EVALUATIONS:
            images, seconds = draw(model, sampler_at(name, evaluations, config.transport), evaluations, None, 1.0,
                                   labels, batch_size=500, seed=0)
            results[f"{name}@{evaluations}"] = {**judge.digits(images, labels), "seconds": seconds}
            print(f"[sit-vs-dit] {checkpoint.parent.parent.name} {name}@{evaluations}: "
                  f"{results[f'{name}@{evaluations}']}", flush=True)
    return results


def summary(runs: dict, seeds: list) -> list:
    """One row per objective, sampler and evaluation count: FD-digits and accuracy, mean and spread
    over the seeds."""
    rows = []
    for objective, names in SAMPLERS.items():
        for name in names:
            for evaluations in EVALUATIONS:
                key = f"{name}@{evaluations}"
                values = [runs[f"{objective}-seed{seed}"]["samples"][key] for seed in seeds]
                fd = [v["fd_digits"] for v in values]
                acc = [v["accuracy"] for v in values]
                rows.append({"objective": objective, "sampler": name, "evaluations": evaluations,
                             "fd_digits": float(np.mean(fd)), "fd_digits_std": float(np.std(fd)),
                             "accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc))})
    return rows


def markdown(rows: list, runs: dict, seeds: list) -> str:
    lines = ["| objective | sampler | network evaluations | FD-digits (mean ± sd) | class accuracy (mean ± sd) |",
             "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['objective']} | {row['sampler']} | {row['evaluations']} | "
                     f"{row['fd_digits']:.1f} ± {row['fd_digits_std']:.1f} | "
                     f"{row['accuracy']:.3f} ± {row['accuracy_std']:.3f} |")
    losses = {objective: [runs[f"{objective}-seed{seed}"]["final_loss"] for seed in seeds] for objective in SAMPLERS}
    lines += ["", "Final training loss (the objectives' own scales, not comparable): " +
              "; ".join(f"{o} {np.mean(v):.4f}" for o, v in losses.items())]
    return "\n".join(lines) + "\n"


def plot(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for objective, names in SAMPLERS.items():
        for name in names:
            chosen = [r for r in rows if r["objective"] == objective and r["sampler"] == name]
            x = [r["evaluations"] for r in chosen]
            style = "-" if objective == "SiT" else "--"
            axes[0].errorbar(x, [r["fd_digits"] for r in chosen], [r["fd_digits_std"] for r in chosen],
                             fmt=style + "o", label=f"{objective} {name}", capsize=3)
            axes[1].errorbar(x, [r["accuracy"] for r in chosen], [r["accuracy_std"] for r in chosen],
                             fmt=style + "o", label=f"{objective} {name}", capsize=3)
    for axis, label in zip(axes, ("FD-digits (lower is better)", "class accuracy, unguided")):
        axis.set_xscale("log")
        axis.set_xlabel("network evaluations per sample")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sit-vs-dit")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=1000, help="unguided samples per sampler setting")
    parser.add_argument("--digits", type=int, default=None, help="train on this many digits (smoke tests)")
    parser.add_argument("--nproc", type=int, default=2, help="train.py processes (torchrun, one thread each)")
    args = parser.parse_args(argv)
    digits, labels = load_mnist()
    if args.digits is not None:
        keep = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[: args.digits].numpy()
        digits, labels = digits[keep], labels[keep]
    data = write_image_folder(digits, labels, args.out / "mnist")
    judge = Judge(16, 1000, args.out)
    store = args.out / "runs.json"
    runs = json.loads(store.read_text()) if store.is_file() else {}
    for seed in args.seeds:
        for objective in SAMPLERS:
            key = f"{objective}-seed{seed}"
            done = runs.get(key, {})
            if (done.get("steps"), done.get("samples_per_set")) == (args.steps, args.samples):
                continue
            recipe = Recipe(model=f"{objective}-Nano/4", max_steps=args.steps, nproc=args.nproc)
            experiment = train(recipe, data, args.out / "runs" / key, "--global-seed", str(seed),
                               "--log-every", str(min(100, args.steps)))  # a loss record at the end
            records = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]
            runs[key] = {"steps": args.steps, "samples_per_set": args.samples,
                         "final_loss": [r["loss"] for r in records if "loss" in r][-1],
                         "samples": evaluate_run(final_checkpoint(experiment), objective, judge, args.samples)}
            atomic_write_text(store, json.dumps(runs, indent=1))
    rows = summary(runs, args.seeds)
    floor = judge.digit_floor(args.samples)
    text = markdown(rows, runs, args.seeds) + f"\nHeld-out real digits (the floor): FD-digits {floor:.1f}.\n"
    atomic_write_text(args.out / "sit_vs_dit.md", text)
    atomic_write_text(args.out / "sit_vs_dit.json", json.dumps({"rows": rows, "floor": floor}, indent=1))
    plot(rows, args.out / "sit_vs_dit.png")
    print(text)
    return {"rows": rows, "floor": floor}


if __name__ == "__main__":
    with one_line_errors():
        main()
