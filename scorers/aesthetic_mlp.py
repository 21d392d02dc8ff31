"""The LAION improved aesthetic predictor's head: the network alone (the scorer is scorers/aesthetic.py),
so the tiny-model builders and the shapes CLIP's training build it without importing a scorer."""

from __future__ import annotations

from torch import nn


class AestheticMLP(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear layers with dropout and no activations; the published
    weights (sac+logos+ava1-l14-linearMSE.pth) have keys layers.0/2/4/6/7.weight and .bias."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)
