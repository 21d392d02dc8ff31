"""Is a model or file there to load? Answered before anything loads, so that a run fails in a second with
every missing piece named, not after minutes of loading the others (or three times in a row)."""

from __future__ import annotations

import os
from pathlib import Path

HUB_TIMEOUT_S = 5.0


def problem(kind: str, ref: str | None, what: str = "", marker: str = "config.json") -> str | None:
    """Why ``ref`` cannot be loaded, or None when it can.

    ``kind`` "file": ``ref`` must be an existing file. ``kind`` "model": "tiny" (built offline), a local
    folder, a model id in the Hugging Face cache (``marker`` is a file every snapshot has), or one the hub
    answers for.
    """
    if ref is None:
        return f"required ({what})" if what else "required"
    if kind == "file":
        return None if Path(ref).is_file() else f"{ref}: no such file"
    if ref == "tiny" or ref.startswith("tiny-") or Path(ref).is_dir():  # tiny models are built offline
        return None
    if Path(ref).exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        return f"{ref}: no such folder"
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(ref, marker), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return f"{ref}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(ref, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # offline, unknown id, gated: the hub's own words say which
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return (
            f"{ref}: not in the Hugging Face cache and the hub cannot provide it ({type(exc).__name__}: "
            f"{reason}); download it where there is network (huggingface-cli download {ref}) or give a local folder"
        )
    return None
