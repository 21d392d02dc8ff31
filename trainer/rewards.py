"""Rewards behind one interface, in-process or on reward servers, always as futures.

Each sampled batch goes to every reward component the moment it exists, and sampling goes on;
``Pending.wait`` collects the epoch's rewards under one deadline. A failed batch stops the run as soon as
it is seen, not after the epoch. ``combine`` turns the components into one reward: a weighted sum, each
optionally standardised over the epoch first so that rewards of different scales weigh what their weights say.
"""

from __future__ import annotations

import concurrent.futures
import time
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from protocol import check_scores
from protocol.errors import redact_url
from scorers.scorer import FunctionScorer, ScoreOutput, Scorer, concat, create_scorer
from scorers.video import score_videos
from trainer.advantages import group_normalize
from trainer.config import RewardComponent, RewardConfig

RewardFn = Callable[..., Any]  # fn(images, prompts, metadata) -> (scores, info); see FunctionScorer


class RewardError(RuntimeError):
    pass


class LocalReward:
    """A scorer in this process, run on one helper thread (it receives numpy only, never tensors)."""

    def __init__(self, name: str, scorer: Scorer, device: str = "cpu"):
        self.name, self.scorer = name, scorer
        self.scorer.load(device)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"reward-{self.name}")

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> Future:
        """``images``: uint8 (N, H, W, 3), or videos (N, F, H, W, 3) for one score per video."""
        return self._pool.submit(self._score, images, prompts, metadata)

    def _score(self, images, prompts, metadata) -> ScoreOutput:
        # videos (N, F, H, W, 3): one score per video, an image scorer's frame scores pooled by their mean
        if getattr(images, "ndim", None) == 5:
            output = score_videos(self.scorer, images, prompts, metadata, pooling="mean")
        else:
            output = self.scorer.score(images, prompts, metadata)
        # The same check a reward server makes: a NaN must not reach the advantages, nor a short info list
        # the logs, and every process must gather the same number of rewards.
        scores, info = check_scores(output.scores, output.info, len(prompts))
        return ScoreOutput(np.asarray(scores, dtype=np.float64), info)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RemoteReward:
    """A reward server (or several replicas of one) reached through ``protocol.RewardClient``."""

    def __init__(self, component: RewardComponent, cfg: RewardConfig):
        from protocol import RewardClient

        self.name = f"{component.name} (reward server {', '.join(redact_url(u) for u in component.url)})"
        self.encoding = cfg.encoding
        self.client = RewardClient(
            component.url,
            timeout=cfg.timeout,
            retries=cfg.retries,
            deadline=cfg.deadline,
            token=cfg.token.get_secret_value() if cfg.token else None,
        )

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> Future:
        result: Future = Future()

        def done(reply: Future) -> None:
            if reply.cancelled():
                result.set_exception(RewardError(f"reward scorer {self.name}: request cancelled"))
            elif reply.exception() is not None:
                result.set_exception(reply.exception())
            else:
                r = reply.result()
                result.set_result(ScoreOutput(np.asarray(r.scores, dtype=np.float64), r.info))

        # videos (N, F, H, W, 3): one score per video, the server pooling frame scores (its --video-pooling)
        if getattr(images, "ndim", None) == 5:
            self.client.submit_videos(images, prompts, metadata, encoding=self.encoding).add_done_callback(done)
        else:
            self.client.submit(images, prompts, metadata, encoding=self.encoding).add_done_callback(done)
        return result

    def close(self) -> None:
        self.client.close()


def remote_scores(client, images, prompts: list[str], encoding: str = "f32", gradient_dtype: str = "float32"):
    """Differentiable scores (N,) of float images (N, 3, H, W) in [0, 1] from a reward server's
    /v1/score_grad: the forward sends the pixels, the backward injects the gradients the server computed,
    so ``loss.backward()`` runs as if the reward model were here (it never is)."""
    import torch

    class RemoteScore(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pixels):
            array = pixels.detach().permute(0, 2, 3, 1).float().cpu().numpy()
            reply, gradients = client.submit_grad(array, prompts, None, encoding, gradient_dtype).result()
            ctx.save_for_backward(torch.from_numpy(gradients).permute(0, 3, 1, 2).to(pixels.device, pixels.dtype))
            return torch.tensor(reply.scores, device=pixels.device, dtype=torch.float32)

        @staticmethod
        def backward(ctx, grad_scores):
            (gradients,) = ctx.saved_tensors
            return grad_scores.to(gradients.dtype)[:, None, None, None] * gradients

    return RemoteScore.apply(images)


