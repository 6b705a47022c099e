"""ditlib/errors.py: a wrong setting is named by its flag in the one line a command prints."""
import pickle
import subprocess
import sys

import pytest
from helpers import ROOT

from ditlib.errors import SettingError, first_line, flag_names, require_non_negative, require_positive


def test_a_setting_error_names_the_setting_and_becomes_its_flag():
    error = SettingError("num_sampling_steps", "must be at least 2, got 1")
    assert isinstance(error, ValueError) and str(error) == "num_sampling_steps must be at least 2, got 1"
    assert str(error.as_flag()) == "--num-sampling-steps must be at least 2, got 1"
    assert str(error.as_flag("--sample-steps")) == "--sample-steps must be at least 2, got 1"
    copy = pickle.loads(pickle.dumps(error))  # as rank_zero_decides sends it to the other ranks
    assert (copy.setting, copy.problem) == (error.setting, error.problem)
    assert str(SettingError("resume", ": x is in use").as_flag()) == "--resume: x is in use"


def test_flag_names_renames_only_the_settings_it_is_given():
    with pytest.raises(ValueError, match="^--fid-steps must be at least 2") as renamed:
        with flag_names(num_sampling_steps="--fid-steps"):
            raise SettingError("num_sampling_steps", "must be at least 2, got 1")
    assert not isinstance(renamed.value, SettingError)
    with pytest.raises(SettingError, match="^eta must be >= 0"):  # another setting passes through unchanged
        with flag_names(num_sampling_steps="--fid-steps"):
            raise SettingError("eta", "must be >= 0")


def test_require_positive_names_the_first_bad_setting():
    require_positive(batch_size=1, chunk_images=None)  # None: not set
    with pytest.raises(SettingError, match="^chunk_images must be at least 1, got 0"):
        require_positive(batch_size=4, chunk_images=0)


def test_require_non_negative_lets_zero_through():
    require_non_negative(num_workers=0)
    with pytest.raises(SettingError, match="^num_workers must be 0 or more, got -1"):
        require_non_negative(num_workers=-1)


def test_first_line_of_an_error():
    assert first_line(ValueError("\n  one\ntwo")) == "one" and first_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("error, line", [
    ('SettingError("per_proc_batch_size", "must be at least 1, got 0")',
     "prog.py: error: --per-proc-batch-size must be at least 1, got 0"),
    ('OSError(28, "No space left on device")', "prog.py: error: [Errno 28] No space left on device"),
])
def test_a_command_ends_in_one_line(tmp_path, error, line):
    (tmp_path / "prog.py").write_text("from ditlib.errors import SettingError, one_line_errors\n"
                                      f"with one_line_errors():\n    raise {error}\n")
    result = subprocess.run([sys.executable, str(tmp_path / "prog.py")], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == line
