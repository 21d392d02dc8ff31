"""BERTScore (Zhang et al.): greedy matching of contextual token embeddings, no idf, no baseline rescale.

A short implementation on transformers rather than the bert-score package, so any local encoder loads
offline. Special tokens ([CLS], [SEP], ...) are left out of the matching, as bert-score does.
"""

from __future__ import annotations

import numpy as np

from scorers.devices import dtype_kwarg, half_on_gpu

# bert-score's default layer for encoders our users name; others use their last layer.
DEFAULT_LAYERS = {"microsoft/deberta-xlarge-mnli": 40, "roberta-large": 17, "bert-base-uncased": 9}


class BertScore:
    def __init__(self, checkpoint: str, layer: int | None = None):
        self.checkpoint = checkpoint
        self.layer = layer if layer is not None else DEFAULT_LAYERS.get(checkpoint)

    def load(self, device: str) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from scorers.tiny_models import resolve

        path = resolve(self.checkpoint, "bert")
        self.torch, self.device = torch, device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, **dtype_kwarg(half_on_gpu(device))).to(device).eval()
        if self.layer is None:
            self.layer = self.model.config.num_hidden_layers

    def embed(self, texts: list[str]):
        """Per-token L2-normalised embeddings (N, L, D) and a mask of the tokens that take part."""
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, return_tensors="pt", return_special_tokens_mask=True
        )
        special = tokens.pop("special_tokens_mask").bool()
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        with self.torch.inference_mode():
            hidden = self.model(**tokens, output_hidden_states=True).hidden_states[self.layer].float()
        mask = tokens["attention_mask"].bool() & ~special.to(self.device)
        return hidden / hidden.norm(dim=-1, keepdim=True), mask

    def __call__(self, candidates: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, F1), one each per candidate/reference pair."""
        cand, cand_mask = self.embed(candidates)
        ref, ref_mask = self.embed(references)
        sim = self.torch.bmm(cand, ref.transpose(1, 2))  # (N, Lc, Lr)
        sim = sim.masked_fill(~cand_mask[:, :, None] | ~ref_mask[:, None, :], -2.0)
        precision = _masked_mean(sim.max(dim=2).values, cand_mask)
        recall = _masked_mean(sim.max(dim=1).values, ref_mask)
        recall = self.torch.where(cand_mask.any(-1), recall, 0.0)  # an empty answer matches nothing
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        return (x.cpu().double().numpy() for x in (precision, recall, f1))


def _masked_mean(values, mask):
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
