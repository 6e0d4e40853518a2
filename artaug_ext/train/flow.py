"""The FLUX flow-matching objective, batched, on DiffSynth's scheduler and model function."""

from __future__ import annotations

import torch
from diffsynth.diffusion.flow_match import FlowMatchScheduler

from ..errors import UsageError
from .settings import TIMESTEP_SAMPLING


class FluxDenoiser(torch.nn.Module):
    """A FLUX DiT called through DiffSynth's `model_fn_flux_image`, as one module.

    One module so that `accelerator.prepare` (DDP, autocast) wraps the whole call; the
    forward is DiffSynth's own, the one the pipeline runs at inference.
    """

    def __init__(self, dit: torch.nn.Module, use_gradient_checkpointing: bool = False):
        super().__init__()
        self.dit = dit
        self.use_gradient_checkpointing = use_gradient_checkpointing

    def forward(self, latents, timestep, prompt_emb, pooled_prompt_emb, guidance):
        from diffsynth.pipelines.flux_image import model_fn_flux_image

        text_ids = torch.zeros(prompt_emb.shape[0], prompt_emb.shape[1], 3, device=latents.device, dtype=latents.dtype)
        return model_fn_flux_image(
            dit=self.dit, latents=latents, timestep=timestep, prompt_emb=prompt_emb,
            pooled_prompt_emb=pooled_prompt_emb, guidance=guidance, text_ids=text_ids,
            use_gradient_checkpointing=self.use_gradient_checkpointing and self.training,
        )


class FlowMatchObjective:
    """Rectified-flow loss with DiffSynth's training timesteps, weights and target.

    Same arithmetic as `diffsynth.diffusion.loss.FlowMatchSFTLoss`, but with one timestep
    per sample (DiffSynth draws one per batch of one): x_t = (1 - s) x_0 + s n (the
    scheduler's `add_noise`), target n - x_0 (`training_target`). Timestep sampling:

    - "diffsynth": uniform over the scheduler's 1000 training timesteps (FLUX.1's shifted
      schedule), each loss weighted by `linear_timesteps_weights` (or uniformly);
    - "logit-normal": s = sigmoid(mean + std * N(0, 1)), the SD3 paper's sampling that
      ai-toolkit and kohya offer as "sigmoid"; unweighted (the density already favours the
      middle of the schedule).

    Each sample's timestep and noise come from its own generator (`SampleRandom`).
    """

    def __init__(self, template: str = "FLUX.1", weighting: str = "diffsynth", guidance: float = 3.5,
                 shift: float | None = None, sampling: str = "diffsynth", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        if weighting not in ("diffsynth", "uniform"):
            raise UsageError(f"weighting must be 'diffsynth' or 'uniform', not {weighting!r}")
        if sampling not in TIMESTEP_SAMPLING:
            raise UsageError(f"timestep sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, not {sampling!r}")
        self.scheduler = FlowMatchScheduler(template)
        kwargs = {} if shift is None else {"shift": shift}
        self.scheduler.set_timesteps(1000, training=True, **kwargs)
        self.weighting, self.sampling = weighting, sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.guidance = guidance

    def sample(self, rng, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigma [b], timestep [b], loss weight [b]) for the batch's samples."""
        sched = self.scheduler
        if self.sampling == "logit-normal":
            u = rng.randn()
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * u)
            weight = torch.ones_like(sigma)
            timestep = sigma * sched.num_train_timesteps
        else:
            ids = rng.randint(len(sched.timesteps))
            sigma, timestep = sched.sigmas[ids], sched.timesteps[ids]
            weight = sched.linear_timesteps_weights[ids] if self.weighting == "diffsynth" else torch.ones(len(ids))
        return sigma.to(device, dtype), timestep.to(device, dtype), weight.float().to(device)

    def draw(self, rng, like: torch.Tensor):
        """(sigma, timestep, loss weight, noise) for the batch's samples, shaped like `like`.
        Drawn on CPU generators, so runs are identical on any device and resumable."""
        sigma, timestep, weight = self.sample(rng, like.device, like.dtype)
        noise = rng.randn(*like.shape[1:]).to(like.device, like.dtype)
        return sigma, timestep, weight, noise

    def errors(self, denoiser, latents: torch.Tensor, prompt_emb: torch.Tensor, pooled_prompt_emb: torch.Tensor,
               draw) -> torch.Tensor:
        """Per sample, the weighted flow-matching error ([b], fp32) under `draw` (`self.draw`'s)."""
        sigma, timestep, weight, noise = draw
        b = latents.shape[0]
        s = sigma.view(b, *([1] * (latents.dim() - 1)))
        noisy = (1 - s) * latents + s * noise
        target = self.scheduler.training_target(latents, noise, timestep)
        guidance = torch.full((b,), self.guidance, device=latents.device, dtype=latents.dtype)
        pred = denoiser(noisy, timestep, prompt_emb, pooled_prompt_emb, guidance)
        per_sample = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
        return per_sample * weight

    def __call__(self, denoiser, latents: torch.Tensor, prompt_emb: torch.Tensor, pooled_prompt_emb: torch.Tensor,
                 rng) -> torch.Tensor:
        return self.errors(denoiser, latents, prompt_emb, pooled_prompt_emb, self.draw(rng, latents)).mean()


