"""ReFL's preflight check (trainer/preflight.py runs it before any model loads): refl.pretrain_data, row by row."""

from __future__ import annotations


def problems(cfg, model_found: bool) -> list[str]:
    from trainer import datacheck

    r = cfg.refl
    if not r.pretrain_data:
        return []
    found = datacheck.images_problems(
        r.pretrain_data, allow_outside=r.pretrain_allow_outside_paths, limit=r.pretrain_check_rows
    )
    return [f"refl.pretrain_data: {p}" for p in found]
