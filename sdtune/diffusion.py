"""The denoising objective, as pure functions of tensors (DDPM, Ho et al. 2020; v-prediction, Salimans & Ho 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_timesteps(batch_size: int, low: int, high: int, device: torch.device) -> torch.Tensor:
    """Timesteps drawn uniformly from `[low, high)`, one per example (kohya `min_timestep`/`max_timestep`)."""
    return torch.randint(low, high, (batch_size,), device=device, dtype=torch.long)


def sample_noise(latents: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, plus `offset` x a per-image, per-channel constant when `offset` > 0.

    The offset ("Diffusion with Offset Noise", Crosslabs 2023; kohya `noise_offset`) lets a model change an image's
    mean colour, which plain noise at SD's last timestep barely allows.
    """
    noise = torch.randn_like(latents)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    return noise


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (`epsilon`) or the velocity `v = sqrt(a)*eps - sqrt(1-a)*x0`.

    Raises:
        ValueError: A prediction type other than `epsilon` or `v_prediction`.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction).")


def denoising_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in float32 (the simple loss of Ho et al. 2020), optionally weighted per example."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=list(range(1, target.dim()))
    )
    return (per_example * weights.float()).mean()


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of each timestep."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas / (1 - alphas)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example loss weights of Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"): min(SNR, gamma) / SNR for epsilon prediction, min(SNR, gamma) / (SNR + 1) for v."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return clipped / ratio
