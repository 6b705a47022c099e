"""transport/: SiT's objective and samplers against an independent transcription of SiT's published
algorithm (tests/sit_reference.py), bit for bit, on a tiny SiT with non-trivial weights."""
import itertools

import pytest
import sit_reference as ref
import torch

from models import SiT_models
from transport import create_transport, sample_ode, sample_sde
from transport.path import PATHS

COMBINATIONS = [("Linear", "velocity", None), ("GVP", "velocity", None), ("VP", "velocity", None),
                ("Linear", "noise", None), ("GVP", "score", "velocity"), ("VP", "noise", "likelihood"),
                ("Linear", "score", "likelihood")]


def tiny_sit(seed: int = 0):
    """SiT-Pico/4 on 3x8x8 inputs, every weight random (a fresh SiT outputs zeros)."""
    torch.manual_seed(seed)
    model = SiT_models["SiT-Pico/4"](input_size=8, in_channels=3, num_classes=4).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def test_the_eps_rules_and_intervals_are_sits():
    for path, prediction, _ in COMBINATIONS:
        for given in ((None, None), (1e-4, 2e-3)):
            transport = create_transport(path, prediction, None, *given)
            eps = ref.eps_rule(path, prediction, *given)
            assert (transport.train_eps, transport.sample_eps) == eps
            for sde, form, last, reverse in itertools.product((False, True), ("SBDM", "sigma"), (0.0, 0.04),
                                                               (False, True)):
                assert transport.interval(sde=sde, sampling=True, diffusion_form=form, last_step_size=last,
                                          reverse=reverse) == \
                    ref.interval(path, prediction, eps[1], sde, form, last, reverse)
            assert transport.interval() == ref.interval(path, prediction, eps[0])
    with pytest.raises(ValueError, match="path_type must be one of Linear, GVP, VP"):
        create_transport("Cosine")


def test_the_interpolants_start_at_noise_end_at_data_and_move_at_their_velocity():
    x0, x1 = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    for name in ("Linear", "GVP"):
        path = PATHS[name]()
        start, _ = path.plan(torch.zeros(3, dtype=torch.float64), x0, x1)
        end, _ = path.plan(torch.ones(3, dtype=torch.float64), x0, x1)
        torch.testing.assert_close(start, x0)
        torch.testing.assert_close(end, x1)
    for name, path in ((n, cls()) for n, cls in PATHS.items()):
        t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
        h = 1e-6
        ahead, _ = path.plan(t + h, x0, x1)
        behind, _ = path.plan(t - h, x0, x1)
        _, velocity = path.plan(t, x0, x1)
        torch.testing.assert_close(velocity, (ahead - behind) / (2 * h), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("path, prediction, weighting", COMBINATIONS)
def test_training_losses_are_sits(path, prediction, weighting):
    model = tiny_sit().train()
    transport = create_transport(path, prediction, weighting)
    x1, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(7)
    ours = transport.training_losses(model, x1, dict(y=y))["loss"]
    torch.manual_seed(7)
    theirs = ref.training_loss(path, prediction, weighting, transport.train_eps, model, x1, dict(y=y))
    assert torch.equal(ours, theirs) and torch.isfinite(ours).all()


@pytest.mark.parametrize("path, prediction, options", [
    ("Linear", "velocity", dict()),
    ("Linear", "noise", dict(method="Heun", form="SBDM", last_step="Tweedie")),
    ("Linear", "velocity", dict(form="linear", norm=0.5, last_step="Euler", last_step_size=0.1)),
    ("Linear", "velocity", dict(form="constant", last_step=None)),
    ("GVP", "velocity", dict(form="decreasing")),
    ("GVP", "score", dict(form="increasing-decreasing", method="Heun")),
    ("VP", "noise", dict(form="sigma", last_step="Tweedie")),
])
def test_sde_samples_are_sits(path, prediction, options):
    model, transport = tiny_sit(), create_transport(path, prediction)
    x, kwargs = torch.randn(2, 3, 8, 8), dict(y=torch.tensor([1, 3]))
    ours_options = {"sampling_method": options.get("method", "Euler"), "diffusion_form": options.get("form", "sigma"),
                    "diffusion_norm": options.get("norm", 1.0), "last_step": options.get("last_step", "Mean"),
                    "last_step_size": options.get("last_step_size", 0.04)}
    with torch.no_grad():
        torch.manual_seed(3)
        ours = sample_sde(transport, model.forward, x, kwargs, num_steps=12, **ours_options)
        torch.manual_seed(3)
        theirs = ref.sample_sde(path, prediction, transport.sample_eps, model.forward, x, kwargs, steps=12, **options)
    assert torch.equal(ours, theirs) and torch.isfinite(ours).all()


@pytest.mark.parametrize("path, prediction, options", [
    ("Linear", "velocity", dict()),
    ("Linear", "velocity", dict(method="euler", steps=8)),
    ("Linear", "velocity", dict(method="heun2", steps=6, reverse=True)),
    ("GVP", "score", dict(method="rk4", steps=5)),
    ("VP", "velocity", dict(atol=1e-4, rtol=1e-2)),
])
def test_ode_samples_are_sits(path, prediction, options):
    model, transport = tiny_sit(), create_transport(path, prediction)
    x, kwargs = torch.randn(2, 3, 8, 8), dict(y=torch.tensor([0, 2]))
    settings = dict(method="dopri5", steps=50, atol=1e-6, rtol=1e-3, reverse=False) | options
    with torch.no_grad():
        ours = sample_ode(transport, model.forward, x, kwargs, settings["method"], settings["steps"],
                          settings["atol"], settings["rtol"], settings["reverse"])
        theirs = ref.sample_ode(path, prediction, transport.sample_eps, model.forward, x, kwargs, **settings)
    assert torch.equal(ours, theirs) and not torch.equal(ours, x)
