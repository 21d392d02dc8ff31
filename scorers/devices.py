"""Device and dtype choices shared by the model-backed scorers."""

from __future__ import annotations

from typing import Any


def half_on_gpu(device: str):
    """fp16 on CUDA (the scorers' published checkpoints are used in fp16), fp32 elsewhere."""
    import torch

    return torch.float16 if device.startswith("cuda") else torch.float32


def dtype_kwarg(dtype) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
