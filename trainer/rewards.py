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
from typing import Any

import numpy as np

from protocol import check_scores
from reward_servers.scorer import ScoreOutput, concat, create_scorer
from trainer.config import RewardComponent, RewardConfig


class RewardError(RuntimeError):
    pass


class LocalReward:
    """A scorer in this process, run on one helper thread (it receives numpy only, never tensors)."""

    def __init__(self, component: RewardComponent, device: str = "cpu"):
        self.name = component.name
        self.scorer = create_scorer(component.scorer, **component.options)
        self.scorer.load(device)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"reward-{self.name}")

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> Future:
        return self._pool.submit(self._score, images, prompts, metadata)

    def _score(self, images, prompts, metadata) -> ScoreOutput:
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

        self.name = f"{component.name} (reward server {', '.join(component.url)})"
        self.encoding = cfg.encoding
        self.client = RewardClient(
            component.url, timeout=cfg.timeout, retries=cfg.retries, deadline=cfg.deadline,
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

        self.client.submit(images, prompts, metadata, encoding=self.encoding).add_done_callback(done)
        return result

    def close(self) -> None:
        self.client.close()


class Rewards:
    """All reward components of a run."""

    def __init__(self, cfg: RewardConfig, device: str = "cpu"):
        self.components = cfg.sources()
        self.sources = {
            c.name: RemoteReward(c, cfg) if c.url else LocalReward(c, device) for c in self.components
        }

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Future]:
        return {name: source.submit(images, prompts, metadata) for name, source in self.sources.items()}

    def combine(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The weighted sum over components of the (optionally standardised) epoch-wide scores."""
        total = np.zeros_like(next(iter(scores.values())), dtype=np.float64)
        for c in self.components:
            r = scores[c.name]
            total += c.weight * ((r - r.mean()) / (r.std() + 1e-8) if c.normalize else r)
        return total

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


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
