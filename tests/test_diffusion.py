"""diffusion/: respacing, schedules, loss variants, samplers, likelihoods, timestep samplers."""
import math

import numpy as np
import official_reference as official
import pytest
import torch

from diffusion import create_diffusion, space_timesteps
from diffusion import gaussian_diffusion as gd
from diffusion.diffusion_utils import discretized_gaussian_log_likelihood, normal_kl
from diffusion.timestep_sampler import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler

# ---- respacing ---------------------------------------------------------------------------------

def test_every_single_section_count_keeps_the_official_steps():
    # The official rule (float running sum) against ours for all 1000 counts; round(j * stride)
    # would differ on 278 of them.
    rounded = lambda count: {round(j * (999 / (count - 1) if count > 1 else 1)) for j in range(count)}
    differs_from_rounding = 0
    for count in range(1, 1001):
        kept = space_timesteps(1000, str(count))
        assert kept == official.space_timesteps(1000, str(count)), count
        differs_from_rounding += kept != rounded(count)
    assert differs_from_rounding == 278


# Kept steps that a per-step round(j * stride) gets wrong, written out: 499 where it keeps 500.
OFFICIAL_STEPS = {
    "21": [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 499, 549, 599, 649, 699, 749, 799, 849, 899, 949, 999],
    "35": [0, 29, 59, 88, 118, 147, 176, 206, 235, 264, 294, 323, 353, 382, 411, 441, 470, 499, 529, 558, 588,
           617, 646, 676, 705, 735, 764, 793, 823, 852, 881, 911, 940, 970, 999],
}


@pytest.mark.parametrize("spec", ["21", "35", "23", "31", "39", "43", "45", "59", "250", "100", "50", "25", "10"])
def test_known_counts(spec):
    kept = sorted(space_timesteps(1000, spec))
    assert kept == sorted(official.space_timesteps(1000, spec))
    if spec in OFFICIAL_STEPS:
        assert kept == OFFICIAL_STEPS[spec]
    assert len(kept) == int(spec) and kept[0] == 0 and kept[-1] == 999


@pytest.mark.parametrize("steps,spec", [(300, "10,15,20"), (1000, "10,15,20"), (1000, "7,13"), (1000, "1,1,1"),
                                        (1000, "10,0"), (1000, "0,5,0"),
                                        (999, "100,50,25"), (4000, "33,66,99,250")])
def test_multi_section_specs(steps, spec):
    assert space_timesteps(steps, spec) == official.space_timesteps(steps, spec)
    assert space_timesteps(steps, [int(c) for c in spec.split(",")]) == official.space_timesteps(steps, spec)


def test_section_lists_of_300_steps():
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert steps == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171,
                     178, 185, 192, 199, 200, 205, 210, 216, 221, 226, 231, 236, 242, 247, 252, 257, 263, 268, 273,
                     278, 283, 289, 294, 299]
    assert space_timesteps(10, "10") == set(range(10))


def test_ddim_uses_the_official_integer_stride():
    for count in range(2, 1001):
        try:
            expected = official.space_timesteps(1000, f"ddim{count}")
        except ValueError:
            with pytest.raises(ValueError, match=f"no integer stride gives exactly {count}"):
                space_timesteps(1000, f"ddim{count}")
            continue
        assert space_timesteps(1000, f"ddim{count}") == expected, count
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))  # ceil(1000/143) == 7
    # Beyond the official: "ddim1" (stride 1000) keeps step 0; the official code refuses it.
    assert space_timesteps(1000, "ddim1") == {0}
    with pytest.raises(ValueError):
        official.space_timesteps(1000, "ddim1")


@pytest.mark.parametrize("spec,message", [
    ("ddim999", "no integer stride gives exactly 999"),
    ("ddim0", "between 1 and 1000"),
    ("ddim1001", "between 1 and 1000"),
    ("ddimfast", "'ddim' followed by a step count"),
    ("1001", "cannot keep 1001 steps"),
    ("600,600", "cannot keep 600 steps from a section of 500"),
    ("0", "at least one step"),
    ("0,0", "at least one step"),
    ("5,-1", "negative"),
    ("fast", "neither 'ddimN' nor"),
])
def test_impossible_respacings_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        create_diffusion(spec)


