"""The rollout, the same for every model family: sampling with log-probabilities, and re-scoring stored steps.

A family (trainer/families/sd1.py, ...) supplies the prediction, and its dynamics (``family.dynamics``: DDIM or
flow matching) one stochastic step's mean and std and its anchor's log-prob of a step; this file draws from that
Gaussian and scores it. Sampling and training call the same ``family.predict``, ``family.dynamics.step`` and
``family.dynamics.log_prob``, so both see the same numbers and the importance ratio is exactly 1 before the first
update.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


def pick_steps(n: int, total: int, k: int, selection: str = "random", device=None, span: float = 0.9) -> torch.Tensor:
    """Each of ``n`` samples' ``k`` trained steps of ``total`` (n, k), as train.timestep_selection says: random,
    the first k of a permutation per sample (ddpo-pytorch, DiffusionNFT); first, steps 0..k-1 (Flow-GRPO);
    stratified, one step from each of k strata between step 1 and int(``span`` x total), so every sample
    covers early, middle and late steps and the pure-noise step 0 is never trained (AWM's ``discrete_wo_init``,
    scxue/advantage_weighted_matching train_sd3_awm.py: 14 steps at span 0.9 give [1], [2, 3], ..., [10, 11])."""
    if selection == "first":
        return torch.arange(k, device=device).repeat(n, 1)
    if selection == "stratified":
        edges = torch.linspace(1, int(total * span), k + 1, device=device).long()
        return edges[:-1] + (torch.rand(n, k, device=device) * (edges[1:] - edges[:-1])).long()
    return torch.stack([torch.randperm(total, device=device)[:k] for _ in range(n)])


def shared_steps(steps: torch.Tensor, shared: bool) -> torch.Tensor:
    """A training batch's (B, k) steps, or with train.timestep_shared its first sample's for all B (AWM draws
    one step per stratum for each training batch)."""
    return steps[:1].expand_as(steps) if shared else steps


@dataclass
class Trajectories:
    """A batch of sampled images with everything the update needs; tensors are (N, ...) on one device."""

    prompt_embeds: torch.Tensor | dict[str, torch.Tensor]  # the family's conditioning, each tensor (N, ...)
    # (N, T + 1, C, h, w): x before each stored step, then after the last; the x_t and x_{t-1} of stored step j
    # are path[:, j] and path[:, j + 1], so each latent is stored once (the stored steps are consecutive).
    path: torch.Tensor
    log_probs: torch.Tensor  # (N, T)
    timesteps: torch.Tensor  # (N, T): the denoiser's timestep input at stored step j
    steps: (
        torch.Tensor
    )  # (N, T): the index of stored step j in the sampler's schedule (what family.dynamics.step needs)
    prompts: list[str] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)

    @property
    def latents(self) -> torch.Tensor:  # (N, T, C, h, w), a view: x_t fed to stored step j
        return self.path[:, :-1]

    @property
    def next_latents(self) -> torch.Tensor:  # (N, T, C, h, w), a view: x_{t-1} drawn at stored step j
        return self.path[:, 1:]

    def tensors(self) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("prompts", "metadata")}

    def shuffled(
        self, batch_size: int, num_timesteps: int, selection: str = "random", span: float = 0.9, shared: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Random sample order in chunks of ``batch_size``, each sample with its own ``num_timesteps`` stored
        steps as train.timestep_selection picks them (trained_steps.pick_steps), as (rows, steps) index pairs
        for ``chunk``: nothing is copied until a chunk is taken."""
        n, total = self.log_probs.shape
        order = torch.randperm(n, device=self.log_probs.device)
        steps = pick_steps(n, total, num_timesteps, selection, self.log_probs.device, span)
        return [
            (order[i : i + batch_size], shared_steps(steps[i : i + batch_size], shared))
            for i in range(0, n, batch_size)
        ]

    def chunk(self, rows: torch.Tensor, steps: torch.Tensor) -> "Chunk":
        """The samples ``rows`` (B,), each at its stored steps ``steps`` (B, k), gathered for training."""
        r = rows[:, None]
        return Chunk(
            each_tensor(self.prompt_embeds, lambda t: t[rows]),
            self.path[r, steps],
            self.path[r, steps + 1],
            self.log_probs[r, steps],
            self.timesteps[r, steps],
            self.steps[r, steps],
        )

    @classmethod
    def cat(cls, parts: list["Trajectories"]) -> "Trajectories":
        def cat(values):
            if isinstance(values[0], dict):
                return {k: torch.cat([v[k] for v in values]) for k in values[0]}
            return torch.cat(values)

        tensors = {k: cat([p.tensors()[k] for p in parts]) for k in parts[0].tensors()}
        return cls(
            **tensors, prompts=sum((p.prompts for p in parts), []), metadata=sum((p.metadata for p in parts), [])
        )


