"""ditlib/samplers.py: generate(), the ODE solvers against independent computations, the guidance interval."""
import re

import numpy as np
import pytest
import torch

from diffusion import create_diffusion
from ditlib.errors import SettingError
from ditlib.samplers import (
    NoNetwork,
    Sampler,
    SamplingSettings,
    generate,
    guided_in_interval,
    interval_from_sigma,
    noise_levels,
)
from models import DiT_models

pytestmark = pytest.mark.device  # on CUDA when present: see helpers.DEVICE




# ---- sample.py -----------------------------------------------------------------------------------



















def test_generate_doubles_the_batch_with_the_null_class_only_when_guided():
    calls = []

    class Recorder(NoNetwork):
        def forward(self, x, t, y, **kwargs):
            calls.append(("forward", len(x), y.tolist()))
            return super().forward(x, t, y)

        def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels):
            calls.append(("forward_with_cfg", len(x), y.tolist(), guide_all_channels))
            return super().forward(x, t, y)

    noise, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    out = generate(Recorder(num_classes=3, out_channels=8), Sampler("ddim", 2), noise, labels, 4.0)
    assert out.shape == noise.shape and calls == [("forward_with_cfg", 4, [0, 2, 3, 3], False)] * 2
    calls.clear()
    generate(Recorder(num_classes=3, out_channels=8), Sampler("ddim", 2), noise, labels, 4.0, guide_all_channels=True)
    assert calls == [("forward_with_cfg", 4, [0, 2, 3, 3], True)] * 2
    calls.clear()
    generate(Recorder(num_classes=3, out_channels=8), Sampler("ddim", 2), noise, labels, 1.0)
    assert calls == [("forward", 2, [0, 2])] * 2


# ---- sample_ddp.py --------------------------------------------------------------------------------









# ---- download.py ----------------------------------------------------------------------------------


def toy_eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A smooth eps model with a learned-sigma half, depending on x, t and the label."""
    scale = (0.3 + t.double() / 1000).view(-1, *[1] * (x.dim() - 1))
    eps = torch.tanh(x.double()) * scale + 0.1 * y.double().view(-1, *[1] * (x.dim() - 1))
    return torch.cat([eps, torch.zeros_like(eps)], 1).to(x.dtype)


def dpm_solver_pp_2m(x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """DPM-Solver++(2M) written from Lu et al. 2022 (Algorithm 2, data prediction, float64):
    lambda = log(alpha/sigma), x_t = sigma_t/sigma_s x_s - alpha_t (e^-h - 1) D, with
    D = x0_s + (x0_s - x0_prev) / (2r), r = h_prev / h; first order at the first step and at the
    last, which goes to noise level zero. Timesteps spaced as diffusers does: linspace(0, 999)."""
    alphas_cumprod = torch.from_numpy(create_diffusion("").alphas_cumprod)
    timesteps = np.linspace(0, 999, steps + 1).round()[::-1][:-1].astype(int)
    alpha = lambda t: alphas_cumprod[t].sqrt()  # noqa: E731
    sigma = lambda t: (1 - alphas_cumprod[t]).sqrt()  # noqa: E731
    lam = lambda t: torch.log(alpha(t) / sigma(t))  # noqa: E731
    x = x.double()
    previous = None
    for i, t in enumerate(timesteps):
        eps = toy_eps(x, torch.full((len(x),), int(t)), y)[:, :x.shape[1]]
        x0 = (x - sigma(t) * eps) / alpha(t)
        if i == len(timesteps) - 1:
            return x0  # the step to sigma = 0 lands on the data prediction
        following = timesteps[i + 1]
        h = lam(following) - lam(t)
        if previous is None:
            update = x0
        else:
            x0_prev, h_prev = previous
            update = x0 + (x0 - x0_prev) / (2 * (h_prev / h))
        x = sigma(following) / sigma(t) * x - alpha(following) * torch.expm1(-h) * update
        previous = (x0, h)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpm_solver_pp_loop_matches_the_papers_update_rule(steps):
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 6, 6), torch.tensor([0, 1, 2])
    ours = Sampler("dpm++", steps).run(toy_eps, x, dict(y=y))
    expected = dpm_solver_pp_2m(x, y, steps)
    assert torch.allclose(ours.double(), expected, atol=2e-5, rtol=1e-4), (ours.double() - expected).abs().max()


ALPHAS_CUMPROD = torch.from_numpy(create_diffusion("").alphas_cumprod)


DATA_STD = 0.5


def gaussian_eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact eps-prediction for data x_0 ~ N(m_y, DATA_STD^2) with m_y = y - 1: its probability-flow
    ODE has a closed-form solution (exact_solution)."""
    a = ALPHAS_CUMPROD[t].view(-1, 1, 1, 1)
    m = (y.double() - 1).view(-1, 1, 1, 1)
    eps = (1 - a).sqrt() * (x.double() - a.sqrt() * m) / (a * DATA_STD ** 2 + 1 - a)
    return torch.cat([eps, torch.zeros_like(eps)], 1).float()


def exact_solution(x: torch.Tensor, y: torch.Tensor, t: int) -> torch.Tensor:
    """Where the ODE takes x at timestep t: the flow keeps the standardised value, so
    x_0 = m + DATA_STD (x_t - sqrt(a_t) m) / sqrt(a_t DATA_STD^2 + 1 - a_t)."""
    a, m = ALPHAS_CUMPROD[t], (y.double() - 1).view(-1, 1, 1, 1)
    return m + DATA_STD * (x.double() - a.sqrt() * m) / (a * DATA_STD ** 2 + 1 - a).sqrt()


