"""ditlib/files.py: atomic writes that never leave half a file."""
import errno
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, refuse_writes_in

from ditlib.files import (
    atomic_folder,
    atomic_torch_save,
    check_output_file,
    check_output_folder,
    require_writable,
)


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


def test_a_file_size_limit_is_named_and_the_previous_checkpoint_stays(tmp_path):
    """Issue 34: under a file-size limit (errno 27, EFBIG) torch.save ended in 'RuntimeError ...
    unexpected pos'; it is now one line, as a full disk is, and the last checkpoint is untouched."""
    script = ("import resource, sys, torch\n"
              "from ditlib.errors import one_line_errors\n"
              "from ditlib.files import atomic_torch_save\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))\n"
              "with one_line_errors():\n"
              "    atomic_torch_save({'weights': torch.zeros(1_000_000)}, sys.argv[1])\n")
    atomic_torch_save({"step": 100}, tmp_path / "last.pt")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "last.pt")], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"-c: error: [Errno 27] cannot write {tmp_path / 'last.pt'}: File too large "
                                    f"(4.0 MB needed; the process's file-size limit"), result.stderr
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"step": 100}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_require_writable_probes_and_leaves_nothing(tmp_path, monkeypatch):
    require_writable(tmp_path, "where the checkpoints go")
    assert list(tmp_path.iterdir()) == []
    for code in (errno.EACCES, errno.EROFS, errno.EDQUOT):
        refuse_writes_in(monkeypatch, tmp_path, code)
        with pytest.raises(OSError, match=f"cannot write in {tmp_path} \\(where the checkpoints go\\): "
                                          f"{os.strerror(code)}; checked before any work") as raised:
            require_writable(tmp_path, "where the checkpoints go")
        assert raised.value.errno == code and list(tmp_path.iterdir()) == []


def test_a_file_where_an_output_folder_goes_is_named_by_its_flag(tmp_path, monkeypatch):
    """Issue 34, second pass: a file in the way of --results-dir, --sample-dir, --features-path,
    --cache-dir or --work-dir ended in "[Errno 17] File exists: 'x'", some after minutes of work."""
    check_output_folder(tmp_path / "new" / "deeper", "--cache-dir")
    assert list(tmp_path.iterdir()) == []  # probed where it will be made; nothing created
    refuse_writes_in(monkeypatch, tmp_path, errno.EROFS)
    with pytest.raises(OSError, match=f"cannot write in {tmp_path} \\(--cache-dir\\): Read-only file system"):
        check_output_folder(tmp_path / "new" / "deeper", "--cache-dir")
    monkeypatch.undo()
    (tmp_path / "text.pt").write_text("a file")
    with pytest.raises(ValueError, match=f"^--cache-dir: {tmp_path / 'text.pt'} is a file, not a folder$"):
        check_output_folder(tmp_path / "text.pt", "--cache-dir")
    with pytest.raises(ValueError, match=f"^--work-dir: {tmp_path / 'text.pt' / 'w' / 'x'} cannot be created, as "
                                         f"{tmp_path / 'text.pt'} is a file$"):
        check_output_folder(tmp_path / "text.pt" / "w" / "x", "--work-dir")
    with pytest.raises(ValueError, match=f"^the folder of --output x.png: {tmp_path / 'text.pt'} is a file"):
        check_output_file(tmp_path / "text.pt" / "x.png", "--output")
    assert (tmp_path / "text.pt").read_text() == "a file"


def test_an_atomic_folder_replaces_the_earlier_one_whole_or_not_at_all(tmp_path):
    with atomic_folder(tmp_path / "out") as staging:
        (staging / "a").write_text("first")
        (staging / "sub").mkdir()
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_folder(tmp_path / "out") as staging:
            (staging / "b").write_text("second")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "sub"]
    with atomic_folder(tmp_path / "out") as staging:
        (staging / "b").write_text("second")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in (tmp_path / "out").iterdir()] == ["b"]