Component = tuple[RewardComponent, Scorer | None]  # a component and, for a Python function, its scorer


def run_components(cfg: RewardConfig, reward_fn: RewardFn | dict[str, RewardFn] | None = None) -> list[Component]:
    """The run's reward components once ``train``'s ``reward_fn`` joins them (one function, named after itself,
    or a dict of name -> function), each function made a scorer here, once.

    With no ``reward.components`` the functions replace the single configured scorer. Otherwise a function
    takes the place (and the weight and normalisation) of the component of its name, or joins with weight 1.
    """
    if reward_fn is None:
        functions = {}
    elif callable(reward_fn):
        name = getattr(reward_fn, "__name__", "reward_fn")
        functions = {"reward_fn" if name == "<lambda>" else name: reward_fn}
    elif isinstance(reward_fn, dict) and all(isinstance(k, str) and callable(v) for k, v in reward_fn.items()):
        functions = dict(reward_fn)
    else:
        raise TypeError(f"reward_fn must be a function or a dict of name -> function, got {type(reward_fn).__name__}")

    def component(name: str, like: RewardComponent | None = None) -> Component:
        # Constructed, not validated: the "scorer" of a function is the function, not a registered name.
        return RewardComponent.model_construct(
            name=name,
            scorer=name,
            url=[],
            options={},
            weight=like.weight if like else 1.0,
            normalize=like.normalize if like else False,
        ), FunctionScorer(functions[name], name)

    if not cfg.components and functions:
        return [component(name) for name in functions]
    configured = cfg.sources()
    by_name = {c.name: c for c in configured}
    replaced = [component(c.name, c) if c.name in functions else (c, None) for c in configured]
    return replaced + [component(name) for name in functions if name not in by_name]


