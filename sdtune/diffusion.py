"""The denoising objective, as pure functions of tensors (DDPM, Ho et al. 2020; v-prediction, Salimans & Ho 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Draws:
    """The objective's random draws for a batch (see `draw`)."""

    latent_noise: torch.Tensor  # [B, C, H, W] standard normal: latent = mean + std * latent_noise
    noise: torch.Tensor  # [B, C, H, W] the noise added to the latents
    timesteps: torch.Tensor  # [B] long
    prior_picks: list[int]  # one prior-preservation prompt index per example


def draw(
    seeds: list[int],
    shape: tuple[int, int, int],
    timestep_range: tuple[int, int],
    noise_offset: float = 0.0,
    prior_prompts: int = 0,
    device: torch.device | str = "cpu",
) -> Draws:
    """Draws each example's latent sample, noise, timestep and prior prompt from a generator seeded with its own
    seed (`data.example_seed`), so an example gets the same draws in any batch, process or accumulation window.

    Args:
        seeds: One seed per example.
        shape: (channels, height, width) of one latent.
        timestep_range: Timesteps are drawn uniformly from `[low, high)` (kohya `min_timestep`/`max_timestep`).
        noise_offset: Adds `noise_offset` x one Gaussian constant per image and channel ("Diffusion with Offset
            Noise", Crosslabs 2023; kohya `noise_offset`): it lets a model change an image's mean colour, which plain
            noise at SD's last timestep barely allows.
        prior_prompts: How many prior-preservation prompts there are to pick from (0: none).
        device: Where the tensors go (they are drawn on the CPU, so every device draws the same numbers).
    """
    latent_noise, noise, timesteps, picks = [], [], [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        latent_noise.append(torch.randn(shape, generator=generator))
        example_noise = torch.randn(shape, generator=generator)
        if noise_offset:
            example_noise = example_noise + noise_offset * torch.randn(shape[0], 1, 1, generator=generator)
        noise.append(example_noise)
        timesteps.append(int(torch.randint(timestep_range[0], timestep_range[1], (), generator=generator)))
        picks.append(int(torch.randint(prior_prompts, (), generator=generator)) if prior_prompts else 0)
    return Draws(
        torch.stack(latent_noise).to(device),
        torch.stack(noise).to(device),
        torch.tensor(timesteps, dtype=torch.long, device=device),
        picks,
    )


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