def test_every_solver_reaches_the_exact_ode_solution_and_draws_nothing():
    """On Gaussian data, where the ODE's end point is known in closed form, DPM-Solver++ and UniPC
    land on it (closely with few steps), as DDIM (eta 0) does with many; none draws random numbers."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 6, 6), torch.tensor([0, 1, 2])
    exact = exact_solution(x, y, 999)
    state = torch.get_rng_state()
    errors = {(solver, steps): (Sampler(solver, steps).run(gaussian_eps, x, dict(y=y))
                                .double() - exact).abs().max().item()
              for solver in ("dpm++", "unipc") for steps in (10, 25, 100)}
    assert torch.equal(torch.get_rng_state(), state)
    ddim = {steps: (Sampler("ddim", steps).run(gaussian_eps, x, dict(y=y)).double()
                    - exact_solution(x, y, 1000 - 1000 // steps)).abs().max().item() for steps in (25, 500)}
    assert ddim[500] < 2e-2  # DDIM (from t = 1000 - stride) is a first-order solver of the same ODE
    for solver in ("dpm++", "unipc"):
        assert errors[(solver, 100)] < 5e-3 and errors[(solver, 25)] < 0.1 and errors[(solver, 10)] < 0.5, errors
        # Second order: 4x the steps cut the error more than 10x; at 25 steps far below DDIM's.
        assert errors[(solver, 100)] < errors[(solver, 25)] / 10 < errors[(solver, 10)] / 10, errors
        assert errors[(solver, 25)] < ddim[25] / 3, (errors, ddim)


def test_pixel_space_solvers_clip_the_predicted_image():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])

    def wild(x, t, y):  # predicts images far outside [-1, 1]
        return torch.cat([-3 * x, torch.zeros_like(x)], 1)

    for solver in ("dpm++", "unipc"):
        out = Sampler(solver, 8).run(wild, x, dict(y=y), pixels=True)
        assert out.abs().max() <= 1 + 1e-5
        assert Sampler(solver, 8).run(wild, x, dict(y=y)).abs().max() > 2


def test_guidance_interval_guides_only_inside_it():
    torch.manual_seed(0)
    model = DiT_models["DiT-Nano/4"](input_size=8, in_channels=4, num_classes=3).eval()
    with torch.no_grad():  # a model that is not zero at init, so guidance changes its output
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    noise, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    x, kwargs = torch.cat([noise, noise]), dict(y=torch.tensor([0, 2, 3, 3]), cfg_scale=4.0)
    model_fn = guided_in_interval(model, 0.2, 0.6)
    with torch.no_grad():
        for t, inside in ((100, False), (200, True), (450, True), (600, True), (601, False), (999, False)):
            tt = torch.full((4,), t)
            out = model_fn(x, tt, **kwargs)
            if inside:
                assert torch.equal(out, model.forward_with_cfg(x, tt, **kwargs))
            else:
                unguided = model.forward(noise, tt[:2], labels)
                assert torch.equal(out, torch.cat([unguided, unguided]))
                assert not torch.allclose(out, model.forward_with_cfg(x, tt, **kwargs))
    # [0, 1] guides everywhere: the same samples as no interval, for every sampler.
    for name in ("ddpm", "ddim", "dpm++", "unipc"):
        sampler = Sampler(name, 6)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            a = generate(model, sampler, noise, labels, 4.0, interval=(0, 1))
            torch.manual_seed(1)
            b = generate(model, sampler, noise, labels, 4.0)
        assert torch.equal(a, b), name


def test_ode_solvers_refuse_step_counts_that_repeat_a_timestep():
    """At 1000 steps diffusers' spacing repeats a timestep: h = 0 and every value NaN. The largest
    count with distinct timesteps samples finite values; one more is refused by name."""
    x, y = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([1])
    for solver in ("dpm++", "unipc"):
        assert torch.isfinite(Sampler(solver, 999).run(toy_eps, x, dict(y=y))).all()
        with pytest.raises(SettingError, match=f"^num_sampling_steps 1000: --sampler {re.escape(solver)} visits "
                                               f"only 999 distinct timesteps.*use at most 999 steps") as error:
            Sampler(solver, 1000)
        assert error.value.setting == "num_sampling_steps"


def test_guidance_interval_in_sigma_holds_exactly_the_same_timesteps():
    """--cfg-interval-sigma: Kynkaanniemi et al.'s unit. REPA's 0.7 on its linear path x_t = (1 - t) x + t eps
    is sigma = 0.7 / 0.3 = 2.33, which on DiT's schedule is t/1000 = 0.426, not 0.7 (sigma 12.0)."""
    sigmas = noise_levels()
    assert np.all(np.diff(sigmas) > 0) and sigmas[0] == pytest.approx(0.01, rel=1e-3)
    assert sigmas[700] == pytest.approx(12.03, abs=0.01)
    assert interval_from_sigma(sigmas[200], sigmas[600]) == (0.2, 0.6)
    assert interval_from_sigma(sigmas[200] * 1.0001, sigmas[600] * 0.9999) == (0.201, 0.599)
    assert interval_from_sigma(0, 0.7 / 0.3) == (0.0, 0.426)
    assert SamplingSettings(cfg_interval_sigma=(0.0, 0.7 / 0.3)).interval() == (0.0, 0.426)
    assert SamplingSettings(cfg_interval=(0.1, 0.7)).interval() == (0.1, 0.7)
    assert SamplingSettings().interval() is None
    with pytest.raises(ValueError, match="holds no timestep"):
        interval_from_sigma(200, 300)
