"""The denoising objective's noise: plain Gaussian, or with kohya's `noise_offset`."""

from __future__ import annotations

import pytest
import torch

from sdtune import diffusion
from sdtune.config import ConfigError, parse_config


def test_noise_offset_shifts_each_image_channel_by_a_constant():
    latents = torch.zeros(4000, 4, 8, 8)
    torch.manual_seed(0)
    plain = diffusion.sample_noise(latents)
    torch.manual_seed(0)
    offset = diffusion.sample_noise(latents, 0.5)
    # the same Gaussian draw, plus one constant per (image, channel) with standard deviation 0.5
    shift = offset - plain
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6, rtol=0)
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.5, rel=0.05)
    assert plain.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 8, rel=0.05)


def test_negative_noise_offset_is_refused(ti_config_dict):
    with pytest.raises(ConfigError, match="noise_offset"):
        parse_config({**ti_config_dict, "noise_offset": -0.1})


def test_timesteps_stay_in_the_configured_range():
    torch.manual_seed(0)
    timesteps = diffusion.sample_timesteps(20000, 100, 700, torch.device("cpu"))
    assert timesteps.min().item() == 100 and timesteps.max().item() == 699
    assert timesteps.float().mean().item() == pytest.approx(399.5, abs=5)


@pytest.mark.parametrize(("low", "high"), [(700, 700), (0, 1001), (800, 200)])
def test_an_empty_or_too_long_timestep_range_is_refused(ti_config_dict, low, high):
    with pytest.raises(ConfigError, match="min_timestep, max_timestep: need 0 <= min < max <= 1000"):
        parse_config({**ti_config_dict, "min_timestep": low, "max_timestep": high})
