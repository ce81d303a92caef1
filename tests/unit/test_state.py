"""Training states: complete-or-absent writes, retention, latest, and refusal of a state from other settings."""

from __future__ import annotations

import random

import pytest
import torch

from sdtune import state
from sdtune.state import Position, StateError


def _identity(run_id: str = "run-a", settings: dict | None = None) -> state.RunIdentity:
    return state.RunIdentity(run_id, settings or {"learning_rate": 0.1}, {})


def _parts():
    weight = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return {"unet": [weight]}, optimizer, schedule


def test_state_round_trip_restores_weights_optimizer_schedule_and_random_streams(tmp_path):
    trainables, optimizer, schedule = _parts()
    trainables["unet"][0].grad = torch.ones(3, 2)
    optimizer.step()
    schedule.step()
    identity = _identity()
    path = state.save_state(tmp_path, Position(7, 2, 1), trainables, optimizer, schedule, identity)
    expected = (torch.rand(3), random.random(), trainables["unet"][0].detach().clone())

    fresh, fresh_optimizer, fresh_schedule = _parts()
    position = state.load_state(path, fresh, fresh_optimizer, fresh_schedule, [identity.digest])
    assert position == Position(7, 2, 1)
    assert torch.equal(fresh["unet"][0], expected[2])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert fresh_schedule.last_epoch == 1 and fresh_optimizer.state_dict()["state"][0]["step"] == 1
    with pytest.raises(StateError, match="saved by a run with other training settings"):
        state.load_state(path, fresh, fresh_optimizer, fresh_schedule, [_identity(settings={"x": 1}).digest])


def test_retention_latest_and_incomplete_folders(tmp_path):
    trainables, optimizer, schedule = _parts()
    for step in (2, 4, 6):
        state.save_state(tmp_path, Position(step, 0, step), trainables, optimizer, schedule, _identity(), 2)
    (tmp_path / "state" / ".step-00000008.tmp123").mkdir()  # a save killed half-way: never "latest"
    (tmp_path / "state" / "step-00000009").mkdir()  # no state.json: incomplete
    assert [p.name for p in state.list_states(tmp_path)] == ["step-00000004", "step-00000006"]
    assert state.resolve("latest", tmp_path).name == "step-00000006"
    with pytest.raises(StateError, match="is not a saved state folder"):
        state.resolve(str(tmp_path / "state" / "step-00000009"), tmp_path)
    with pytest.raises(StateError, match="holds no saved state yet"):
        state.resolve("latest", tmp_path / "elsewhere")


def test_the_fp16_gradient_scaler_survives_a_resume(tmp_path):
    """fp16 training divides by a dynamic loss scale; resuming at the initial 65536 instead of the learnt value
    would skip steps (inf gradients) until it shrinks again. (The CPU scaler has the same state as CUDA's.)"""
    trainables, optimizer, schedule = _parts()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    loss = (trainables["unet"][0] ** 2).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()  # a finite step with growth_interval 1: the scale doubles
    assert scaler.get_scale() == 2048.0
    path = state.save_state(tmp_path, Position(1, 0, 1), trainables, optimizer, schedule, _identity(), scaler=scaler)
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    fresh = _parts()
    state.load_state(path, *fresh, [_identity().digest], scaler=fresh_scaler)
    assert fresh_scaler.get_scale() == 2048.0 and fresh_scaler.state_dict() == scaler.state_dict()