def test_spaced_diffusion_keeps_alphas_cumprod_and_feeds_original_timesteps():
    full = create_diffusion("")
    spaced = create_diffusion("ddim10")
    assert spaced.timestep_map == list(range(0, 1000, 100))
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    seen = []

    def recording_model(x, t):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    spaced.p_sample_loop(recording_model, (2, 1, 2, 2), device="cpu")
    assert seen == [[s, s] for s in range(900, -1, -100)]


# ---- schedules and create_diffusion arguments ----------------------------------------------------

def test_linear_schedule_scales_with_step_count():
    for steps in (1000, 500, 4000):
        betas = create_diffusion("", diffusion_steps=steps).betas
        assert len(betas) == steps
        assert betas[0] == pytest.approx(1e-4 * 1000 / steps) and betas[-1] == pytest.approx(0.02 * 1000 / steps)


def test_cosine_schedule():
    diffusion = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert diffusion.alphas_cumprod[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    assert diffusion.betas.max() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        create_diffusion("", noise_schedule="sigmoid")


def test_create_diffusion_types():
    default = create_diffusion(None)
    assert (default.model_mean_type, default.model_var_type, default.loss_type) == (
        gd.ModelMeanType.EPSILON, gd.ModelVarType.LEARNED_RANGE, gd.LossType.MSE)
    assert create_diffusion("", use_kl=True).loss_type == gd.LossType.RESCALED_KL
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == gd.LossType.RESCALED_MSE
    assert create_diffusion("", predict_xstart=True).model_mean_type == gd.ModelMeanType.START_X
    assert create_diffusion("", learn_sigma=False).model_var_type == gd.ModelVarType.FIXED_LARGE
    assert create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == gd.ModelVarType.FIXED_SMALL


# ---- losses ------------------------------------------------------------------------------------

def learned_output(x, t):
    return torch.cat([torch.sin(x + t.view(-1, 1, 1, 1) / 300), torch.tanh(x) * 0.5], dim=1)


def losses_with_grad(diffusion, x0, t, noise, channels=None):
    x_t = diffusion.q_sample(x0, t, noise=noise)
    output = learned_output(x_t, t)
    output = (output if channels is None else output[:, :channels]).requires_grad_(True)
    return diffusion.training_losses(lambda x, tt: output, x0, t, noise=noise), output


def test_vb_term_trains_the_variance_only():
    x0, noise, t = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4), torch.tensor([0, 10, 700])
    losses, output = losses_with_grad(create_diffusion(""), x0, t, noise)
    (grad,) = torch.autograd.grad(losses["vb"].sum(), output)
    assert torch.count_nonzero(grad[:, :2]) == 0 and torch.count_nonzero(grad[:, 2:]) > 0
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    torch.testing.assert_close(losses["mse"], ((output[:, :2] - noise) ** 2).mean(dim=(1, 2, 3)))


def test_loss_variants():
    x0, noise, t = torch.rand(2, 2, 4, 4) * 2 - 1, torch.randn(2, 2, 4, 4), torch.tensor([3, 20])
    base, _ = losses_with_grad(create_diffusion("50"), x0, t, noise)
    rescaled, _ = losses_with_grad(create_diffusion("50", rescale_learned_sigmas=True), x0, t, noise)
    torch.testing.assert_close(rescaled["vb"], base["vb"] * 50 / 1000)
    kl, _ = losses_with_grad(create_diffusion("50", use_kl=True), x0, t, noise)
    assert set(kl) == {"loss"}
    torch.testing.assert_close(kl["loss"], base["vb"] * 50)
    fixed, output = losses_with_grad(create_diffusion("50", learn_sigma=False), x0, t, noise, channels=2)
    assert set(fixed) == {"loss", "mse"}
    xstart, output = losses_with_grad(create_diffusion("50", learn_sigma=False, predict_xstart=True), x0, t, noise,
                                      channels=2)
    torch.testing.assert_close(xstart["mse"], ((output - x0) ** 2).mean(dim=(1, 2, 3)))


def test_learned_variance_model_with_wrong_channels_is_refused():
    diffusion = create_diffusion("10")
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, 6, 4, 4\)"):
        diffusion.training_losses(lambda x, t: x, x0, torch.tensor([1, 2]))


