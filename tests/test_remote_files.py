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
