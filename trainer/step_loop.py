"""The loop of the algorithms counted in optimizer steps (Diffusion-DPO, ReFL / DRaFT / AlignProp): evaluate
when due, one optimizer step (the algorithm's own), log, checkpoint, and the final evaluation and weights.
Its settings are the algorithm's group's ``max_train_steps``, ``checkpointing_steps`` and ``log_every``;
checkpoints are ``checkpoint-<steps done>``, and a resumed run starts at its checkpoint's step."""

from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from trainer import run as run_setup
from trainer.evaluate import evaluate_run

Stats = dict[str, list[torch.Tensor]]


def step_loop(
    run: run_setup.Run,
    trained: run_setup.Trained,
    settings,
    one_step: Callable[[int], Stats],
    shown: dict[str, str],
    desc: str,
    logged_with: Callable[[], dict] = dict,
) -> list[dict]:
    """``one_step(step)`` takes an optimizer step and returns its per-batch stats (averaged over batches and
    processes when logged); ``shown``: progress-bar label -> metric; ``logged_with()``: more metrics to log."""
    cfg, accelerator = run.cfg, run.accelerator
    step, total = run.start, settings.max_train_steps
    progress = tqdm(total=total, initial=step, desc=desc, disable=not accelerator.is_local_main_process)
    while step < total:
        if cfg.run.eval_every and step % cfg.run.eval_every == 0:
            evaluate_run(run, trained, step, unit="steps")
        run.interrupts.updating()
        start = time.perf_counter()
        stats = one_step(step)
        step += 1
        progress.update(1)
        if step % settings.log_every == 0 or step == total:
            metrics = {
                "step": step - 1,
                **{
                    k: float(accelerator.gather(torch.stack(v).float().mean().reshape(1).to(accelerator.device)).mean())
                    for k, v in stats.items()
                },
                "learning_rate": trained.optimizer.param_groups[0]["lr"],
                "seconds_step": time.perf_counter() - start,
                **logged_with(),
            }
            run_setup.log_epoch(run, metrics, {}, [])
            progress.set_postfix({label: f"{metrics.get(key, 0):.4f}" for label, key in shown.items()})
        run_setup.end_epoch(run, trained, step, {"global_step": step}, total=total, every=settings.checkpointing_steps)
    progress.close()
    if cfg.run.eval_every:
        evaluate_run(run, trained, step, unit="steps", final=True)
    return run_setup.finish(run, trained)
