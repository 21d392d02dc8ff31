"""Advantage normalisation: batch, group (Flow-GRPO) and per-prompt tracking (ddpo-pytorch), in numbers."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.advantages import PerPromptStatTracker, batch_normalize, compute_advantages, group_normalize


def test_batch_normalize():
    r = np.array([1.0, 2.0, 3.0, 6.0])
    assert batch_normalize(r) == pytest.approx((r - 3.0) / np.sqrt(3.5))


def test_group_normalize_within_groups_and_with_global_std():
    r = np.array([1.0, 3.0, 10.0, 14.0])
    groups = np.array([0, 0, 1, 1])
    assert group_normalize(r, groups) == pytest.approx([-1, 1, -1, 1], abs=1e-5)
    global_std = r.std()
    assert group_normalize(r, groups, global_std=True) == pytest.approx(
        [-1 / global_std, 1 / global_std, -2 / global_std, 2 / global_std], rel=1e-5
    )


def test_per_prompt_tracker_uses_its_buffer_once_full_and_keys_exact_strings():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.update(["a cat", "a cat", "A cat"], np.array([1.0, 3.0, 5.0]))
    batch = np.array([1.0, 3.0, 5.0])
    assert first == pytest.approx((batch - batch.mean()) / (batch.std() + 1e-6))  # buffers below min_count
    second = tracker.update(["a cat", "a cat"], np.array([5.0, 7.0]))  # "a cat" buffer: 1, 3, 5, 7
    buf = np.array([1.0, 3.0, 5.0, 7.0])
    assert second == pytest.approx((np.array([5.0, 7.0]) - buf.mean()) / (buf.std() + 1e-6))
    assert list(tracker.buffers) == ["a cat", "A cat"]  # case differs: different prompts
    third = tracker.update(["a cat"], np.array([9.0]))  # maxlen 4: 3, 5, 7, 9
    assert third == pytest.approx([(9.0 - 6.0) / (np.std([3, 5, 7, 9]) + 1e-6)])
    restored = PerPromptStatTracker(1, 1)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()


def test_compute_advantages_dispatch():
    r, prompts = np.array([1.0, 2.0, 3.0, 5.0]), ["a", "a", "b", "b"]
    assert compute_advantages(r, prompts) == pytest.approx(batch_normalize(r))
    assert compute_advantages(r, prompts, groups=np.array([0, 0, 1, 1])) == pytest.approx([-1, 1, -1, 1], abs=1e-5)


def anchor_tracker(prompts: list[str], rewards: np.ndarray, global_std: bool) -> np.ndarray:
    """flow_grpo's PerPromptStatTracker.update as DiffusionNFT and AWM call it (global_std=True, cleared every
    epoch), written from its published rule: each prompt string's mean over the epoch, std over all rewards
    (or that prompt's), plus 1e-4."""
    out = np.zeros_like(rewards)
    for prompt in set(prompts):
        mine = np.array([p == prompt for p in prompts])
        std = (rewards.std() if global_std else rewards[mine].std()) + 1e-4
        out[mine] = (rewards[mine] - rewards[mine].mean()) / std
    return out


@pytest.mark.parametrize("global_std", [True, False])
def test_group_by_prompt_pools_a_prompt_drawn_twice_as_the_anchors_do(global_std):
    from trainer.advantages import advantage_groups

    # Groups of 2; "a cat" drawn twice in the epoch (its two groups disagree), "a dog" once.
    prompts = ["a cat", "a cat", "a dog", "a dog", "a cat", "a cat"]
    rewards = np.array([0.1, 0.5, 0.2, 0.9, 0.7, 1.0])
    pooled = compute_advantages(rewards, prompts, None, advantage_groups(prompts, 2, "prompt"), global_std)
    np.testing.assert_allclose(pooled, anchor_tracker(prompts, rewards, global_std), rtol=2e-3)
    per_run = compute_advantages(rewards, prompts, None, advantage_groups(prompts, 2, "group"), global_std)
    assert np.abs(per_run - pooled).max() > 0.3  # each run of 2 alone: a different baseline for "a cat"
    assert advantage_groups(prompts, 1, "group") is None
