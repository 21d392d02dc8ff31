"""Runs that survive preemption (issue 42), on real processes: SIGTERM checkpoints within run.stop_grace_s and
exits 143, on one process and on two under ``accelerate launch`` (where one signalled process stops them all),
and ``--run.resume_from auto`` then continues to the very weights of an uninterrupted run; a grace period that
runs out drops the epoch's updates and saves nothing; the step-counted loop stops after its step; and a run
folder that holds another run is refused before any model loads, while the same run resumed is not."""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import no_model_loads
from tests.test_distributed import command as two_processes
from trainer.config import Config
from trainer.interrupt import Stopped
from trainer.run_folder import RunFolderError, check_same_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GRACE = 25.0  # run.stop_grace_s's default
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--run.save_freq", "0", "--run.log_with", "none", "--run.log_images_every", "0", "--sample.num_steps", "12"]
SMALL += ["--sample.batch_size", "4", "--sample.num_batches_per_epoch", "2", "--train.batch_size", "2"]


def one_process(out: Path, cache: Path, *extra: str) -> list[str]:
    """``python -m trainer`` on the tiny preset, 4 epochs; the same command starts, and restarts, the run."""
    return [sys.executable, "-m", "trainer", "--preset", "tiny", "--run.output_dir", str(out)] + [
        "--pretrained.cache_dir",
        str(cache),
        "--run.num_epochs",
        "4",
        *SMALL,
        *extra,
    ]


class Watched:
    """A trainer whose output (stdout and stderr together) is read as it comes."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
        decoder, self.chunks = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
        read = iter(lambda: os.read(self.proc.stdout.fileno(), 1 << 16), b"")
        self.reader = threading.Thread(target=lambda: self.chunks.extend(decoder.decode(c) for c in read), daemon=True)
        self.reader.start()

    def text(self) -> str:
        return "".join(self.chunks)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():  # tqdm names the phase the run is in
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.005)

    def stopped_by(self, send: callable) -> tuple[int, float]:
        """Exit status, and seconds from ``send()`` (which signals) to the exit."""
        send()
        signalled = time.monotonic()
        status = self.proc.wait(timeout=120)
        self.reader.join(timeout=10)
        return status, time.monotonic() - signalled


@pytest.fixture
def watch():
    """Starts ``Watched`` trainers; whatever is still running when the test ends (it failed) is killed."""
    jobs = []
    yield lambda args: jobs.append(Watched(args)) or jobs[-1]
    for job in jobs:
        if job.proc.poll() is None:
            for child in psutil.Process(job.proc.pid).children(recursive=True):
                child.kill()
            job.proc.kill()
            job.proc.wait()


def ran(args: list[str]) -> str:
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=500, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


def checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))


def same_lora(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    one, two = (load_file(out / "lora" / "pytorch_lora_weights.safetensors") for out in (a, b))
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def epochs_logged(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_cache) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    ran(one_process(out, tiny_cache))
    return out


# -- one process -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["sampling", "training"])
def test_sigterm_checkpoints_within_the_grace_period_and_the_same_command_continues(
    straight, tmp_path, tiny_cache, watch, when
):
    """SIGTERM while sampling saves the last finished epoch at once; during the updates they finish and the
    epoch is saved. Exit 143; then the very command that started the run (--run.resume_from auto) continues it
    to the weights of the run that was never stopped."""
    out = tmp_path / "run"
    job = watch(one_process(out, tiny_cache, "--run.resume_from", "auto"))
    job.wait_for(f"epoch 2 {when}")
    status, took = job.stopped_by(lambda: job.proc.send_signal(signal.SIGTERM))
    log = job.text()
    assert status == 143 and took < GRACE, (status, took, log[-3000:])
    assert "Traceback" not in log
    assert checkpoints(out) == ([2] if when == "sampling" else [3]), log[-3000:]
    assert ("finishing this epoch's updates" in log) == (when == "training")
    assert f"checkpoint-{checkpoints(out)[0]} is the newest checkpoint" in log

    again = ran(one_process(out, tiny_cache, "--run.resume_from", "auto"))
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{checkpoints(out)[0]}'}" in again
    assert epochs_logged(out) == [0, 1, 2, 3]
    assert same_lora(straight, out)


def _tiny(out: Path, cache: Path, epochs: int, **run) -> Config:
    return Config(
        run={"output_dir": out, "num_epochs": epochs, "log_with": "none", "log_images_every": 0, **run},
        pretrained={"cache_dir": cache},
        sample={"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2},
        train={"batch_size": 2},
    )


def sigterm_at_backward(monkeypatch, call: int) -> list[int]:
    """SIGTERM to this process just before the trainer's ``call``-th backward pass (counted from 1)."""
    from trainer import run as run_setup

    original, calls = run_setup.backward_and_step, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN), "SIGTERM is not handled"
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(run_setup, "backward_and_step", counted)
    return calls