class Rewards:
    """All reward components of a run: configured scorers (in process or served) and Python functions."""

    def __init__(self, cfg: RewardConfig, device: str = "cpu", components: list[Component] | None = None):
        components = run_components(cfg) if components is None else components
        self.components = [c for c, _ in components]
        self.aggregation = cfg.aggregation
        self.sources = {}
        for c, function in components:
            if function is not None:
                self.sources[c.name] = LocalReward(c.name, function, device)
            elif c.url:
                self.sources[c.name] = RemoteReward(c, cfg)
            else:
                self.sources[c.name] = LocalReward(c.name, create_scorer(c.scorer, **c.options), device)

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Future]:
        return {name: source.submit(images, prompts, metadata) for name, source in self.sources.items()}

    def normalized(self, scores: dict[str, np.ndarray], groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Each component as the weighted sum takes it: as scored, standardised over the epoch (``normalize``),
        or, with reward.aggregation gdpo, standardised within each group (the whole epoch when ``groups`` is
        None), so that a reward of large spread cannot drown the others (GDPO, as Flow-Factory and Pref-GRPO)."""
        out = {}
        for c in self.components:
            r = np.asarray(scores[c.name], dtype=np.float64)
            if self.aggregation == "gdpo":
                # GDPO's z-score within each group (the whole epoch without groups), epsilon 1e-8
                out[c.name] = group_normalize(
                    r, np.zeros(len(r), int) if groups is None else np.asarray(groups), eps=1e-8
                )
            else:
                out[c.name] = (r - r.mean()) / (r.std() + 1e-8) if c.normalize else r
        return out

    def combine(self, scores: dict[str, np.ndarray], groups: np.ndarray | None = None) -> np.ndarray:
        """The weighted sum over components of the (optionally standardised) scores."""
        parts = self.normalized(scores, groups)
        total = np.zeros_like(next(iter(parts.values())), dtype=np.float64)
        for c in self.components:
            total += c.weight * parts[c.name]
        return total

    def stats(self, scores: dict[str, np.ndarray], groups: np.ndarray | None, samples: list[dict]) -> dict[str, float]:
        """Metrics beside each component's raw mean and std: the statistics of what the sum took when it
        standardised the component, and the judge counts the scorers report per sample (COUNTED)."""
        out = {}
        parts = self.normalized(scores, groups)
        for c in self.components:
            if self.aggregation == "gdpo" or c.normalize:
                out[f"reward_{c.name}_normalized_mean"] = float(parts[c.name].mean())
                out[f"reward_{c.name}_normalized_std"] = float(parts[c.name].std())
        return out | counts(samples, [c.name for c in self.components])

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


# Per-sample counts a scorer's info may carry (scorers/vlm.py: re-asks, calls failed after their retries,
# samples dropped for want of a usable answer); summed into metrics.jsonl, and a dropped sample gets no advantage.
# Only numbers count: another scorer's info may use a name for something else (the shapes verifier's "failed"
# lists the claims an image fails).
COUNTED = ("reasked", "failed_calls", "dropped")


def _count(value) -> int | None:
    return int(value) if isinstance(value, (int, float, np.integer, np.floating)) else None


def counts(samples: list[dict], names: list[str]) -> dict[str, float]:
    """``reward_<component>_<count>`` summed over the gathered sample records (keys as tracking.sample_records
    writes them: bare with one component, ``<component>/<key>`` with several)."""
    out = {}
    for name in names:
        for key in COUNTED:
            field = key if len(names) == 1 else f"{name}/{key}"
            values = [_count(r.get(field)) for r in samples]
            if values and all(v is not None for v in values):
                out[f"reward_{name}_{key}"] = float(sum(values))
    return out


def dropped(samples: list[dict], names: list[str]) -> np.ndarray:
    """Which gathered samples some component dropped (its info says ``dropped`` 1): they get no advantage."""
    fields = ["dropped"] if len(names) == 1 else [f"{name}/dropped" for name in names]
    return np.array([any(_count(r.get(f)) == 1 for f in fields) for r in samples], dtype=bool)


def pair_scores(rewards: "Rewards", scored: dict[str, ScoreOutput], k: int = 2) -> np.ndarray:
    """The combined reward of images scored k by k (group i is images k i .. k i + k - 1), shaped (groups, k)."""
    return rewards.combine({name: out.scores for name, out in scored.items()}).reshape(-1, k)


def best_and_worst(scores: np.ndarray) -> np.ndarray:
    """(groups, k) scores -> (groups, 2) indices, in sampling order, of each group's best- and worst-scored
    image: the pair that carries the most preference signal of the group (with k = 2, the group itself). A
    group whose scores are all equal gives its first and last image, a tie."""
    best = scores.argmax(axis=1)
    worst = scores.shape[1] - 1 - scores[:, ::-1].argmin(axis=1)  # the last minimum: never the first maximum
    return np.sort(np.stack([best, worst], axis=1), axis=1)


class Pending:
    """The reward futures of one epoch, in sampling order, for every component."""

    def __init__(self, rewards: Rewards):
        self.rewards = rewards
        self.batches: list[dict[str, Future]] = []

    def add(self, futures: dict[str, Future]) -> None:
        self.batches.append(futures)

    def raise_if_failed(self) -> None:
        for futures in self.batches:
            for name, future in futures.items():
                if future.done() and future.exception() is not None:
                    source = self.rewards.sources[name].name
                    raise RewardError(f"reward scorer {source} failed: {future.exception()}") from future.exception()

    def wait(self, deadline: float) -> dict[str, ScoreOutput]:
        start = time.monotonic()
        everything = [f for futures in self.batches for f in futures.values()]
        _, not_done = concurrent.futures.wait(everything, timeout=deadline)
        if not_done:
            late = sorted({self.rewards.sources[n].name for fs in self.batches for n, f in fs.items() if f in not_done})
            raise RewardError(
                f"reward scorer {', '.join(late)}: {len(not_done)} batch(es) unanswered after "
                f"{time.monotonic() - start:.0f} s (reward.deadline = {deadline})"
            )
        self.raise_if_failed()
        return {name: concat([fs[name].result() for fs in self.batches]) for name in self.rewards.sources}
