"""Named starting points: ``--preset NAME``; anything given on the command line or in ``--config`` wins.

``tiny`` is the built-in default (CPU, minutes). The ``sd15-*`` presets are ddpo-pytorch's published
8-GPU runs (github.com/kvablack/ddpo-pytorch, config/dgx.py); each ``-1gpu`` variant keeps the samples per
epoch and the effective train batch on one GPU: sampling batches x8, train batch 1, gradient accumulation
x(4 x 8) / 1.
"""

from __future__ import annotations

import copy
from typing import Any

# ddpo-pytorch's base config for SD1.5, as overrides of our tiny defaults.
_SD15 = {
    "run": {"num_epochs": 100, "save_freq": 20, "checkpoint_limit": 5, "mixed_precision": "fp16"},
    "pretrained": {"model": "runwayml/stable-diffusion-v1-5"},
    "sample": {"num_steps": 50, "eta": 1.0, "guidance_scale": 5.0, "batch_size": 8, "num_batches_per_epoch": 4},
    "train": {
        "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 3e-4, "clip_range": 1e-4,
        "adv_clip_max": 5.0, "timestep_fraction": 1.0, "max_grad_norm": 1.0, "num_inner_epochs": 1, "cfg": True,
        "lora_rank": 4, "lora_alpha": 4.0, "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"],
        "per_prompt_stat_tracking": True, "stat_buffer_size": 16, "stat_min_count": 16,
    },
    "prompt": {"fn": "imagenet_animals"},
}


def _with(base: dict, **groups: dict) -> dict:
    out = copy.deepcopy(base)
    for group, values in groups.items():
        out.setdefault(group, {}).update(values)
    return out


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "tiny-sdxl": {"run": {"output_dir": "outputs/tiny-sdxl"}, "pretrained": {"model": "tiny-sdxl"}},  # SDXL's shape, CPU
    "sd15-compressibility": _with(_SD15, reward={"scorer": "compression"}),
    "sd15-incompressibility": _with(_SD15, reward={"scorer": "incompressibility"}),
    "sd15-aesthetic": _with(
        _SD15, run={"num_epochs": 200}, prompt={"fn": "simple_animals"}, reward={"scorer": "aesthetic"},
        train={"stat_buffer_size": 32},
    ),
    # 6 training GPUs (2 more serve LLaVA): 6 x 12 x 4 = 288 samples, effective batch 4 x 6 x 6 = 144.
    "sd15-alignment": _with(
        _SD15, run={"num_epochs": 200}, prompt={"fn": "nouns_activities"}, reward={"scorer": "llava"},
        sample={"batch_size": 12, "num_batches_per_epoch": 4},
        train={"gradient_accumulation_steps": 6, "stat_buffer_size": 32},
    ),
}

_GPUS = {"sd15-compressibility": 8, "sd15-incompressibility": 8, "sd15-aesthetic": 8, "sd15-alignment": 6}
for _name, _gpus in _GPUS.items():
    _p = PRESETS[_name]
    PRESETS[f"{_name}-1gpu"] = _with(
        _p,
        sample={"num_batches_per_epoch": _p["sample"]["num_batches_per_epoch"] * _gpus},
        train={"batch_size": 1, "gradient_accumulation_steps": _p["train"]["batch_size"] * _gpus * _p["train"]["gradient_accumulation_steps"]},
    )


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts merged, ``override`` winning."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
