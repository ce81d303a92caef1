"""The denoising objective's noise: plain Gaussian, or with kohya's `noise_offset`."""

from __future__ import annotations

import pytest
import torch

from sdtune import diffusion
from sdtune.config import ConfigError, parse_config


def test_noise_offset_shifts_each_image_channel_by_a_constant():
    seeds = list(range(4000))
    plain = diffusion.draw(seeds, (4, 8, 8), (0, 1000)).noise
    offset = diffusion.draw(seeds, (4, 8, 8), (0, 1000), noise_offset=0.5).noise
    # the same Gaussian draw, plus one constant per (image, channel) with standard deviation 0.5
    shift = offset - plain
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6, rtol=0)
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.5, rel=0.05)
    assert plain.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 8, rel=0.05)


def test_each_example_draws_the_same_in_any_batch():
    together = diffusion.draw([11, 22, 33], (4, 2, 2), (0, 1000), 0.1, prior_prompts=5)
    alone = diffusion.draw([22], (4, 2, 2), (0, 1000), 0.1, prior_prompts=5)
    torch.testing.assert_close(alone.noise[0], together.noise[1], rtol=0, atol=0)
    torch.testing.assert_close(alone.latent_noise[0], together.latent_noise[1], rtol=0, atol=0)
    assert alone.timesteps[0] == together.timesteps[1] and alone.prior_picks[0] == together.prior_picks[1]
    assert not torch.equal(together.noise[0], together.noise[1])  # different examples, different draws
    assert not torch.equal(together.noise[1], together.latent_noise[1])  # independent streams
    picks = diffusion.draw(list(range(500)), (1, 1, 1), (0, 10), prior_prompts=5).prior_picks
    assert set(picks) == {0, 1, 2, 3, 4}


def test_negative_noise_offset_is_refused(ti_config_dict):
    with pytest.raises(ConfigError, match="noise_offset"):
        parse_config({**ti_config_dict, "noise_offset": -0.1})


def test_timesteps_stay_in_the_configured_range():
    timesteps = diffusion.draw(list(range(20000)), (1, 1, 1), (100, 700)).timesteps
    assert timesteps.min().item() == 100 and timesteps.max().item() == 699
    assert timesteps.float().mean().item() == pytest.approx(399.5, abs=5)


@pytest.mark.parametrize(("low", "high"), [(700, 700), (0, 1001), (800, 200)])
def test_an_empty_or_too_long_timestep_range_is_refused(ti_config_dict, low, high):
    with pytest.raises(ConfigError, match="min_timestep, max_timestep: need 0 <= min < max <= 1000"):
        parse_config({**ti_config_dict, "min_timestep": low, "max_timestep": high})
