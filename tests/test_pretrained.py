"""ditlib/pretrained.py: official names downloaded once (loopback server), cut downloads resumed, bad ones
deleted; find_model reads every kind of checkpoint file."""
import pytest
import torch
from helpers import LoopbackServer

from ditlib import checkpoints, pretrained
from models import DiT_models


@pytest.fixture
def server(monkeypatch):
    srv = LoopbackServer()
    monkeypatch.setenv("DIT_MODELS_URL", srv.url)
    yield srv
    srv.close()


def checkpoint_bytes(tmp_path) -> bytes:
    model = DiT_models["DiT-Nano/4"](input_size=8, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    return (tmp_path / "ok.pt").read_bytes()


NAME = "DiT-XL-2-256x256.pt"


def test_download_success_then_cached(tmp_path, server):
    body = checkpoint_bytes(tmp_path)
    server.routes[f"/models/{NAME}"] = (200, body, None)
    target = pretrained.download_model(NAME, tmp_path / "pretrained")
    assert target.read_bytes() == body
    server.routes.clear()  # a second call must not touch the network
    assert pretrained.download_model(NAME, tmp_path / "pretrained") == target
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == [NAME]


@pytest.mark.parametrize("case,message", [
    ("corrupt", "is not a readable PyTorch checkpoint"),
    ("not-dit", "is not a DiT checkpoint"),
    ("missing", "HTTP Error 404"),
])
def test_download_failures_leave_nothing(tmp_path, server, case, message):
    body = checkpoint_bytes(tmp_path)
    route = f"/models/{NAME}"
    if case == "corrupt":
        server.routes[route] = (200, body[: len(body) // 2], None)
    elif case == "not-dit":
        torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
        server.routes[route] = (200, (tmp_path / "other.pt").read_bytes(), None)
    with pytest.raises(pretrained.DownloadError) as error:
        pretrained.download_model(NAME, tmp_path / "pretrained")
    text = str(error.value)
    assert message in text
    assert f"{server.url}/{NAME}" in text and str((tmp_path / "pretrained" / NAME).resolve()) in text
    assert not (tmp_path / "pretrained").exists()  # the folder it made for the file is gone too


def test_a_cut_download_continues_on_the_next_call(tmp_path, server):
    body = checkpoint_bytes(tmp_path)
    route = f"/models/{NAME}"
    server.routes[route] = (200, body[: len(body) // 2], len(body))  # the connection drops halfway
    with pytest.raises(pretrained.DownloadError, match="connection ended after") as error:
        pretrained.download_model(NAME, tmp_path / "pretrained")
    assert str((tmp_path / "pretrained" / NAME).resolve()) in str(error.value) and "DIT_MODELS_URL" in str(error.value)
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == [f".{NAME}.part"]  # nothing under its name
    server.routes[route] = (200, body, None)
    target = pretrained.download_model(NAME, tmp_path / "pretrained")
    assert server.ranges[-1] == f"bytes={len(body) // 2}-"  # the second call asked for the rest only
    assert target.read_bytes() == body and [p.name for p in target.parent.iterdir()] == [NAME]


def test_find_model_local_files(tmp_path):
    model = DiT_models["DiT-Nano/4"](input_size=8, num_classes=3)
    state = model.state_dict()
    torch.save({"model": state, "ema": {k: v + 1 for k, v in state.items()}, "args": {}}, tmp_path / "train.pt")
    import argparse
    torch.save({"model": state, "ema": {k: v + 2 for k, v in state.items()}, "opt": {},
                "args": argparse.Namespace(model="DiT-Nano/4")}, tmp_path / "official.pt")
    torch.save(state, tmp_path / "bare.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    assert torch.equal(pretrained.find_model(tmp_path / "train.pt")["pos_embed"], state["pos_embed"] + 1)
    assert torch.equal(checkpoints.load_state_dict(tmp_path / "train.pt", "model")["pos_embed"], state["pos_embed"])
    assert torch.equal(pretrained.find_model(tmp_path / "official.pt")["pos_embed"], state["pos_embed"] + 2)
    assert torch.equal(checkpoints.load_state_dict(tmp_path / "official.pt", "model")["pos_embed"], state["pos_embed"])
    assert checkpoints.checkpoint_args(checkpoints.read_checkpoint(tmp_path / "official.pt")) == {"model": "DiT-Nano/4"}
    assert torch.equal(pretrained.find_model(tmp_path / "bare.pt")["pos_embed"], state["pos_embed"])
    assert torch.equal(pretrained.find_model(tmp_path / "w.safetensors")["pos_embed"], state["pos_embed"])
    with pytest.raises(FileNotFoundError, match="not one of the official names"):
        pretrained.find_model(tmp_path / "nope.pt")


def test_sits_released_weights_come_from_sits_address_or_a_mirror(tmp_path, monkeypatch):
    monkeypatch.delenv("SIT_MODELS_URL", raising=False)
    assert pretrained.model_url("SiT-XL-2-256x256.pt") == pretrained.SIT_XL_URL  # where SiT's download.py looks
    assert pretrained.model_url(NAME).endswith(f"/{NAME}")
    srv = LoopbackServer()
    try:
        monkeypatch.setenv("SIT_MODELS_URL", srv.url)
        srv.routes["/models/SiT-XL-2-256x256.pt"] = (200, checkpoint_bytes(tmp_path), None)
        target = pretrained.download_model("SiT-XL-2-256x256.pt", tmp_path / "pretrained")
    finally:
        srv.close()
    assert target.name == "SiT-XL-2-256x256.pt" and "pos_embed" in pretrained.find_model(target)
