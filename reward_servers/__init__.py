"""The HTTP service that hosts a scorer (``reward-server``); the scorers themselves live in ``scorers``."""

from scorers.scorer import SCORERS, ScoreOutput, Scorer, create_scorer

__all__ = ["SCORERS", "ScoreOutput", "Scorer", "create_scorer"]
