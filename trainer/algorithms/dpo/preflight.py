"""Diffusion-DPO's preflight check (trainer/preflight.py runs it before any model loads): the pairs, row by row."""

from __future__ import annotations


def problems(cfg, model_found: bool) -> list[str]:
    """Every problem of dpo.dataset, each "dpo.dataset: file row N: column: problem" (none to check online)."""
    from trainer import datacheck

    d = cfg.dpo
    if d.online:
        return []
    found = datacheck.pairs_problems(
        d.dataset, split=d.split, cache_dir=d.cache_dir, allow_outside=d.allow_outside_paths, limit=d.check_rows
    )
    return [f"dpo.dataset: {p}" for p in found]
