"""Everything a run needs, checked before any model loads; every problem reported at once, each with the
setting that fixes it in the trainer's own syntax.

Checked: the batch arithmetic, mixed precision against the device, the pretrained model (a local folder,
the Hugging Face cache or the hub), each in-process scorer's models and files (e.g. the LAION weights),
each reward server: that it answers /readyz, serves the scorer the config names, and accepts the token;
and what the algorithm checks itself (trainer/algorithms/<name>/preflight.py: DDPO the model's schedule,
DPO and ReFL their training data row by row).
"""

from __future__ import annotations

import logging
import time

from protocol.errors import RewardServerError, Unreachable, redact_url
from scorers.hub import problem
from trainer.config import Config, RewardComponent, RewardConfig
from trainer.plan import BatchPlan, BatchPlanError

log = logging.getLogger("trainer")


class PreflightError(ValueError):
    """The run cannot start; the message lists why, one line per problem."""


def check(cfg: Config, num_processes: int, device_type: str, components: list | None = None) -> BatchPlan | None:
    """Raise PreflightError naming every problem; returns the batch plan. ``components``: the run's reward
    components (trainer.rewards.run_components: with ``train(cfg, reward_fn=...)``'s functions, which need no
    check); default the configured ones."""
    from trainer.algorithms import algorithm_problems
    from trainer.rewards import run_components

    problems, plan = [], None
    try:
        plan = BatchPlan.of(cfg, num_processes)
    except BatchPlanError as exc:
        problems += [line.strip() for line in str(exc).splitlines()[1:]]
    if cfg.pretrained.train_experts == "both" and num_processes > 1 and cfg.run.sharding == "none":
        # DDP cannot: a step's forwards (CFG's two passes, each expert's rows) may leave one expert's adapters
        # without gradients, which DDP takes only with find_unused_parameters, and that allows one forward a step
        problems.append("pretrained.train_experts: both experts on several processes train sharded (run.sharding)")
    if cfg.run.mixed_precision == "fp16" and device_type == "cpu":  # half weights, no autocast there
        problems.append("run.mixed_precision: fp16 needs a GPU; on CPU use bf16 or no (--run.mixed_precision no)")
    found = problem("model", cfg.pretrained.model, "the diffusers pipeline", marker="model_index.json")
    if found:
        problems.append(f"--pretrained.model {found}")
    for i, (component, function) in enumerate(run_components(cfg.reward) if components is None else components):
        if function is not None:
            continue
        where = "reward" if not cfg.reward.components else f"reward.components[{i}]"
        if component.url:
            problems += _server_problems(component, cfg.reward, where)
        else:
            problems += _scorer_problems(component, where)
    problems += algorithm_problems(cfg, model_found=not found)  # e.g. DDPO's schedule, DPO's pairs
    if problems:
        raise PreflightError("this run cannot start:\n  " + "\n  ".join(problems))
    return plan


def local_file(cfg: Config, name: str):
    """``name`` inside the pretrained model's local folder or Hugging Face cache snapshot; None when neither
    holds it (the embedded tiny models, or a model not downloaded yet)."""
    from pathlib import Path

    ref = cfg.pretrained.model
    if Path(ref).is_dir():
        return Path(ref, name) if Path(ref, name).is_file() else None
    if ref.startswith("tiny"):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref, name, revision=cfg.pretrained.revision)
    return Path(found) if isinstance(found, str) else None


def _scorer_problems(component: RewardComponent, where: str) -> list[str]:
    from scorers.scorer import create_scorer

    try:
        scorer = create_scorer(component.scorer, **component.options)  # constructing loads nothing
    except (TypeError, ValueError) as exc:
        return [f"{where}.scorer {component.scorer}: {exc}"]
    flag = "--reward.options" if where == "reward" else f"{where}.options"
    found = [
        f"{flag} {option}=...: {found}"
        for option, (kind, ref, what) in scorer.requirements().items()
        if (found := problem(kind, ref, what))
    ]
    # what only asking outside can tell, e.g. a VLM judge's server and its model list (scorers/vlm.py)
    return found + [f"{flag} {option}=...: {p}" for option, p in scorer.problems().items()]


def _server_problems(component: RewardComponent, cfg: RewardConfig, where: str) -> list[str]:
    from protocol.client import info as server_info

    token = cfg.token.get_secret_value() if cfg.token else None
    ready, problems = probe(component.url, cfg.probe_timeout)
    if len(problems) == len(component.url):
        return [f"--{where}.url {redact_url(url)}: {p}" for url, p in problems.items()] + [
            f"  (start the server, e.g. reward-server --model {component.scorer}; fix --{where}.url; "
            f"or wait longer with --reward.probe_timeout, now {cfg.probe_timeout:g} s)"
        ]
    for url, p in problems.items():
        log.warning("reward server %s: %s; using the other replicas", redact_url(url), p)
    found = []
    for url in ready:
        shown = redact_url(url)  # for the messages; the request goes to the real one
        try:
            info = server_info(url, token, timeout=10)
        except Unreachable as exc:
            found.append(f"--{where}.url {shown}: /v1/info failed ({exc.reason})")
            continue
        except RewardServerError as exc:
            found.append(f"--{where}.url {shown}: /v1/info failed ({type(exc).__name__}: {exc})")
            continue
        if info.get("scorer") != component.scorer:
            found.append(
                f"--{where}.url {shown} serves {info.get('scorer')!r}, not {component.scorer!r}: set "
                f"--{where}.scorer {info.get('scorer')} (a remote scorer's name labels it) or point the URL at a "
                f"{component.scorer} server"
            )
        if info.get("auth") and token is None:
            found.append(
                f"--{where}.url {shown} requires a bearer token: set DIFFUSION_RL_REWARD__TOKEN (reward.token)"
            )
        elif info.get("authorized") is False:
            found.append(f"--{where}.url {shown} refuses the token given (DIFFUSION_RL_REWARD__TOKEN / reward.token)")
    return found


def probe(urls: list[str], timeout: float) -> tuple[list[str], dict[str, str]]:
    """Poll every URL's /readyz for up to ``timeout`` s; returns the ready ones and, for the others, why not."""
    from protocol.client import ready

    deadline, seen, waiting = time.monotonic() + timeout, {}, list(urls)
    while True:
        for url in list(waiting):
            try:
                ready(url, timeout=min(5.0, timeout))
                waiting.remove(url)
            except RewardServerError as exc:
                seen[url] = (
                    f"/readyz answered {exc.status} after {timeout:g} s (still loading the model, or shutting down)"
                )
            except Unreachable as exc:
                seen[url] = f"unreachable ({exc.reason})"
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    return [u for u in urls if u not in waiting], {u: seen[u] for u in waiting}
