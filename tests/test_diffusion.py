"""Properties of diffusion.py: Eq. 1 statistics, exact samplers under an oracle, Eq. 6 reductions."""

import pytest
import torch

import fastpath

from diffusion import Diffusion, cfg_combine, ddim_sample, ddpm_sample, guided_eps_fn, mfg_combine, sample
from model import GenTron, make_config


def test_schedule_is_ddpm_linear():
    d = Diffusion()
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    # abar_T ~ 4e-5: x_T is (almost) pure noise, as Sec. 3.1 assumes
    assert d.alpha_bar[-1].item() == pytest.approx(4.036e-5, rel=1e-3)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_moments(t):
    # Eq. 1 in closed form: x_t | x_0 ~ N(sqrt(abar_t) x_0, (1 - abar_t) I)
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((1,), t), torch.randn(x0.shape, generator=g, dtype=torch.float64))
    ab = d.alpha_bar[t].item()
    assert xt.mean().item() == pytest.approx(ab**0.5 * 0.7, abs=4 * ((1 - ab) / 2e5) ** 0.5 + 1e-9)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02, abs=1e-6)


def test_q_sample_matches_composed_eq1_chain():
    # Applying Eq. 1 step by step t+1 times has the same mean/variance as the closed form at t.
    d = Diffusion()
    g = torch.Generator().manual_seed(1)
    x = torch.full((50_000,), -1.0, dtype=torch.float64)
    for beta in d.betas[:200]:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    closed = d.q_sample(torch.full_like(x, -1.0), torch.full((1,), 199), torch.randn(x.shape, generator=g, dtype=torch.float64))
    assert x.mean().item() == pytest.approx(closed.mean().item(), abs=0.01)
    assert x.var().item() == pytest.approx(closed.var().item(), rel=0.03)


def test_q_sample_is_eq1_exactly_and_the_grid_spans_t():
    d = Diffusion()
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    ab = d.alpha_bar[t].view(-1, 1)
    assert torch.allclose(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise, rtol=0, atol=1e-12)
    for n in (1, 25, 1000):  # the sampling grid starts at the last training step and ends at 0
        grid = d.timesteps(n)
        assert grid[0] == 999 and (n == 1 or grid[-1] == 0) and len(grid) == n and (grid.diff() < 0).all()


