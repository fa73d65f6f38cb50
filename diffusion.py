"""
The diffusion process of GenTron (Sec. 3.1): DDPM's linear noise schedule, the closed-form forward
process q(x_t | x_0) (Eq. 1), the eps- or v-prediction loss, three samplers (DDPM ancestral = Eq. 2,
DDIM, DPM-Solver++(2M)) and the two guidance rules: classifier-free guidance and motion-free
guidance (Eq. 6).

Conventions: timesteps are integers 0..num_steps-1 (t=0 is the first, least noisy step, as in DiT);
alpha_bar[t] = prod_{s<=t} (1 - beta_s). A sampler takes `eps_fn(x_t, t) -> eps`, where t is a (B,)
long tensor, so the same samplers run a bare model, CFG or MFG. Schedule arithmetic is float64.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class Diffusion:
    """Linear beta schedule, 1e-4 to 0.02 over 1000 steps (DDPM, as DiT).

    prediction: what the network outputs. "eps" (the paper / DiT) is the noise itself. "v" (Salimans &
    Ho 2022) is v = sqrt(abar) eps - sqrt(1 - abar) x_0; the pixel-space toys use it. At high noise an
    eps error e becomes an x_0 error e sqrt((1 - abar) / abar), up to 150x at t = 999, and a small model's
    eps errors then become speckle in the samples; v turns into eps = sqrt(abar) v + sqrt(1 - abar) x_t,
    which is ~x_t there by construction. Samplers and guidance always see eps (`eps_fn`)."""

    def __init__(self, num_steps=1000, beta_start=1e-4, beta_end=0.02, prediction="eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.num_steps, self.prediction = num_steps, prediction
        self.betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)

    def q_sample(self, x0, t, noise):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): Eq. 1 composed over t steps."""
        ab = _per_sample(self.alpha_bar, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def loss(self, net, x0, t, noise):
        """DDPM's simple loss: MSE between the network's output net(x_t, t) and its target, the true noise
        (or for v-prediction the true v)."""
        target = noise
        if self.prediction == "v":
            ab = _per_sample(self.alpha_bar, t, x0)
            target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
        return F.mse_loss(net(self.q_sample(x0, t, noise), t).float(), target.float())

    def eps_fn(self, net):
        """The network as the samplers' eps_fn(x_t, t, **cond): eps-prediction as is, v converted to eps."""
        if self.prediction == "eps":
            return net

        def eps(x, t, **cond):
            ab = _per_sample(self.alpha_bar, t, x)
            return ab.sqrt() * net(x, t, **cond) + (1 - ab).sqrt() * x

        return eps

    def timesteps(self, steps):
        """`steps` evenly spaced timesteps from num_steps-1 down to 0 (the sampling grid)."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in [1, {self.num_steps}], got {steps}")
        return torch.linspace(self.num_steps - 1, 0, steps, dtype=torch.float64).round().long()


def _per_sample(table, t, x):
    """table[t] for a (B,) t, shaped to broadcast over x (B, ...) and cast to x's dtype."""
    return table.to(x.device)[t].to(x.dtype).view(-1, *[1] * (x.ndim - 1))


def _tvec(t, x):
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


# -----------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def ddpm_sample(eps_fn, diffusion, x, steps=None, generator=None, progress=False):
    """DDPM ancestral sampling, Eq. 2, with sigma_t^2 the posterior variance beta~_t. With fewer
    steps than training, the chain is respaced: beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}."""
    ts = diffusion.timesteps(diffusion.num_steps if steps is None else steps)
    ab = diffusion.alpha_bar
    for i, t in enumerate(tqdm(ts.tolist(), disable=not progress, desc="ddpm")):
        ab_t = ab[t].item()
        ab_prev = ab[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        alpha = ab_t / ab_prev  # alpha_t of the (respaced) chain
        eps = eps_fn(x, _tvec(t, x))
        x = (x - (1 - alpha) / (1 - ab_t) ** 0.5 * eps) / alpha**0.5  # Eq. 2, mean
        if i + 1 < len(ts):
            sigma = ((1 - ab_prev) / (1 - ab_t) * (1 - alpha)) ** 0.5  # posterior std
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def ddim_sample(eps_fn, diffusion, x, steps=50, eta=0.0, generator=None, progress=False):
    """DDIM (Song et al. 2021): deterministic for eta = 0, ancestral-like for eta = 1."""
    ts = diffusion.timesteps(steps)
    ab = diffusion.alpha_bar
    for i, t in enumerate(tqdm(ts.tolist(), disable=not progress, desc="ddim")):
        ab_t = ab[t].item()
        ab_prev = ab[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, _tvec(t, x))
        x0 = (x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        x = ab_prev**0.5 * x0 + (1 - ab_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def dpmpp_2m_sample(eps_fn, diffusion, x, steps=20, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep ODE solver in data prediction,
    stepping in lambda = log(alpha / sigma); good samples in ~20 steps. The step into t = 0 is first
    order ("lower order final", as in the reference code and diffusers): lambda jumps there, so the
    ratio r of the last two steps is small (~0.24 at 25 steps) and the 2nd-order term would extrapolate
    x0 by ~1 / (2 r); first order is ~8x closer to the exact ODE solution there (a test)."""
    ts = diffusion.timesteps(steps)
    ab = diffusion.alpha_bar[ts]
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = (alpha / sigma).log()
    x0_prev = None
    for i, t in enumerate(tqdm(ts.tolist(), disable=not progress, desc="dpm++2m")):
        x0 = (x - sigma[i].item() * eps_fn(x, _tvec(t, x))) / alpha[i].item()
        if i + 1 < len(ts):  # the last grid point is t=0: the result is its denoised estimate x0
            h = (lam[i + 1] - lam[i]).item()
            d = x0
            if x0_prev is not None and i + 2 < len(ts):  # second order between the first and the last step
                r = (lam[i] - lam[i - 1]).item() / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = (sigma[i + 1] / sigma[i]).item() * x - alpha[i + 1].item() * torch.expm1(torch.tensor(-h)).item() * d
            x0_prev = x0
    return x0


def clip_denoised(eps_fn, diffusion, lo=-1.0, hi=1.0):
    """For data known to lie in [lo, hi] (pixel space): clip every step's x_0 estimate to that range and
    return the matching eps (DDPM / ADM's `clip_denoised`, DPM-Solver++'s thresholding). At high noise an
    eps error e becomes an x_0 error e * sqrt((1 - abar) / abar), up to ~150x at t = 999, and without the
    clip that bias walks the whole trajectory out of range. Latents are unbounded: no clip there (DiT)."""

    def clipped(x, t):
        ab = _per_sample(diffusion.alpha_bar, t, x)
        x0 = ((x - (1 - ab).sqrt() * eps_fn(x, t)) / ab.sqrt()).clamp(lo, hi)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    return clipped


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpm++2m": dpmpp_2m_sample}


def sample(eps_fn, diffusion, x, sampler="dpm++2m", steps=25, generator=None, progress=False, clip=False):
    """Run the named sampler from noise x = x_T; clip=True for data in [-1, 1] (see clip_denoised)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if clip:
        eps_fn = clip_denoised(eps_fn, diffusion)
    if sampler == "dpm++2m":
        return dpmpp_2m_sample(eps_fn, diffusion, x, steps, progress=progress)
    return SAMPLERS[sampler](eps_fn, diffusion, x, steps, generator=generator, progress=progress)


# -----------------------------------------------------------------------------
# Guidance


def cfg_combine(eps_cond, eps_uncond, scale):
    """Classifier-free guidance (Ho & Salimans): eps_u + s (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def mfg_combine(eps_null_free, eps_null_motion, eps_text_motion, lambda_t, lambda_m):
    """Motion-free guidance, Eq. 6:
    eps = e(0, 0) + lambda_T (e(c_T, c_M) - e(0, c_M)) + lambda_M (e(0, c_M) - e(0, 0))."""
    return (
        eps_null_free
        + lambda_t * (eps_text_motion - eps_null_motion)
        + lambda_m * (eps_null_motion - eps_null_free)
    )


def guided_eps_fn(model, cond, null, cfg_scale=7.5, mfg_scale=None, encode=None):
    """eps_fn(x, t) for the samplers. cond/null: dicts with text, text_mask, pooled for the prompts and
    for the empty caption (same batch size). Every prediction a rule needs comes from ONE batched
    forward pass: 2 for CFG (text / null), 3 for MFG (Eq. 6); the text-only path skips the null half
    when cfg_scale == 1. mfg_scale=None means image model or plain CFG. The batched captions are the same
    at every step, so they are put together once, and `encode` (GenTron.encode_text), if given, turns them
    once into the model's `context`: the captions' share of the forward pass then runs once, not every step."""
    cat = lambda *ds: {k: torch.cat([d[k] for d in ds]) for k in ds[0]}
    if mfg_scale is not None:
        caption = cat(null, null, cond)  # Eq. 6: (null text, motion off), (null text, motion on), (text, motion on)
    else:
        caption = cond if cfg_scale == 1.0 else cat(cond, null)
    if encode is not None:
        caption = dict(context=encode(**caption))

    def eps_fn(x, t):
        b = x.shape[0]
        if mfg_scale is None:
            if cfg_scale == 1.0:
                return model(x, t, **caption)
            e_c, e_u = model(torch.cat([x, x]), torch.cat([t, t]), **caption).chunk(2)
            return cfg_combine(e_c, e_u, cfg_scale)
        free = torch.arange(3 * b, device=x.device) < b  # motion-free flag: identity temporal mask
        e = model(torch.cat([x, x, x]), torch.cat([t, t, t]), **caption, motion_free=free)
        return mfg_combine(*e.chunk(3), cfg_scale, mfg_scale)

    return eps_fn