# ---- samplers, with a model that knows the answer ------------------------------------------------

FULL_ALPHAS_CUMPROD = torch.from_numpy(create_diffusion("").alphas_cumprod)


def oracle(x0, learn_sigma=False):
    """The exact eps predictor for data that is the single point x0 (it sees original timesteps)."""
    def model(x, t):
        abar = FULL_ALPHAS_CUMPROD[t].float().view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps
    return model


def test_samplers_recover_a_point_mass():
    x0 = torch.linspace(-0.9, 0.9, 2 * 1 * 3 * 3).view(2, 1, 3, 3)
    diffusion = create_diffusion("ddim20", learn_sigma=False)
    torch.manual_seed(0)
    ddim = diffusion.ddim_sample_loop(oracle(x0), x0.shape, device="cpu")
    torch.testing.assert_close(ddim, x0, atol=1e-5, rtol=0)
    spaced = create_diffusion("20")
    ancestral = spaced.p_sample_loop(oracle(x0, learn_sigma=True), list(x0.shape), device="cpu")
    torch.testing.assert_close(ancestral, x0, atol=1e-4, rtol=0)


def test_ddim_reverse_then_forward_round_trips():
    x0 = torch.linspace(-0.5, 0.5, 8).view(2, 1, 2, 2)
    diffusion = create_diffusion("ddim50", learn_sigma=False)
    model = oracle(x0)
    x = x0 + 0.0
    for i in range(diffusion.num_timesteps):
        x = diffusion.ddim_reverse_sample(model, x, torch.full((2,), i))["sample"]
    back = diffusion.ddim_sample_loop(model, x0.shape, noise=x)
    torch.testing.assert_close(back, x0, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="eta must be 0.0"):
        diffusion.ddim_reverse_sample(model, x, torch.zeros(2, dtype=torch.long), eta=0.5)


def test_progressive_loops_yield_every_step_and_eta_adds_noise():
    diffusion = create_diffusion("ddim10", learn_sigma=False)
    model = lambda x, t: torch.zeros_like(x)
    steps = list(diffusion.ddim_sample_loop_progressive(model, (1, 1, 2, 2), device="cpu"))
    assert len(steps) == 10
    noise = torch.randn(1, 1, 2, 2)
    deterministic = diffusion.ddim_sample_loop(model, (1, 1, 2, 2), noise=noise)
    assert torch.equal(deterministic, diffusion.ddim_sample_loop(model, (1, 1, 2, 2), noise=noise))
    stochastic = diffusion.ddim_sample_loop(model, (1, 1, 2, 2), noise=noise, eta=1.0)
    assert not torch.equal(deterministic, stochastic)
    assert len(list(diffusion.p_sample_loop_progressive(model, (1, 1, 2, 2), noise=noise))) == 10


def test_sampling_device_comes_from_a_bound_method():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.zeros(()))

        def guided(self, x, t):
            return torch.cat([x * self.scale, x * 0], 1)

    diffusion = create_diffusion("5")
    assert diffusion.p_sample_loop(Net().guided, (1, 1, 2, 2)).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="pass device="):
        diffusion.p_sample_loop(lambda x, t: x, (1, 1, 2, 2))
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.p_sample_loop(lambda x, t: x, (1, 1, 2, 2), noise=torch.zeros(1, 1, 3, 3))


def test_cond_fn_shifts_samples():
    diffusion = create_diffusion("5", learn_sigma=False)
    model = lambda x, t: torch.zeros_like(x)
    noise = torch.randn(1, 1, 2, 2)
    torch.manual_seed(0)
    plain = diffusion.p_sample_loop(model, (1, 1, 2, 2), noise=noise, clip_denoised=False)
    torch.manual_seed(0)
    pushed = diffusion.p_sample_loop(model, (1, 1, 2, 2), noise=noise, clip_denoised=False,
                                     cond_fn=lambda x, t: torch.ones_like(x))
    assert (pushed > plain).all()
    ddim_plain = diffusion.ddim_sample_loop(model, (1, 1, 2, 2), noise=noise, clip_denoised=False)
    ddim_pushed = diffusion.ddim_sample_loop(model, (1, 1, 2, 2), noise=noise, clip_denoised=False,
                                             cond_fn=lambda x, t: torch.ones_like(x))
    assert (ddim_pushed > ddim_plain).all()


