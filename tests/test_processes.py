"""ditlib/processes.py: devices."""
import pytest
import torch


def test_cuda_without_a_gpu_is_an_error_not_a_fallback():
    from ditlib.errors import SettingError
    from ditlib.processes import resolve_device
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(SettingError, match="device cuda was asked for") as error:
            resolve_device("cuda")
        assert error.value.setting == "device"
    with pytest.raises(SettingError, match="device must be auto, cuda or cpu, got 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("cpu").type == "cpu"
