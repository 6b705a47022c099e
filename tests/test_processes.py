"""processes.py: devices and one-line errors."""
import pytest
import torch


def test_cuda_without_a_gpu_is_an_error_not_a_fallback():
    from processes import resolve_device
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="--device cuda was asked for"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
