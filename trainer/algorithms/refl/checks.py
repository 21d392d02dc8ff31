"""ReFL's configuration check, run while trainer.config.Config validates."""

from __future__ import annotations


def check(cfg) -> None:
    sources = cfg.reward.sources()
    if len(sources) != 1:
        raise ValueError(f"reward.components: refl backpropagates one reward, got {len(sources)}")
    if not sources[0].url:
        from scorers.scorer import differentiable, scorer_target

        if not differentiable(scorer_target(sources[0].scorer)):
            raise ValueError(
                f"reward.scorer: {sources[0].scorer} has no differentiable path (score_tensor); "
                "refl takes aesthetic, clipscore, pickscore, hpsv2, imagereward, or a reward server's "
                "/v1/score_grad "
                "(--reward.url)"
            )