@dataclass
class Chunk:
    """A training micro-batch: B samples, each at k of its stored steps (what ``rescore`` reads)."""

    prompt_embeds: torch.Tensor | dict[str, torch.Tensor]
    latents: torch.Tensor  # (B, k, C, h, w)
    next_latents: torch.Tensor  # (B, k, C, h, w)
    log_probs: torch.Tensor  # (B, k)
    timesteps: torch.Tensor  # (B, k)
    steps: torch.Tensor  # (B, k)


def each_tensor(value, fn):
    """``fn`` of a tensor, or of each tensor of a conditioning dict."""
    return {k: fn(v) for k, v in value.items()} if isinstance(value, dict) else fn(value)


@torch.no_grad()
def sample(
    family,
    model,
    prompts: list[str],
    metadata: list[dict[str, Any]],
    negative_embeds: torch.Tensor | dict[str, torch.Tensor] | None,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    resolution: int,
    generator: torch.Generator | None = None,
    window: range | None = None,
    noise: torch.Tensor | None = None,
    store: bool = True,
) -> tuple[Trajectories, torch.Tensor]:
    """Run the family's sampler from noise; return the trajectories and the final latents
    (``family.vae.to_uint8`` decodes them). ``negative_embeds`` None samples without guidance.

    ``window``: the step indices that are stochastic (``eta``) and stored; the others are deterministic
    (eta 0: DDIM / the ODE) and not stored, as Flow-GRPO-Fast and MixGRPO train on a window of SDE steps.
    None: every step. ``noise``: the initial latents (default: drawn from ``generator``). ``store`` False keeps
    no step: the trajectory holds the clean latents alone, (N, 1, ...) (DiffusionNFT and AWM need no more).
    """
    device = model.device  # the bare (unwrapped) denoiser samples
    cond = family.encode_prompts(prompts, resolution)
    timesteps = family.dynamics.timesteps(num_steps, device)
    window = range(num_steps) if window is None else window
    assert window.step == 1, "the stored steps must be consecutive (Trajectories.path)"
    x = family.initial_latents(len(prompts), resolution, generator, device) if noise is None else noise

    path, log_probs = [], []
    for i, t in enumerate(timesteps):
        output = family.predict(model, x, t, cond, negative_embeds, guidance_scale)
        mean, std = family.dynamics.step(output, i, x, eta if i in window else 0.0)
        if i not in window:
            x = mean
            continue
        x_next = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        if store:
            path += [x, x_next] if not path else [x_next]
            log_probs.append(family.dynamics.log_prob(x_next, mean, std))
        x = x_next
    window = window if store else range(0)

    n = len(prompts)
    trajectories = Trajectories(
        prompt_embeds=cond,
        path=torch.stack(path or [x], dim=1),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else x.new_zeros(n, 0),
        timesteps=timesteps[list(window)].repeat(n, 1),
        steps=torch.tensor(list(window), device=device, dtype=torch.long).repeat(n, 1),
        prompts=list(prompts),
        metadata=list(metadata),
    )
    return trajectories, x


def rescore(
    family,
    model,
    chunk: Trajectories | Chunk,
    steps: int | slice,
    negative_embeds: torch.Tensor | None,
    guidance_scale: float,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs under ``model`` of the stored steps ``steps`` of each trajectory in ``chunk``: (N,) for one
    step, (N, k) for a slice of k, which go through the denoiser as one batch of N x k (the UNet and the
    transformer take a timestep per sample). Also the steps' Gaussian means and stds, (N x k, ...) sample-major,
    for a KL to a reference policy."""
    one = isinstance(steps, int)
    steps = slice(steps, steps + 1) if one else steps
    n, k = chunk.latents.shape[0], len(range(*steps.indices(chunk.latents.shape[1])))

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t[:, steps].reshape(n * k, *t.shape[2:])

    latents = flat(chunk.latents)
    cond = chunk.prompt_embeds if k == 1 else each_tensor(chunk.prompt_embeds, lambda t: t.repeat_interleave(k, dim=0))
    output = family.predict(model, latents, flat(chunk.timesteps), cond, negative_embeds, guidance_scale)
    mean, std = family.dynamics.step(output, flat(chunk.steps), latents, eta)
    log_prob = family.dynamics.log_prob(flat(chunk.next_latents), mean, std).reshape(n, k)
    return (log_prob[:, 0] if one else log_prob), mean, std
