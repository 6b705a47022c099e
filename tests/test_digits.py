"""experiments/digits.py: the digit-feature distance (FD-digits) that issue 23's scaling grid is judged by."""
import numpy as np
import pytest
import torch
from helpers import make_image_folder

from experiments.digits import as_model_input, digit_distance, main, real_digits, train_classifier


@pytest.mark.slow  # the judge is trained three times: about 40 s on 2 cores
def test_fd_digits_sits_at_its_floor_for_real_digits_and_far_for_noise_and_one_class(tmp_path):
    real, targets, train_part, held_out = real_digits(16)
    judge = train_classifier(as_model_input(real[train_part]), targets[train_part])
    reference = as_model_input(real[train_part[:1000]])
    floor = digit_distance(judge, as_model_input(real[held_out[:500]]), reference)
    again = digit_distance(judge, as_model_input(real[held_out[500:]]), reference)
    noise = digit_distance(judge, torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                           reference)
    zeros = digit_distance(judge, as_model_input(real[train_part[1000:]][targets[train_part[1000:]] == 0][:300]),
                           reference)
    assert again < 1.5 * floor and noise > 20 * floor and zeros > 5 * floor, (floor, again, noise, zeros)
    # The command on a sample_ddp.py-style .npz: RGB images in arr_0, their labels in arr_1.
    digits, labels = real[held_out[:300]], targets[held_out[:300]].numpy()
    np.savez(tmp_path / "real.npz", arr_0=np.repeat(digits[..., None], 3, -1), arr_1=labels)
    report = main([str(tmp_path / "real.npz")])
    assert report["class_accuracy"] > 0.9 and report["fd_digits"] < 1.5 * report["fd_digits_floor"]
    np.savez(tmp_path / "shuffled.npz", arr_0=np.repeat(digits[..., None], 3, -1),
             arr_1=np.random.default_rng(0).permutation(labels))
    assert main([str(tmp_path / "shuffled.npz")])["class_accuracy"] < 0.3


def test_a_failing_training_run_is_one_line_naming_its_command(tmp_path):
    """Issue 34: a train.py that refuses its flags ended the experiments in a CalledProcessError
    traceback; now its own error line, the exit status and the command."""
    from experiments.digits import Recipe, train

    data = make_image_folder(tmp_path / "images")
    with pytest.raises(ChildProcessError) as error:
        train(Recipe(lr=float("nan"), max_steps=1, nproc=1), data, tmp_path / "runs")
    message = str(error.value)
    assert message.startswith("train.py exited with status 1: train.py: error: --lr must lie in [0, ")
    assert "(command: " in message and "--lr nan" in message and "\n" not in message
