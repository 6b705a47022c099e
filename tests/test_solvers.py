"""The ODE solvers (dpm++, unipc) and the guidance interval, against independent computations."""
import hashlib
import re

import numpy as np
import pytest
import torch

from conftest import DEVICE, run_main
from diffusion import create_diffusion
from models import DiT_models
from sampling import guided_batch, run_sampler, sampling_diffusion


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
    ours = run_sampler(sampling_diffusion("dpm++", steps), "dpm++", toy_eps, x, dict(y=y))
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
    errors = {(solver, steps): (run_sampler(sampling_diffusion(solver, steps), solver, gaussian_eps, x, dict(y=y))
                                .double() - exact).abs().max().item()
              for solver in ("dpm++", "unipc") for steps in (10, 25, 100)}
    assert torch.equal(torch.get_rng_state(), state)
    ddim = {steps: (run_sampler(sampling_diffusion("ddim", steps), "ddim", gaussian_eps, x, dict(y=y)).double()
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
        out = run_sampler(sampling_diffusion(solver, 8), solver, wild, x, dict(y=y), pixels=True)
        assert out.abs().max() <= 1 + 1e-5
        assert run_sampler(sampling_diffusion(solver, 8), solver, wild, x, dict(y=y)).abs().max() > 2


def test_guidance_interval_guides_only_inside_it():
    torch.manual_seed(0)
    model = DiT_models["DiT-Nano/4"](input_size=8, in_channels=4, num_classes=3).eval()
    with torch.no_grad():  # a model that is not zero at init, so guidance changes its output
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    noise, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    x, model_fn, kwargs = guided_batch(noise, labels, 3, 4.0, model, interval=(0.2, 0.6))
    plain_x, plain_fn, plain_kwargs = guided_batch(noise, labels, 3, 4.0, model)
    assert torch.equal(x, plain_x) and torch.equal(kwargs["y"], plain_kwargs["y"])
    with torch.no_grad():
        for t, inside in ((100, False), (200, True), (450, True), (600, True), (601, False), (999, False)):
            tt = torch.full((4,), t)
            out = model_fn(x, tt, **kwargs)
            if inside:
                assert torch.equal(out, plain_fn(x, tt, **plain_kwargs))
            else:
                unguided = model.forward(noise, tt[:2], labels)
                assert torch.equal(out, torch.cat([unguided, unguided]))
                assert not torch.allclose(out, plain_fn(x, tt, **plain_kwargs))
    # [0, 1] guides everywhere: the same samples as no interval, for every sampler.
    for sampler in ("ddpm", "ddim", "dpm++", "unipc"):
        diffusion = sampling_diffusion(sampler, 6)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            a = run_sampler(diffusion, sampler, guided_batch(noise, labels, 3, 4.0, model, interval=(0, 1))[1], x, kwargs)
            torch.manual_seed(1)
            b = run_sampler(diffusion, sampler, plain_fn, x, kwargs)
        assert torch.equal(a, b), sampler


def test_sample_ddp_resumes_an_ode_solver_with_an_interval_byte_for_byte(tmp_path, trained_checkpoint):
    args = ["--ckpt", trained_checkpoint, "--sample-dir", tmp_path / "s", "--per-proc-batch-size", "2",
            "--num-fid-samples", "6", "--num-sampling-steps", "5", "--sampler", "dpm++", "--cfg-scale", "3",
            "--cfg-interval", "0", "0.7", "--device", DEVICE]
    run_main("sample_ddp.py", *args)
    folder = next(p for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert folder.name.endswith("-cfg-3.0-seed-0-dpm++-interval-0.0-0.7")
    npz = folder.with_name(folder.name + ".npz")
    first = hashlib.sha256(npz.read_bytes()).hexdigest()
    (folder / "000002.png").unlink()
    run_main("sample_ddp.py", *args)
    assert hashlib.sha256(npz.read_bytes()).hexdigest() == first
    with pytest.raises(ValueError, match=r"other settings \(num_sampling_steps 5 there, 6 now\)"):
        run_main("sample_ddp.py", *args, "--num-sampling-steps", "6")


def test_sample_py_takes_the_solvers_and_checks_the_interval(tmp_path, trained_checkpoint):
    common = ["--ckpt", trained_checkpoint, "--class-labels", "0", "1", "--num-sampling-steps", "4", "--device", DEVICE]
    for sampler in ("dpm++", "unipc"):
        path = run_main("sample.py", *common, "--sampler", sampler, "--output", tmp_path / f"{sampler}.png")
        assert path.is_file()
    with pytest.raises(ValueError, match=re.escape("--cfg-interval LO HI needs 0 <= LO <= HI <= 1 (fractions of the "
                                                   "1000 timesteps), got 0.8 0.2")):
        run_main("sample.py", *common, "--cfg-interval", "0.8", "0.2", "--output", tmp_path / "x.png")