def paired_errors(objective: FlowMatchObjective, denoiser, batch: dict, draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the weighted flow-matching error of its original and of its enhanced image under
    the SAME timestep and noise (`draw`, one per pair; [b] each, fp32): what the two images share
    (prompt, layout, the noise draw) costs both the same, so their difference is the pair's own.
    One DiT call on the [2b] batch."""
    b = batch["original"].shape[0]
    err = objective.errors(denoiser, torch.cat([batch["original"], batch["enhanced"]]),
                           torch.cat([batch["prompt_emb"]] * 2), torch.cat([batch["pooled_prompt_emb"]] * 2),
                           tuple(torch.cat([t, t]) for t in draw))
    return err[:b], err[b:]


class FlowDPOObjective:
    """Diffusion-DPO (Wallace et al. 2023) for rectified flow: the enhanced image is preferred,
    the original rejected, both under the same timestep and noise; the reference is the model
    the LoRA trains on top of (the running base: `adapters_off` switches the LoRA off).

        loss = -log sigmoid(-beta * [(e_enh - e_orig)(model) - (e_enh - e_orig)(reference)])
               + sft_weight * e_enh(model)

    The LoRA is pushed to make the enhanced image easier to denoise than the original, relative
    to where the base stood; what a pair's two images share cancels exactly. Returns the loss
    and what the step log records: the model's paired gap (enhanced minus original error), the
    reference's, and the share of pairs ranked the right way (model gap below the reference's)."""

    def __init__(self, objective: FlowMatchObjective, beta: float, adapters_off, sft_weight: float = 0.0):
        if not beta > 0:
            raise UsageError(f"dpo beta must be positive, not {beta!r}")
        if not sft_weight >= 0:
            raise UsageError(f"dpo sft weight must be 0 or positive, not {sft_weight!r}")
        self.objective, self.beta, self.adapters_off, self.sft_weight = objective, beta, adapters_off, sft_weight

    def __call__(self, denoiser, batch: dict, rng) -> tuple[torch.Tensor, dict]:
        draw = self.objective.draw(rng, batch["original"])
        e_orig, e_enh = paired_errors(self.objective, denoiser, batch, draw)
        with torch.no_grad(), self.adapters_off():
            r_orig, r_enh = paired_errors(self.objective, denoiser, batch, draw)
        model_gap, ref_gap = e_enh - e_orig, r_enh - r_orig
        margin = model_gap - ref_gap
        loss = -torch.nn.functional.logsigmoid(-self.beta * margin).mean()
        if self.sft_weight:  # the preferred image's own error, held down (`dpo_sft_weight`)
            loss = loss + self.sft_weight * e_enh.mean()
        metrics = {"gap": float(model_gap.detach().mean()), "ref_gap": float(ref_gap.mean()),
                   "accuracy": float((margin.detach() < 0).float().mean())}
        return loss, metrics
