"""reproduce.py: the published rows, and the whole chain offline at tiny scale (a loopback server for
the reference batch, a tiny checkpoint, a reference made by evaluate.py --save-stats)."""
import json

import numpy as np
import pytest
from helpers import LoopbackServer, fid_network_path, refuse_writes_in, run_main


def test_list_shows_every_row_with_its_settings_and_published_values(capsys):
    run_main("reproduce.py", "--list")
    table = capsys.readouterr().out
    assert "| XL/2-256-cfg1.5 | DiT-XL/2 | 256 | 250 DDPM | 1.5 | mse | 2.27 | 4.6 | 278.24 | 0.83 | 0.57 |" in table
    assert "official README: FID 2.21 for the PyTorch weights at fp32" in table
    assert "| XL/2-256 | DiT-XL/2 | 256 | 250 DDPM | 1.0 | mse | 9.62 |" in table
    assert "| XL/2-512-cfg1.5 | DiT-XL/2 | 512 | 250 DDPM | 1.5 | mse | 3.04 | 5.02 | 240.82 |" in table
    assert "| SiT-XL/2-256-cfg1.5 | SiT-XL/2 | 256 | 250 SDE | 1.5 | ema | 2.06 | - | 270.27 | - | - |" in table
    # Issue 34: two rows (or a row and its --fast run) in one --work-dir keep their own reports.
    from reproduce import report_stem
    stems = {report_stem(row, fast) for row in ("XL/2-256-cfg1.5", "XL/2-256", "SiT-XL/2-256-cfg1.5")
             for fast in (False, True)}
    assert len(stems) == 6 and "report-XL-2-256-cfg1.5-fast" in stems
    with pytest.raises(ValueError, match="--row 'XL/2-1024' is not a published row"):
        run_main("reproduce.py", "--row", "XL/2-1024")


def test_a_missing_checkpoint_is_named_before_any_download(tmp_path):
    with pytest.raises(ValueError, match=f"--ckpt {tmp_path / 'nope.pt'}: no such file"):  # issue 34
        run_main("reproduce.py", "--row", "XL/2-256", "--ckpt", tmp_path / "nope.pt", "--work-dir", tmp_path / "w",
                 "--ref-batch", "http://127.0.0.1:9/unreachable.npz")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_work_dir_that_cannot_be_written_is_named_before_any_child_runs(tmp_path, monkeypatch):
    """Issue 34 case 12: a read-only --work-dir ended in sample_ddp.py's CalledProcessError."""
    import reproduce
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "ref.npz").write_bytes(b"")
    (tmp_path / "w").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "w", 30)  # EROFS: a read-only mount
    monkeypatch.setattr(reproduce, "launch", lambda *args: pytest.fail(f"launched {args}"))
    with pytest.raises(OSError, match=f"cannot write in {tmp_path / 'w'} \\(--work-dir\\): Read-only file system; "
                                      f"checked before any work"):
        run_main("reproduce.py", "--row", "XL/2-256", "--ckpt", tmp_path / "model.pt", "--ref-batch",
                 tmp_path / "ref.npz", "--work-dir", tmp_path / "w")


def test_a_file_named_as_the_work_dir_is_one_line(tmp_path):
    """Issue 34, second pass: it was "[Errno 17] File exists", naming no flag."""
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "w").write_text("notes")
    with pytest.raises(ValueError, match=f"^--work-dir: {tmp_path / 'w'} is a file, not a folder$"):
        run_main("reproduce.py", "--row", "XL/2-256", "--ckpt", tmp_path / "model.pt", "--work-dir", tmp_path / "w")


@pytest.mark.slow  # sample_ddp.py, evaluate.py and a download, each a process: about 40 s on 2 cores
def test_the_chain_runs_offline_and_reports_measured_against_published(tmp_path, trained_checkpoint, tiny_vae_path):
    real = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", arr_0=real)
    run_main("evaluate.py", tmp_path / "real.npz", "--save-stats", tmp_path / "ref.npz", "--inception",
             fid_network_path())
    server = LoopbackServer()
    try:
        server.routes["/models/VIRTUAL_tiny.npz"] = (200, (tmp_path / "ref.npz").read_bytes(), None)
        report = run_main("reproduce.py", "--row", "XL/2-256-cfg1.5", "--ckpt", trained_checkpoint, "--vae",
                          tiny_vae_path, "--ref-batch", f"{server.url}/VIRTUAL_tiny.npz", "--inception",
                          fid_network_path(), "--num-fid-samples", "6", "--per-proc-batch-size", "3",
                          "--work-dir", tmp_path / "work", "--device", "cpu")
    finally:
        server.close()
    work = tmp_path / "work"
    assert (work / "VIRTUAL_tiny.npz").read_bytes() == (tmp_path / "ref.npz").read_bytes()
    rows = {line["metric"]: line for line in report["comparison"]}
    assert set(rows) == {"fid", "sfid", "inception_score", "precision", "recall"}
    measured = json.loads(next(work.glob("*-metrics.json")).read_text())
    assert rows["fid"]["measured"] == round(measured["fid"], 4) and rows["fid"]["published"] == 2.27
    assert rows["fid"]["within"] is False  # a 3-step toy model is not DiT-XL/2
    assert rows["inception_score"]["measured"] is None  # the TorchScript FID network has no logits
    assert report["settings"]["samples"] == 6 and "--cfg-scale" in report["settings"]["sample_flags"]
    assert "| fid |" in (work / "report-XL-2-256-cfg1.5.md").read_text()
    assert json.loads((work / "report-XL-2-256-cfg1.5.json").read_text())["settings"]["reference_sha256"] == \
        __import__("hashlib").sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()