def test_a_grace_period_that_runs_out_drops_the_updates_and_the_newest_checkpoint_continues(
    tmp_path, tiny_cache, monkeypatch
):
    from trainer.algorithms.ddpo.loop import train

    train(_tiny(tmp_path / "straight", tiny_cache, 3))
    out = tmp_path / "run"
    calls = sigterm_at_backward(monkeypatch, 4 + 2)  # 4 optimizer steps an epoch: epoch 1's second
    with pytest.raises(Stopped, match="ran out before this epoch's updates finished"):
        train(_tiny(out, tiny_cache, 3, save_freq=1, stop_grace_s=0, resume_from="auto"))
    assert len(calls) == 6  # stopped at the step where it was signalled, the updates left unfinished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handler is gone with it
    assert checkpoints(out) == [1] and epochs_logged(out) == [0]
    monkeypatch.undo()
    assert [m["epoch"] for m in train(_tiny(out, tiny_cache, 3, save_freq=1, resume_from="auto"))] == [1, 2]
    assert same_lora(tmp_path / "straight", out)


def test_the_step_loop_finishes_its_step_saves_it_and_continues(tmp_path, tiny_cache, monkeypatch):
    """Diffusion-DPO, counted in optimizer steps (trainer/step_loop.py): SIGTERM in step 1's first of two
    accumulated batches; the step finishes, is saved (it was not due: checkpoints at the end only) and the run
    stops there, before the evaluation due next; it resumes from it to the weights of the run that was never
    stopped."""
    from tests.test_dpo import pick_a_pic_rows
    from trainer.algorithms.dpo.loop import train
    from trainer.pairs import write_parquet

    pairs = tmp_path / "pairs"
    write_parquet(pick_a_pic_rows(18), pairs / "train-0000.parquet")

    def dpo(out: Path, **run) -> Config:
        return Config(
            algorithm="dpo",
            run={"output_dir": out, "log_with": "none", **run},
            sample={"eval_num_steps": 2},
            prompt={"eval_count": 2},
            pretrained={"cache_dir": tiny_cache},
            train={"batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3},
            dpo={"dataset": str(pairs), "max_train_steps": 4, "checkpointing_steps": 0},
        )

    train(dpo(tmp_path / "straight"))
    out = tmp_path / "run"
    calls = sigterm_at_backward(monkeypatch, 3)
    with pytest.raises(Stopped):
        train(dpo(out, resume_from="auto", eval_every=1))
    assert len(calls) == 4 and checkpoints(out) == [2]
    assert [json.loads(line)["epoch"] for line in (out / "eval.jsonl").read_text().splitlines()] == [0, 1]
    monkeypatch.undo()
    assert [m["step"] for m in train(dpo(out, resume_from="auto"))] == [2, 3]
    assert same_lora(tmp_path / "straight", out)


# -- two processes -----------------------------------------------------------------------------------------------
def test_two_processes_stop_together_and_resume_auto_bit_identically(tmp_path, tiny_cache, watch):
    """Under accelerate launch: SIGTERM to one process only, while sampling, stops both before the same batch
    and both write the last finished epoch; SIGTERM to the launcher (which forwards it to both) during the
    updates lets both finish them and save. Each time the same command continues, to the weights of the run
    that was never stopped."""
    extra = ("--sample.num_steps", "12", "--run.save_freq", "0")  # (the last of a repeated flag wins)
    reference = tmp_path / "straight"
    ran(two_processes(reference, tiny_cache, 4, *extra))
    out = tmp_path / "run"
    args = two_processes(out, tiny_cache, 4, *extra, "--run.resume_from", "auto")

    job = watch(args)
    job.wait_for("epoch 1 sampling")
    rank_1 = next(p for p in psutil.Process(job.proc.pid).children(recursive=True) if p.environ().get("RANK") == "1")
    status, took = job.stopped_by(lambda: rank_1.send_signal(signal.SIGTERM))
    log = job.text()
    assert status != 0 and took < GRACE, (took, log[-3000:])  # the launcher reports the stop as a failure
    assert checkpoints(out) == [1] and {"rng-0.json", "rng-1.json"} <= {
        p.name for p in (out / "checkpoints/checkpoint-1").iterdir()
    }
    assert "SIGTERM: stopping; saving the last finished epoch" in log and "exitcode  : 143" in log, log[-3000:]

    job = watch(args)
    job.wait_for("epoch 2 training")
    status, took = job.stopped_by(lambda: job.proc.send_signal(signal.SIGTERM))
    log = job.text()
    assert "resumed from" in log and status != 0 and took < GRACE, (took, log[-3000:])
    assert "finishing this epoch's updates" in log and checkpoints(out) == [1, 3], log[-3000:]

    ran(args)
    assert epochs_logged(out) == [0, 1, 2, 3]
    assert same_lora(reference, out)


# -- a folder that holds another run -----------------------------------------------------------------------------
def test_a_folder_holding_another_run_is_refused_and_the_same_run_goes_on(tmp_path, tiny_cache):
    from trainer.algorithms.ddpo.loop import train

    out = tmp_path / "run"
    first = _tiny(out, tiny_cache, 1)
    train(first)
    written = (out / "config.json").read_text()

    shapes = Config(preset="shapes", run={"output_dir": out})
    with no_model_loads(), pytest.raises(RunFolderError) as refused:
        train(shapes)
    message = str(refused.value)
    assert f"run.output_dir {out} holds another run" in message and str(out / "config.json") in message
    assert (
        "preset 'tiny'" in message and "preset 'shapes'" in message and 'reward.scorer: "compression" there' in message
    )

    other = _tiny(out, tiny_cache, 2, resume_from="auto")
    other.train.learning_rate = 1e-3
    with no_model_loads(), pytest.raises(RunFolderError, match=r"train.learning_rate: 0.005 there, 0.001 here"):
        train(other)
    assert (out / "config.json").read_text() == written  # nothing written by the refused runs

    # The same run: longer, checkpointed and logged otherwise, waiting for rewards otherwise, resumed.
    again = _tiny(out, tiny_cache, 2, resume_from="auto", save_freq=1, log_with="tensorboard", log_images_every=1)
    again.reward.timeout, again.pretrained.cache_dir = 30.0, tiny_cache
    assert [m["epoch"] for m in train(again)] == [1]


def test_what_counts_as_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    base = Config(run={"output_dir": out}, reward={"components": [{"scorer": "compression", "url": ["http://a:8000"]}]})
    stored = json.loads(base.model_dump_json())

    def refusal(change) -> str | None:
        given = json.loads(json.dumps(stored))
        change(given)
        (out / "config.json").write_text(json.dumps(given))
        try:
            check_same_run(base)
        except RunFolderError as exc:
            return str(exc)
        return None

    allowed = {
        "another URL of a component": lambda c: c["reward"]["components"][0].update(url=["http://b:8000"]),
        "more epochs and checkpoints": lambda c: c["run"].update(num_epochs=99, save_freq=1, checkpoint_limit=2),
        "another place": lambda c: c["run"].update(output_dir="/elsewhere/run", resume_from="auto"),
        "sharded, compiled, other threads": lambda c: c["run"].update(
            sharding="fsdp", shard_text_encoders=True, compile="inductor", cpu_threads=3
        ),
        "written before a setting existed": lambda c: c["run"].pop("stop_grace_s"),
        "evaluated otherwise": lambda c: c["run"].update(eval_every=3, eval_scorer="aesthetic"),
    }
    for name, change in allowed.items():
        assert refusal(change) is None, name
    refused = {
        "another preset": (lambda c: c.update(preset="shapes"), 'preset: "shapes" there, "tiny" here'),
        "another seed": (lambda c: c["run"].update(seed=1), "run.seed: 1 there, 42 here"),
        "another precision": (lambda c: c["run"].update(mixed_precision="bf16"), "run.mixed_precision"),
        "another scorer": (
            lambda c: c["reward"]["components"][0].update(scorer="aesthetic"),
            'reward.components.0.scorer: "aesthetic" there, "compression" here',
        ),
        "one component more": (
            lambda c: c["reward"]["components"].append({**c["reward"]["components"][0], "name": "b"}),
            "reward.components (how many): 2 there, 1 here",
        ),
        "another algorithm's settings": (lambda c: c["ddpo"].update(clip_range=0.2), "ddpo.clip_range"),
    }
    for name, (change, said) in refused.items():
        message = refusal(change)
        assert message is not None and said in message, (name, message)
    (out / "config.json").write_text('{"preset": "tiny", "run": {')  # torn
    with pytest.raises(RunFolderError, match="cannot be read"):
        check_same_run(base)


def test_the_cli_refuses_another_run_naming_both_before_any_model_loads(tmp_path, tiny_cache):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(Config(preset="shapes", run={"output_dir": out}).model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "--preset", "tiny", "--run.output_dir", str(out), "--run.num_epochs", "1"]
        + ["--pretrained.cache_dir", str(tiny_cache)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "holds another run" in done.stderr and "preset 'shapes'" in done.stderr and "preset 'tiny'" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
