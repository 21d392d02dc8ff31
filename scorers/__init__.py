"""Reward models and the shapes world: the scorers the trainer runs in process and ``reward-server`` hosts."""

from scorers.scorer import SCORERS, ScoreOutput, Scorer, create_scorer

__all__ = ["SCORERS", "ScoreOutput", "Scorer", "create_scorer"]
