"""Rewards behind one interface, in-process or on a reward server, always as futures.

Each sampled batch is submitted the moment it exists and sampling goes on; ``Pending.wait`` collects the
epoch's rewards under a deadline. A failed batch stops the run as soon as it is seen, not after the epoch.
"""

from __future__ import annotations

import concurrent.futures
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from reward_servers.scorer import ScoreOutput, create_scorer
from trainer.config import RewardConfig


class RewardError(RuntimeError):
    pass


class LocalReward:
    """A scorer in this process, run on one helper thread (it receives numpy only, never tensors)."""

    def __init__(self, name: str, device: str = "cpu", **options: Any):
        self.name = name
        self.scorer = create_scorer(name, **options)
        self.scorer.load(device)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}")

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> Future:
        return self._pool.submit(self.scorer.score, images, prompts, metadata)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RemoteReward:
    """A reward server (or several replicas of one) reached through ``protocol.RewardClient``."""

    def __init__(self, cfg: RewardConfig):
        from protocol import RewardClient

        self.name = f"reward server {', '.join(cfg.url)}"
        self.encoding = cfg.encoding
        self.client = RewardClient(cfg.url, timeout=cfg.timeout, retries=cfg.retries, token=cfg.token, deadline=cfg.deadline)

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> Future:
        result: Future = Future()

        def done(reply: Future) -> None:
            if reply.exception() is not None:
                result.set_exception(reply.exception())
            else:
                r = reply.result()
                result.set_result(ScoreOutput(np.asarray(r.scores, dtype=np.float64), r.info))

        self.client.submit(images, prompts, metadata, encoding=self.encoding).add_done_callback(done)
        return result

    def close(self) -> None:
        self.client.close()


def make_reward(cfg: RewardConfig, device: str = "cpu") -> LocalReward | RemoteReward:
    return RemoteReward(cfg) if cfg.url else LocalReward(cfg.scorer, device, **cfg.options)


class Pending:
    """The reward futures of one epoch, in sampling order."""

    def __init__(self, reward: LocalReward | RemoteReward):
        self.reward = reward
        self.futures: list[Future] = []

    def add(self, future: Future) -> None:
        self.futures.append(future)

    def raise_if_failed(self) -> None:
        for future in self.futures:
            if future.done() and future.exception() is not None:
                self._fail(future.exception())

    def wait(self, deadline: float) -> ScoreOutput:
        start = time.monotonic()
        _, not_done = concurrent.futures.wait(self.futures, timeout=deadline)
        if not_done:
            raise RewardError(
                f"reward scorer {self.reward.name}: {len(not_done)} of {len(self.futures)} batches unanswered "
                f"after {time.monotonic() - start:.0f} s (reward.deadline = {deadline})"
            )
        self.raise_if_failed()
        outputs = [f.result() for f in self.futures]
        info = {k: sum((o.info.get(k, [None] * len(o.scores)) for o in outputs), []) for k in outputs[0].info}
        return ScoreOutput(np.concatenate([o.scores for o in outputs]), info)

    def _fail(self, exc: BaseException) -> None:
        raise RewardError(f"reward scorer {self.reward.name} failed: {exc}") from exc
