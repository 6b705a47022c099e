"""ditlib/processes.py: devices."""
import os

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


def test_a_failing_child_is_one_line_with_its_last_error_and_command(tmp_path, capfd):
    import sys

    from ditlib.processes import run_child
    script = tmp_path / "child.py"
    script.write_text("import sys\nprint('working', flush=True)\n"
                      "sys.stderr.write('progress\\rchild.py: error: bad\\n')\nsys.exit(3)\n")
    with pytest.raises(ChildProcessError) as error:
        run_child([sys.executable, script, "--flag"])
    assert str(error.value) == f"child.py exited with status 3: child.py: error: bad (command: {sys.executable} " \
                               f"{script} --flag)"
    output = capfd.readouterr()
    assert "working" in output.out and "child.py: error: bad" in output.err  # shown as it came
    run_child([sys.executable, "-c", "pass"])  # a success says nothing


def test_a_child_under_torchrun_is_named_by_its_own_error_not_torchruns_report(tmp_path):
    """Issue 34, second pass: torchrun ends a failed run with a report of its own, so the last line
    was "=====..." and the demo's and the experiments' errors (two ranks by default) said nothing."""
    import sys

    from ditlib.processes import run_child
    script = tmp_path / "child.py"
    script.write_text("import sys\nsys.exit('child.py: error: --lr must be positive')\n")
    with pytest.raises(ChildProcessError, match=r"^child.py exited with status 1: child.py: error: --lr must be "
                                                r"positive \(command: "):
        run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script],
                  env={**os.environ, "OMP_NUM_THREADS": "1"})
