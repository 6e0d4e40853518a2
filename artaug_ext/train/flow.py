"""The FLUX flow-matching objective, batched, on DiffSynth's scheduler and model function."""

from __future__ import annotations

import torch
from diffsynth.diffusion.flow_match import FlowMatchScheduler


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
    scheduler's `add_noise`), target n - x_0 (`training_target`), weight
    `linear_timesteps_weights` (or uniform).
    """

    def __init__(self, template: str = "FLUX.1", weighting: str = "diffsynth", guidance: float = 3.5,
                 shift: float | None = None):
        if weighting not in ("diffsynth", "uniform"):
            raise ValueError(f"weighting must be 'diffsynth' or 'uniform', not {weighting!r}")
        self.scheduler = FlowMatchScheduler(template)
        kwargs = {} if shift is None else {"shift": shift}
        self.scheduler.set_timesteps(1000, training=True, **kwargs)
        self.weighting = weighting
        self.guidance = guidance

    def __call__(self, denoiser, latents: torch.Tensor, prompt_emb: torch.Tensor, pooled_prompt_emb: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        b = latents.shape[0]
        sched = self.scheduler
        ids = torch.randint(0, len(sched.timesteps), (b,), generator=generator)
        # Drawn on the (CPU) generator, so runs are identical on any device and resumable.
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        sigma = sched.sigmas[ids].to(latents.device, latents.dtype).view(b, 1, 1, 1)
        timestep = sched.timesteps[ids].to(latents.device, latents.dtype)
        noisy = (1 - sigma) * latents + sigma * noise
        target = sched.training_target(latents, noise, timestep)
        guidance = torch.full((b,), self.guidance, device=latents.device, dtype=latents.dtype)
        pred = denoiser(noisy, timestep, prompt_emb, pooled_prompt_emb, guidance)
        per_sample = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
        if self.weighting == "diffsynth":
            per_sample = per_sample * sched.linear_timesteps_weights[ids].to(per_sample.device, per_sample.dtype)
        return per_sample.mean()
