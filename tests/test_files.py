"""ditlib/files.py: atomic writes that never leave half a file."""
import pytest
import torch

from ditlib.files import atomic_torch_save


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "0000100.pt"
    atomic_torch_save({"step": 100}, path)

    class Explodes:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"step": 200, "payload": Explodes()}, path)
    assert torch.load(path, weights_only=True) == {"step": 100}
    assert [p.name for p in tmp_path.iterdir()] == ["0000100.pt"]
