"""guided-diffusion's sampler, transcribed for tests (inference, eps-prediction models only).

Sources, read from the repositories:
* KU-CVLAB/Self-Attention-Guidance @ b4f16d8e09cf0b93a325b5ad94970d30deef3994 (guided-diffusion + SAG):
  ``guided_diffusion/gaussian_diffusion.py`` (``GaussianDiffusion``: ``q_sample``, ``q_posterior_mean_variance``,
  ``p_mean_variance``, ``_predict_xstart_from_eps``, ``_predict_eps_from_xstart``, ``condition_mean``,
  ``condition_score``, ``attention_masking``, ``p_sample``, ``ddim_sample``, the ``*_loop_progressive`` loops,
  ``_extract_into_tensor``), ``guided_diffusion/respace.py`` (``space_timesteps``, ``SpacedDiffusion``,
  ``_WrappedModel``), ``guided_diffusion/script_util.py`` (``create_gaussian_diffusion``: FIXED_LARGE unless
  ``sigma_small``, LEARNED_RANGE with ``learn_sigma``);
* the unguided branches ("No self-attention guidance") equal ``p_sample``/``ddim_sample`` of
  openai/guided-diffusion @ 22e0df8183507e13a7813f8d38d51b072ca1e67c.

Deviations (for testing only, none changes the official arithmetic in float32):
* ``th.randn_like(x)`` -> ``noise_fn(x)``, so that the reference and our sampler consume the same draws;
* ``_extract_into_tensor`` casts to ``self.dtype`` (official: ``.float()``), and ``condition_mean``'s ``.float()``
  likewise: float32 (the default) is the official code, float64 serves the float64 comparison;
* the SAG branch runs when ``guide_scale`` is given (the official flag ``attn_guidance`` is always True and
  ``guide_scale = 1.0`` means "no SAG" there, at the cost of a second model call);
* ``T.GaussianBlur(kernel_size=31, sigma)`` (torchvision is not installed here) is :func:`gaussian_blur_tv`,
  transcribed from torchvision ``transforms/_functional_tensor.py`` (``_get_gaussian_kernel1d/2d``,
  ``gaussian_blur``: 2-D kernel = outer product, reflect padding, grouped conv2d). ``GaussianBlur.get_params``
  draws ``uniform_(sigma, sigma)``, i.e. sigma itself, from the global RNG; omitted.
The model is called as in the fork: ``model(x, t, **model_kwargs) -> (output, attn_map)``.
"""

import numpy as np
import torch as th
import torch.nn.functional as F

FIXED_SMALL, FIXED_LARGE, LEARNED_RANGE = "fixed_small", "fixed_large", "learned_range"