# ---- likelihoods -------------------------------------------------------------------------------

def test_normal_kl():
    assert normal_kl(torch.zeros(3), 0.0, torch.zeros(3), 0.0).abs().max() == 0
    kl = normal_kl(torch.tensor(1.0), torch.tensor(math.log(4.0)), 0.0, 0.0)  # N(1, 4) vs N(0, 1)
    assert kl.item() == pytest.approx(0.5 * (4 + 1 - 1 - math.log(4)))


def test_discretized_likelihood_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256)
    for mean, log_scale in ((0.0, -2.0), (0.7, -4.0), (-1.2, 0.5)):
        means = torch.full_like(levels, mean)
        log_probs = discretized_gaussian_log_likelihood(levels, means=means, log_scales=torch.full_like(levels,
                                                                                                        log_scale))
        assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_calc_bpd_loop():
    diffusion = create_diffusion("8")
    x0 = torch.rand(2, 1, 3, 3) * 2 - 1
    out = diffusion.calc_bpd_loop(lambda x, t: torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1), x0)
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (2, 8)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert torch.isfinite(out["total_bpd"]).all() and (out["prior_bpd"] >= 0).all()
    good = diffusion.calc_bpd_loop(oracle(x0, learn_sigma=True), x0)
    assert (good["total_bpd"] < out["total_bpd"]).all()
    assert good["mse"].max() < 1e-6


# ---- timestep samplers -------------------------------------------------------------------------

def test_uniform_sampler():
    sampler = create_named_schedule_sampler("uniform", create_diffusion("100"))
    assert isinstance(sampler, UniformSampler)
    np.random.seed(0)
    t, weights = sampler.sample(64, "cpu")
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 100 and torch.equal(weights, torch.ones(64))


def test_loss_second_moment_sampler():
    sampler = create_named_schedule_sampler("loss-second-moment", create_diffusion("4"))
    assert isinstance(sampler, LossSecondMomentResampler)
    assert np.array_equal(sampler.weights(), np.ones(4))
    for _ in range(10):
        sampler.update_with_local_losses(torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 3.0]))
    weights = sampler.weights()
    assert weights[3] / weights[0] == pytest.approx((3 * 0.999 / 6 + 0.001 / 4) / (0.999 / 6 + 0.001 / 4))
    np.random.seed(0)
    t, importance = sampler.sample(10_000, "cpu")
    p = weights / weights.sum()
    torch.testing.assert_close(importance, torch.from_numpy(1 / (4 * p[t.numpy()])).float())
    assert (t == 3).float().mean().item() == pytest.approx(p[3], abs=0.02)
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("importance", create_diffusion("4"))


# ---- mixed precision -----------------------------------------------------------------------------

def test_autocast_losses_differ_from_fp32_only_by_the_model_outputs_rounding():
    """Under bf16 autocast the model output is bf16; the diffusion's arithmetic must still be fp32."""
    from models import DiT
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    diffusion = create_diffusion("")
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t, y = torch.tensor([0, 1, 10, 200, 600, 999]), torch.arange(6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_output = model(diffusion.q_sample(x0, t, noise), t, y)
        autocast_losses = diffusion.training_losses(model, x0, t, dict(y=y), noise=noise)
        autocast_pmv = diffusion.p_mean_variance(model, diffusion.q_sample(x0, t, noise), t, model_kwargs=dict(y=y))
    assert bf16_output.dtype == torch.bfloat16
    # The same rounded output, with all arithmetic after it in fp32, outside autocast:
    cast_up = lambda x, tt, **kwargs: bf16_output.float()
    expected = diffusion.training_losses(cast_up, x0, t, noise=noise)
    for name in ("loss", "mse", "vb"):
        assert autocast_losses[name].dtype == torch.float32
        torch.testing.assert_close(autocast_losses[name], expected[name], rtol=1e-6, atol=1e-7)
    expected_pmv = diffusion.p_mean_variance(cast_up, diffusion.q_sample(x0, t, noise), t)
    for name in ("mean", "log_variance", "pred_xstart"):
        torch.testing.assert_close(autocast_pmv[name], expected_pmv[name], rtol=1e-6, atol=1e-7)
