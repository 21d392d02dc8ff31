"""Reading a scorer's weights file into a state dict (the aesthetic MLP's, HPS v2's, ImageReward's)."""

from __future__ import annotations


def load_state_dict(path: str):
    """A .safetensors file, or a torch checkpoint read with weights_only (no pickle code runs)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Checkpoints saved from a wrapper module carry a prefix; the layout is what matters.
    return {key.removeprefix("module.").removeprefix("model."): value for key, value in state.items()}