def test_ddpm_samples_gaussian_data_with_its_moments():
    """Eq. 2 (ancestral DDPM, the posterior's mean and variance at each step) with the exact eps of data
    N(mu, s^2) generates samples with that mean and standard deviation; with the noise of each step scaled
    wrongly (or skipped) the spread is off. (An oracle for a known x_0 cannot tell: its last step returns x_0.)"""
    d, mu, s = Diffusion(), 0.3, 0.5

    def eps_fn(x, t):  # E[eps | x_t] for x_0 ~ N(mu, s^2)
        ab = d.alpha_bar[t].view(-1, *[1] * (x.ndim - 1))
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)

    xT = torch.randn(4, 10000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(eps_fn, d, xT, "ddpm", 1000, generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - mu) < 0.01 and abs(out.std().item() - s) < 0.015
    # respaced to 50 steps the fixed variance beta~ makes the samples narrower than s (0.44 here); DDIM with eta = 1
    # draws the same posterior noise (Song et al. 2021, Eq. 16), so it gives the same spread as DDPM
    ddpm = sample(eps_fn, d, xT, "ddpm", 50, generator=torch.Generator().manual_seed(1))
    ddim = ddim_sample(eps_fn, d, xT, steps=50, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert abs(ddpm.std().item() - ddim.std().item()) < 0.01 and abs(ddpm.mean().item() - ddim.mean().item()) < 0.01
    assert 0.4 < ddpm.std().item() < 0.48


def test_respaced_ancestral_step_has_the_posterior_variance():
    """One noise step of a respaced chain, by hand (DDPM's Eq. 7 on the grid [999, 0]): from x_T = 0 with eps = 0
    the sample is sigma z / sqrt(abar_0), sigma^2 = beta~ = (1 - abar_0) / (1 - abar_999) (1 - abar_999 / abar_0).
    DDPM draws sigma (Eq. 2), DDIM eta * sigma."""
    d = Diffusion()
    ab0, abT = d.alpha_bar[0].item(), d.alpha_bar[999].item()
    want = ((1 - ab0) / (1 - abT) * (1 - abT / ab0)) ** 0.5 / ab0**0.5  # 0.0100
    zero, x = (lambda x, t: torch.zeros_like(x)), torch.zeros(200_000, dtype=torch.float64)
    g = lambda: torch.Generator().manual_seed(0)
    assert ddpm_sample(zero, d, x, steps=2, generator=g()).std().item() == pytest.approx(want, rel=0.01)
    for eta in (0.5, 1.0):
        got = ddim_sample(zero, d, x, steps=2, eta=eta, generator=g()).std().item()
        assert got == pytest.approx(eta * want, rel=0.01)


def oracle(d, x0):
    """The perfect noise predictor for a known x_0: eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""

    def eps_fn(x, t):
        ab = d.alpha_bar[t].view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    return eps_fn


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddpm", 50), ("ddim", 20), ("dpm++2m", 10)])
def test_samplers_recover_x0_with_oracle(sampler, steps):
    d = Diffusion()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    xT = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = sample(oracle(d, x0), d, xT, sampler, steps, generator=g)
    assert (out - x0).abs().max().item() < 1e-6


def test_ode_samplers_converge_to_the_exact_flow_of_gaussian_data():
    """For data N(mu, s^2) the exact eps is linear in x and the probability-flow ODE keeps each sample's
    z-score, so the ODE's endpoint from x_T is known in closed form. DDIM is first order (the error halves as
    the steps double); DPM-Solver++(2M) converges faster (25 -> 50 steps: error / 7) and at the CLI's 25 steps
    beats DDIM by far, which needs its first-order step into t = 0 (a 2nd-order one there is ~8x further off)."""
    d, mu, s = Diffusion(), 0.3, 0.5
    ab_of = lambda t, x: d.alpha_bar[t].view(-1, *[1] * (x.ndim - 1))

    def eps_fn(x, t):  # E[eps | x_t] for x_0 ~ N(mu, s^2)
        ab = ab_of(t, x)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)

    xT = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    abT, ab0 = d.alpha_bar[999], d.alpha_bar[0]
    z = (xT - abT.sqrt() * mu) / (abT * s * s + 1 - abT).sqrt()
    x_t0 = ab0.sqrt() * mu + (ab0 * s * s + 1 - ab0).sqrt() * z  # the ODE's solution at t = 0 ...
    exact = mu + ab0.sqrt() * s * s / (ab0 * s * s + 1 - ab0) * (x_t0 - ab0.sqrt() * mu)  # ... denoised there
    err = {(name, n): (sample(eps_fn, d, xT, name, n) - exact).pow(2).mean().sqrt().item()
           for name in ("ddim", "dpm++2m") for n in (25, 50, 100)}
    assert 1.7 < err["ddim", 25] / err["ddim", 50] < 2.3 and 1.7 < err["ddim", 50] / err["ddim", 100] < 2.3
    assert err["dpm++2m", 25] / err["dpm++2m", 50] > 4 and err["dpm++2m", 100] < err["dpm++2m", 50]
    assert err["dpm++2m", 25] < 0.02 < err["ddim", 25] / 2


def test_ddpm_steps_zero_is_refused():
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\], got 0"):  # not "0 = all 1000"
        sample(lambda x, t: x, Diffusion(), torch.zeros(1, 2), "ddpm", 0)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    d = Diffusion()
    model = lambda x, t: torch.sin(x) * (t.view(-1, 1) / 1000.0)  # any fixed eps function
    xT = torch.randn(3, 16)
    a = ddim_sample(model, d, xT, steps=25, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(model, d, xT, steps=25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = ddim_sample(model, d, xT, steps=25, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert (a - c).abs().max() > 1e-3


def test_loss_is_zero_for_oracle_and_positive_otherwise():
    d = Diffusion()
    x0 = torch.randn(8, 4, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,))
    noise = torch.randn_like(x0)
    assert d.loss(oracle(d, x0), x0, t, noise).item() < 1e-20
    assert d.loss(lambda x, t: torch.zeros_like(x), x0, t, noise).item() == pytest.approx(noise.pow(2).mean().item())


def test_mfg_reductions():
    g = torch.Generator().manual_seed(3)
    e_nn, e_nm, e_tm = (torch.randn(5, generator=g) for _ in range(3))
    # lambda_M = 1: Eq. 6 is plain CFG with motion on
    torch.testing.assert_close(mfg_combine(e_nn, e_nm, e_tm, 7.5, 1.0), cfg_combine(e_tm, e_nm, 7.5))
    # lambda_T = lambda_M = 1: the fully conditioned prediction
    torch.testing.assert_close(mfg_combine(e_nn, e_nm, e_tm, 1.0, 1.0), e_tm)
    # lambda_M = 0 drops motion from the unconditional baseline: e(0,0) + lambda_T (e(c,m) - e(0,m))
    torch.testing.assert_close(mfg_combine(e_nn, e_nm, e_tm, 2.0, 0.0), e_nn + 2 * (e_tm - e_nm))
    # CFG with scale 1 is the conditional prediction
    torch.testing.assert_close(cfg_combine(e_tm, e_nm, 1.0), e_tm)


def _random_video_model(conditioning="cross_attn"):
    torch.manual_seed(0)
    cfg = make_config("tiny", in_channels=3, text_dim=12, pooled_dim=8, temporal=True, conditioning=conditioning)
    model = GenTron(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_guided_eps_fn_is_eq6_from_one_batched_forward():
    model = _random_video_model()
    b, L = 2, 5
    g = torch.Generator().manual_seed(4)
    cond = dict(text=torch.randn(b, L, 12, generator=g), text_mask=torch.ones(b, L, dtype=torch.bool),
                pooled=torch.randn(b, 8, generator=g))
    null = dict(text=torch.randn(b, L, 12, generator=g), text_mask=torch.ones(b, L, dtype=torch.bool),
                pooled=torch.randn(b, 8, generator=g))
    x, t = torch.randn(b, 4, 3, 8, 8, generator=g), torch.tensor([10, 900])
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    with torch.no_grad():
        got = guided_eps_fn(model, cond, null, cfg_scale=7.5, mfg_scale=1.2)(x, t)
        assert calls == [3 * b]  # one batched forward for the three predictions
        on, off = torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)
        e_nn = model(x, t, **null, motion_free=off)
        e_nm = model(x, t, **null, motion_free=on)
        e_tm = model(x, t, **cond, motion_free=on)
    # one batch of 3b vs three batches of b: float32 rounding, amplified up to ~8x by the guidance scales
    torch.testing.assert_close(got, mfg_combine(e_nn, e_nm, e_tm, 7.5, 1.2), rtol=1e-4, atol=1e-4)
    assert (e_nn - e_nm).abs().max() > 1e-3  # the motion-free flag really changes the prediction


@pytest.mark.parametrize("conditioning, cfg_scale, mfg_scale, prediction", [
    ("cross_attn", 7.5, None, "eps"), ("cross_attn", 7.5, 1.2, "eps"), ("cross_attn", 1.0, None, "eps"),
    ("adaln", 7.5, 1.2, "eps"), ("cross_attn", 7.5, None, "v")])
def test_guided_eps_fn_encodes_the_captions_once(conditioning, cfg_scale, mfg_scale, prediction):
    # fastpath's FusedGenTron.encode_text: the captions' share of the forward pass (pooled-text MLP; with cross-attention the text
    # projection and every block's keys and values) runs once per batch instead of once per step, and the
    # predictions stay exactly the same: CFG, MFG (Eq. 6), text only, adaLN-zero (Fig. 2a), v-prediction
    model = fastpath.speed_up(_random_video_model(conditioning))
    net = Diffusion(prediction=prediction).eps_fn(model)
    b, L = 2, 5
    g = torch.Generator().manual_seed(6)
    caption = lambda: dict(text=torch.randn(b, L, 12, generator=g), text_mask=torch.rand(b, L, generator=g) < 0.7,
                           pooled=torch.randn(b, 8, generator=g))
    cond, null = caption(), caption()
    x, t = torch.randn(b, 4, 3, 8, 8, generator=g), torch.tensor([10, 900])
    encoded = []
    model.pooled_embedder.register_forward_hook(lambda m, i, o: encoded.append(o.shape[0]))
    with torch.no_grad():
        steps = lambda eps_fn: [eps_fn(x, t), eps_fn(0.5 * x, t - 5)]  # two sampling steps
        every_step = steps(guided_eps_fn(net, cond, null, cfg_scale, mfg_scale))
        assert len(encoded) == 2
        once = steps(guided_eps_fn(net, cond, null, cfg_scale, mfg_scale, encode=model.encode_text))
        assert len(encoded) == 3  # once for both steps
    for a, e in zip(once, every_step):
        assert torch.equal(a, e)
    assert not torch.equal(once[0], once[1])


def test_clip_denoised_keeps_in_range_x0_and_clips_the_rest():
    from diffusion import clip_denoised

    d = Diffusion()
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1  # inside [-1, 1]
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    exact = oracle(d, x0)
    torch.testing.assert_close(clip_denoised(exact, d)(xt, t), exact(xt, t))  # nothing to clip: unchanged
    biased = lambda x, t: exact(x, t) + 0.05  # a small eps bias is a huge x_0 bias at high noise
    ab = d.alpha_bar[t].view(-1, 1, 1, 1)
    implied = lambda eps: (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
    assert implied(biased(xt, t))[-1].abs().max() > 5  # ~ 0.05 * 157 at t = 999
    assert implied(clip_denoised(biased, d)(xt, t)).abs().max() <= 1 + 1e-9


def test_v_prediction_matches_eps_oracle():
    """v-prediction: the perfect v-network, v = sqrt(abar) eps - sqrt(1 - abar) x_0 written as a function of
    (x_t, t), has zero v-loss, and Diffusion.eps_fn turns it back into the exact eps oracle - so every
    sampler reaches x_0 from it exactly as from the eps oracle."""
    d = Diffusion(prediction="v")
    x0 = torch.randn(8, 4, dtype=torch.float64)
    eps_oracle = oracle(d, x0)

    def v_oracle(x, t):
        ab = d.alpha_bar[t].view(-1, 1).to(x.dtype)
        return ab.sqrt() * eps_oracle(x, t) - (1 - ab).sqrt() * x0

    t = torch.randint(0, 1000, (8,))
    noise = torch.randn_like(x0)
    assert d.loss(v_oracle, x0, t, noise).item() < 1e-20
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.eps_fn(v_oracle)(xt, t), noise, rtol=1e-9, atol=1e-9)
    out = sample(d.eps_fn(v_oracle), d, torch.randn(8, 4, dtype=torch.float64), "ddim", steps=10)
    torch.testing.assert_close(out, x0, rtol=1e-6, atol=1e-6)
    # at t = 999 a v-network that knows nothing (v = 0) still gives eps = sqrt(1 - abar) x_t ~ x_t
    zero = lambda x, t: torch.zeros_like(x)
    t999 = torch.full((8,), 999)
    xt = d.q_sample(x0, t999, noise)
    assert (d.eps_fn(zero)(xt, t999) - noise).pow(2).mean() < 1e-3 < (zero(xt, t999) - noise).pow(2).mean()
    with pytest.raises(ValueError, match="prediction"):
        Diffusion(prediction="x0")
