"""Fine-tuning with train.py --init-from, measured: a model trained on digits 0-4 only, fine-tuned on
all ten digits, against the same number of steps from scratch.

    python experiments/fine_tune.py [--out results/fine-tune] [--pretrain-steps 5000] [--steps 1000]

1. Pretrains the demo's model (its recipe) on the real MNIST digits 0-4, with 5 classes.
2. From those weights (--init-from; the label table is re-initialised for 10 classes), and from
   scratch, trains --steps steps on all ten digits with the same recipe and seed.
3. Draws 100 digits per class from each EMA (DPM-Solver++, 20 steps, guidance --cfg-scale) and
   reports class accuracy (all, 0-4, 5-9; the demo's CNN) and FID against 1,000 real digits.
Each training run continues if interrupted; writes fine_tune.json and fine_tune.md.
"""
import argparse
import json
from dataclasses import replace
from pathlib import Path

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


def judge(checkpoint: Path, classifier, network, reference: dict, per_class: int, cfg_scale: float) -> dict:
    labels = torch.arange(10).repeat_interleave(per_class)
    samples, _ = draw(load_digit_model(checkpoint), "dpm++", 20, None, cfg_scale, labels, batch_size=500, seed=0)
    grey = samples.mean(1, keepdim=True)
    low = labels < 5
    return {"accuracy": accuracy(classifier, grey, labels),
            "accuracy_0_4": accuracy(classifier, grey[low], labels[low]),
            "accuracy_5_9": accuracy(classifier, grey[~low], labels[~low]),
            "fid": evaluate(image_features(network, to_uint8_images(samples)), reference)["fid"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fine-tune")
    add_recipe_flags(parser)
    parser.add_argument("--pretrain-steps", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning (and from-scratch) steps")
    parser.add_argument("--per-class-eval", type=int, default=100)
    parser.add_argument("--reference", type=int, default=1000)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    args = parser.parse_args(argv)
    check_recipe_flags(args)

    digits, labels = load_mnist()
    low = labels < 5
    first_half = write_image_folder(digits[low], labels[low], args.out / "mnist-0-4")
    everything = write_image_folder(digits, labels, args.out / "mnist")

    recipe = settings_from(Recipe, vars(args))
    pretrained = final_checkpoint(train(replace(recipe, max_steps=args.pretrain_steps), first_half,
                                        args.out / "pretrain", "--num-classes", "5"))
    recipe = replace(recipe, max_steps=args.steps)
    runs = {"fine-tuned from 0-4": final_checkpoint(train(recipe, everything, args.out / "fine-tune",
                                                          "--init-from", str(pretrained))),
            "from scratch": final_checkpoint(train(recipe, everything, args.out / "scratch"))}

    real, targets, train_part, _ = real_digits(args.image_size)
    classifier = train_classifier(as_model_input(real[train_part]), targets[train_part])
    network = fid_network()
    reference = fid_reference(network, real, train_part[: args.reference], args.out)
    rows = {name: judge(path, classifier, network, reference, args.per_class_eval, args.cfg_scale)
            for name, path in runs.items()}
    table = ["| run | steps on all digits | class accuracy | on 0-4 | on 5-9 | FID |", "|---|---|---|---|---|---|"]
    table += [f"| {name} | {args.steps} | {r['accuracy']:.3f} | {r['accuracy_0_4']:.3f} | {r['accuracy_5_9']:.3f} | "
              f"{r['fid']:.2f} |" for name, r in rows.items()]
    atomic_write_text(args.out / "fine_tune.json", json.dumps({"rows": rows, "args": {
        k: str(v) for k, v in vars(args).items()}}, indent=1))
    atomic_write_text(args.out / "fine_tune.md", "\n".join(table) + "\n")
    print("\n".join(table))
    return rows


if __name__ == "__main__":
    with one_line_errors():
        main()
