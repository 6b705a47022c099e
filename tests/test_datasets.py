"""ditlib/datasets.py: what train.py trains on, checked before the first step."""
import re

import pytest
from helpers import PIXEL, make_image_folder, run_main

from ditlib.datasets import DataSource, load_data
from ditlib.errors import SettingError
from ditlib.processes import distributed


def test_unreadable_images_are_all_named_before_training(tmp_path, image_folder_path, capsys):
    args = ["--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size", "16",
            "--max-steps", "1", *PIXEL]
    run_main("train.py", *args, "--check-data")
    assert "--check-data: all 16 images under" in capsys.readouterr().out
    garbage, truncated = image_folder_path / "class_1" / "005.png", image_folder_path / "class_0" / "002.png"
    garbage.write_bytes(b"not a png")
    truncated.write_bytes(truncated.read_bytes()[:200])  # a valid header: only decoding finds it
    with pytest.raises(ValueError, match=re.escape(f"1 of the 16 images under --data-path cannot be read: {garbage} "
                                                   f"(cannot identify image file)")):
        run_main("train.py", *args)
    with pytest.raises(ValueError,
                       match=re.escape(f"2 of the 16 images under --data-path cannot be read: {truncated} (")):
        run_main("train.py", *args, "--check-data")
    assert not (tmp_path / "r").exists()  # nothing was created for a run that never started


def test_data_is_checked_against_the_classes_and_the_batch(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=3, per_class=2, size=16)
    with distributed("cpu") as (rank, world_size, device):
        data = load_data(DataSource(str(images), image_size=16, num_classes=3, vae="none", global_batch_size=6),
                         False, rank, world_size, device)
        assert (data.channels, data.latent_size, data.scale, data.vae_name) == (3, 16, 1.0, "none")
        assert not data.stored_latents and len(data.dataset) == 6
        with pytest.raises(SettingError, match="has 3 class folders but --num-classes is 2") as error:
            load_data(DataSource(str(images), image_size=16, num_classes=2, vae="none", global_batch_size=6),
                      False, rank, world_size, device)
        assert error.value.setting == "data_path"
        with pytest.raises(ValueError, match="the dataset has 6 images, fewer than one global batch of 8"):
            load_data(DataSource(str(images), image_size=16, num_classes=3, vae="none", global_batch_size=8),
                      False, rank, world_size, device)
    image, label = data.dataset[0]
    assert image.shape == (3, 16, 16) and -1 <= image.min() and image.max() <= 1 and label == 0