def space_timesteps(num_timesteps, section_counts):
    """respace.py ``space_timesteps`` (a set of kept timesteps)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def gaussian_blur_tv(img, kernel_size, sigma):
    """torchvision ``gaussian_blur(img, [k, k], [sigma, sigma])`` for a float (B, C, H, W) tensor."""
    ksize_half = (kernel_size - 1) * 0.5
    x = th.linspace(-ksize_half, ksize_half, steps=kernel_size, dtype=img.dtype)
    pdf = th.exp(-0.5 * (x / sigma).pow(2))
    kernel1d = pdf / pdf.sum()
    kernel = th.mm(kernel1d[:, None], kernel1d[None, :])
    kernel = kernel.expand(img.shape[-3], 1, kernel.shape[0], kernel.shape[1])
    padding = [kernel_size // 2] * 4
    img = F.pad(img, padding, mode="reflect")
    return F.conv2d(img, kernel, groups=img.shape[-3])


def official_attention_mask(attn_map, num_heads, attn_res, size):
    """``attention_masking``'s mask: (B * num_heads, T, T) probabilities -> head mean -> summed over queries ->
    ``> 1.0`` -> (B, 3, H, W) float, nearest-upsampled (``F.interpolate`` default mode)."""
    b = attn_map.shape[0] // num_heads
    attn_mask = attn_map.reshape(b, num_heads, attn_res ** 2, attn_res ** 2).mean(1, keepdim=False).sum(
        1, keepdim=False) > 1.0
    attn_mask = attn_mask.reshape(b, attn_res, attn_res).unsqueeze(1).repeat(1, 3, 1, 1).int().float()
    return F.interpolate(attn_mask, tuple(size))


class GaussianDiffusion:
    def __init__(self, *, betas, model_var_type, sel_attn_block=None, sel_attn_depth=None, num_heads=None,
                 dtype=th.float32):
        self.model_var_type = model_var_type
        self.sel_attn_block, self.sel_attn_depth, self.num_heads = sel_attn_block, sel_attn_depth, num_heads
        self.dtype = dtype
        betas = np.array(betas, dtype=np.float64)  # Use float64 for accuracy.
        self.betas = betas
        assert len(betas.shape) == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def _extract(self, arr, timesteps, broadcast_shape):
        """``_extract_into_tensor`` (cast to ``self.dtype``; official: ``.float()``)."""
        res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].to(self.dtype)
        while len(res.shape) < len(broadcast_shape):
            res = res[..., None]
        return res.expand(broadcast_shape)

    def q_sample(self, x_start, t, noise):
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        posterior_mean = (self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                          + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        posterior_variance = self._extract(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None):
        model_kwargs = model_kwargs or {}
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output, attn_map = model(x, t, **model_kwargs)
        if self.model_var_type == LEARNED_RANGE:
            assert model_output.shape == (B, C * 2, *x.shape[2:])
            model_output, model_var_values = th.split(model_output, C, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = self._extract(np.log(self.betas), t, x.shape)
            frac = (model_var_values + 1) / 2  # The model_var_values is [-1, 1] for [min_var, max_var].
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        else:
            model_variance, model_log_variance = {
                # for fixedlarge, we set the initial (log-)variance like so to get a better decoder log likelihood.
                FIXED_LARGE: (np.append(self.posterior_variance[1], self.betas[1:]),
                              np.log(np.append(self.posterior_variance[1], self.betas[1:]))),
                FIXED_SMALL: (self.posterior_variance, self.posterior_log_variance_clipped),
            }[self.model_var_type]
            model_variance = self._extract(model_variance, t, x.shape)
            model_log_variance = self._extract(model_log_variance, t, x.shape)
        pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)  # ModelMeanType.EPSILON
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "eps": model_output, "attn_map": attn_map}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Sohl-Dickstein et al. (2015) / ADM Algorithm 1: mean + Sigma * grad (``cond_fn`` includes the scale)."""
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].to(self.dtype) + p_mean_var["variance"] * gradient.to(self.dtype)

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Song et al. (2020) / ADM Algorithm 2: eps - sqrt(1 - alpha_bar) * grad, from the (clipped) pred_xstart."""
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def attention_masking(self, x, t, attn_map, prev_noise, blur_sigma):
        """bar{x_t}: blur the predicted x_0 inside the attention mask (kernel 31, hard-coded), re-noise with eps."""
        B, C, H, W = x.shape
        assert t.shape == (B,)
        if self.sel_attn_depth in [0, 1, 2] or self.sel_attn_block == "middle":
            attn_res = 8
        elif self.sel_attn_depth in [3, 4, 5]:
            attn_res = 16
        elif self.sel_attn_depth in [6, 7, 8]:
            attn_res = 32
        else:
            raise ValueError("sel_attn_depth must be in [0, 1, 2, 3, 4, 5, 6, 7, 8]")
        attn_mask = official_attention_mask(attn_map, self.num_heads, attn_res, (H, W))
        x_curr = gaussian_blur_tv(x, 31, blur_sigma)
        x_curr = x_curr * attn_mask + x * (1 - attn_mask)
        return self.q_sample(x_curr, t, noise=prev_noise)

    def _sag_pred_xstart(self, model, x, t, out, clip_denoised, model_kwargs, guidance_kwargs):
        """The SAG branch shared by p_sample and ddim_sample: eps(bar{x_t}) + guide_scale (eps(x_t) - eps(bar{x_t}))."""
        cond_eps = out["eps"]
        mask_blurred = self.attention_masking(out["pred_xstart"], t, out["attn_map"], prev_noise=cond_eps,
                                              blur_sigma=guidance_kwargs["blur_sigma"])
        uncond_eps = self.p_mean_variance(model, mask_blurred, t, clip_denoised=clip_denoised,
                                          model_kwargs=model_kwargs)["eps"]
        guided_eps = uncond_eps + guidance_kwargs["guide_scale"] * (cond_eps - uncond_eps)
        pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=guided_eps)
        return pred_xstart.clamp(-1, 1) if clip_denoised else pred_xstart

    def _sag_on(self, t, guidance_kwargs):
        return guidance_kwargs is not None and guidance_kwargs["guide_start"] > t[0]

    def p_sample(self, model, x, t, noise_fn, clip_denoised=True, cond_fn=None, model_kwargs=None,
                 guidance_kwargs=None):
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if self._sag_on(t, guidance_kwargs):
            pred_xstart = self._sag_pred_xstart(model, x, t, out, clip_denoised, model_kwargs, guidance_kwargs)
            final_out = {"variance": out["variance"]}
            final_out["mean"], _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            final_out = out
        noise = noise_fn(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # no noise when t == 0
        if cond_fn is not None:
            final_out["mean"] = self.condition_mean(cond_fn, final_out, x, t, model_kwargs=model_kwargs)
        sample = final_out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, noise_fn, clip_denoised=True, cond_fn=None, model_kwargs=None, eta=0.0,
                    guidance_kwargs=None):
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if self._sag_on(t, guidance_kwargs):
            final_out = {"pred_xstart": self._sag_pred_xstart(model, x, t, out, clip_denoised, model_kwargs,
                                                              guidance_kwargs)}
        else:
            final_out = out
        if cond_fn is not None:
            final_out = self.condition_score(cond_fn, final_out, x, t, model_kwargs=model_kwargs)
        # Usually our model outputs epsilon, but we re-derive it in case we used x_start or x_prev prediction.
        eps = self._predict_eps_from_xstart(x, t, final_out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = noise_fn(x)  # Equation 12.
        mean_pred = final_out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # no noise when t == 0
        return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def sample_loop_progressive(self, model, noise, noise_fn, use_ddim=False, **kwargs):
        """``p_sample_loop_progressive`` / ``ddim_sample_loop_progressive`` from ``noise`` (x_T): yields every
        step's output dict (``"sample"`` = x after the step)."""
        img = noise
        step = self.ddim_sample if use_ddim else self.p_sample
        for i in list(range(self.num_timesteps))[::-1]:
            t = th.tensor([i] * noise.shape[0], device=noise.device)
            with th.no_grad():
                out = step(model, img, t, noise_fn, **kwargs)
                yield out
                img = out["sample"]


class SpacedDiffusion(GaussianDiffusion):
    """respace.py: the base process restricted to ``use_timesteps``; the model sees the original timesteps."""

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])
        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        return model if isinstance(model, _WrappedModel) else _WrappedModel(model, self.timestep_map)


class _WrappedModel:
    def __init__(self, model, timestep_map):  # rescale_timesteps is False in every official script
        self.model, self.timestep_map = model, timestep_map

    def __call__(self, x, ts, **kwargs):
        map_tensor = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, map_tensor[ts], **kwargs)
