"""ditlib/remote_files.py: large downloads resume where they stopped and are checked before they are
installed under their name (a loopback server)."""
import hashlib

import numpy as np
import pytest
from helpers import LoopbackServer

from ditlib import remote_files


def test_a_cut_reference_download_resumes_and_is_checked(tmp_path):
    body = np.random.default_rng(1).bytes(3_000_000)
    server = LoopbackServer()
    try:
        server.routes["/models/ref.npz"] = (200, body[:1_000_000], len(body))  # the connection drops
        with pytest.raises(remote_files.DownloadError, match="ended after 1000000 of 3000000 bytes"):
            remote_files.download_file(f"{server.url}/ref.npz", tmp_path / "ref.npz")
        assert not (tmp_path / "ref.npz").exists() and (tmp_path / ".ref.npz.part").stat().st_size == 1_000_000
        server.routes["/models/ref.npz"] = (200, body, None)
        path = remote_files.download_file(f"{server.url}/ref.npz", tmp_path / "ref.npz",
                                          sha256=hashlib.sha256(body).hexdigest())
        assert server.ranges == [None, "bytes=1000000-"]  # the rerun asked for the rest only
        with pytest.raises(remote_files.DownloadError, match="does not have the expected SHA-256"):
            remote_files.download_file(f"{server.url}/ref.npz", tmp_path / "other.npz", sha256="0" * 64)
        assert not list(tmp_path.glob("*other*")) and not list(tmp_path.glob(".other*"))
    finally:
        server.close()
    assert path.read_bytes() == body


def test_a_resumed_download_is_spliced_only_where_the_server_says_it_resumes(tmp_path):
    """Issue 34: a server that answers a range request with 206 but sends the file from byte 0 again
    made a file of 2.46 MB from one of 1.41 MB; one that gives no Content-Range cannot be trusted."""
    body = np.random.default_rng(2).bytes(300_000)
    server = LoopbackServer()
    try:
        for misbehave, outcome in (("restart", "whole"), ("wrong-range", "refused")):
            target = tmp_path / misbehave / "ref.npz"
            target.parent.mkdir()
            (target.parent / ".ref.npz.part").write_bytes(body[:100_000])  # a cut earlier download
            server.routes["/models/ref.npz"] = (200, body, None)
            server.misbehave = misbehave
            if outcome == "whole":  # the whole file again: written from the start, not appended
                assert remote_files.download_file(f"{server.url}/ref.npz", target).read_bytes() == body
            else:
                with pytest.raises(remote_files.DownloadError, match="answered a request for bytes 100000- with "
                                                                     "Content-Range 'none'"):
                    remote_files.download_file(f"{server.url}/ref.npz", target)
                assert not target.exists()
    finally:
        server.close()


def test_a_body_cut_without_content_length_fails_the_files_own_check(tmp_path):
    """Issue 34: with no Content-Length a cut body looks complete; the reference batch's check (an
    .npz whose arr_0 holds images) finds it before the file gets its name."""
    from ditlib.metrics import check_reference_batch

    np.savez(tmp_path / "good.npz", arr_0=np.zeros((6, 8, 8, 3), np.uint8))
    whole = (tmp_path / "good.npz").read_bytes()
    server = LoopbackServer()
    try:
        server.routes["/models/ref.npz"] = (200, whole[: len(whole) // 2], -1)
        with pytest.raises(remote_files.DownloadError, match="was downloaded but .*the download was deleted"):
            remote_files.download_file(f"{server.url}/ref.npz", tmp_path / "ref.npz", check=check_reference_batch)
        assert not (tmp_path / "ref.npz").exists() and not (tmp_path / ".ref.npz.part").exists()
        server.routes["/models/other.npz"] = (200, b"<html>not a batch</html>", -1)  # wrong content
        with pytest.raises(remote_files.DownloadError, match="was downloaded but"):
            remote_files.download_file(f"{server.url}/other.npz", tmp_path / "other.npz", check=check_reference_batch)
        server.routes["/models/good.npz"] = (200, whole, -1)
        assert remote_files.download_file(f"{server.url}/good.npz", tmp_path / "good2.npz",
                                          check=check_reference_batch).read_bytes() == whole
    finally:
        server.close()
