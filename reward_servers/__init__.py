"""Reward scorers and the HTTP service that hosts them (``reward-server``)."""

from reward_servers.scorer import SCORERS, ScoreOutput, Scorer, create_scorer

__all__ = ["SCORERS", "ScoreOutput", "Scorer", "create_scorer"]
