"""Errors a person can act on: every problem of a run found before any model loads, each in one line that
names the setting and the fix, exit status 2, no traceback (unless --debug)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.timeout(300)


def run_trainer(tmp_path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = [
        "--preset",
        "tiny",
        "--run.output_dir",
        str(tmp_path / "run"),
        "--pretrained.cache_dir",
        str(tmp_path / "cache"),
        "--run.log_with",
        "none",
        "--reward.probe_timeout",
        "1",
    ]
    return subprocess.run(
        [sys.executable, "-m", "trainer", *base, *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def assert_user_error(tmp_path, result, *messages: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    for message in messages:
        assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir()), "a model was built or loaded before the error"
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_misspelled_option_suggests_the_right_one(tmp_path):
    result = run_trainer(tmp_path, "--train.learnin_rate", "3e-4")
    assert_user_error(tmp_path, result, "--train.learnin_rate: no such option; did you mean --train.learning_rate?")


def test_a_bad_value_names_its_field(tmp_path):
    result = run_trainer(tmp_path, "--train.learning_rate", "-1")
    assert_user_error(tmp_path, result, "--train.learning_rate: Input should be greater than 0")


def test_a_gpu_preset_on_a_cpu_box_lists_every_problem_at_once(tmp_path):
    result = run_trainer(tmp_path, "--preset", "sd15-aesthetic-1gpu", env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(
        tmp_path,
        result,
        "run.mixed_precision: fp16 needs a GPU",
        "--pretrained.model runwayml/stable-diffusion-v1-5: not in the Hugging Face cache",
        "--reward.options checkpoint=...: openai/clip-vit-large-patch14: not in the Hugging Face cache",
        "--reward.options weights=...: required (the LAION MLP",  # the trainer's flag, not the server's --weights
    )


def test_missing_files_and_folders_are_named(tmp_path):
    result = run_trainer(
        tmp_path,
        "--pretrained.model",
        str(tmp_path / "nowhere"),
        "--reward.scorer",
        "aesthetic",
        "--reward.options",
        f"weights={tmp_path / 'mlp.pth'}",
        "--reward.options",
        "checkpoint=tiny",
        "--sample.batch_size",
        "6",
        "--train.batch_size",
        "4",
    )
    assert_user_error(
        tmp_path,
        result,
        f"--pretrained.model {tmp_path / 'nowhere'}: no such folder",
        "sample.batch_size (6) must be a multiple of train.batch_size (4)",
    )
    assert "weights" not in result.stderr  # the tiny CLIP brings its own MLP weights


def test_an_unreachable_scorer(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_trainer(tmp_path, "--reward.url", dead)
    assert_user_error(tmp_path, result, f"--reward.url {dead}: unreachable", "reward-server --model compression")


def test_a_token_that_is_missing_or_refused_and_a_scorer_that_is_not_the_one_named(tmp_path, start_server):
    server = start_server("--model", "synthetic", env={"REWARD_SERVER_TOKEN": "right-token"})
    result = run_trainer(tmp_path, "--reward.url", server.url)
    assert_user_error(
        tmp_path,
        result,
        f"--reward.url {server.url} serves 'synthetic', not 'compression': set --reward.scorer synthetic",
        "requires a bearer token: set DIFFUSION_RL_REWARD__TOKEN",
    )
    result = run_trainer(
        tmp_path,
        "--reward.url",
        server.url,
        "--reward.scorer",
        "synthetic",
        env={"DIFFUSION_RL_REWARD__TOKEN": "wrong-token"},
    )
    assert_user_error(tmp_path, result, f"--reward.url {server.url} refuses the token given")
    assert "wrong-token" not in result.stderr and "right-token" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_trainer(tmp_path, "--debug", "--pretrained.model", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" in result.stderr and "PreflightError" in result.stderr


CTRL_C_ARGS = ["--run.num_epochs", "4", "--run.save_freq", "0", "--run.log_with", "none", "--run.log_images_every", "0"]
CTRL_C_ARGS += ["--sample.num_steps", "12", "--sample.batch_size", "4", "--sample.num_batches_per_epoch", "2"]
CTRL_C_ARGS += ["--train.batch_size", "2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_cache):
    """The uninterrupted run both interruptions must end at."""
    out = tmp_path_factory.mktemp("ctrl_c") / "straight"
    command = [sys.executable, "-m", "trainer", "--preset", "tiny", "--run.output_dir", str(out)]
    done = subprocess.run(
        [*command, "--pretrained.cache_dir", str(tiny_cache), *CTRL_C_ARGS],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("when", ["sampling", "training"])
def test_ctrl_c_leaves_a_resumable_run_and_prints_the_resume_command(tmp_path, tiny_cache, straight, when):
    """SIGINT to a real trainer: it saves the last finished epoch (or finishes the epoch it is training),
    prints the command, and that command continues to the very weights of an uninterrupted run."""
    import codecs
    import re
    import signal
    import time

    from safetensors.torch import load_file

    args, env = [*CTRL_C_ARGS, "--pretrained.cache_dir", str(tiny_cache)], {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "stopped"
    # SIGINT's default disposition in the child whatever the test process inherited (an ignored SIGINT is
    # inherited by children, and Python then installs no KeyboardInterrupt handler).
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "--preset", "tiny", "--run.output_dir", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Whatever the pipe holds, at once: reading one character at a time (and joining them all every few ms)
    # fell so far behind a fast run that it had finished before the signal was sent.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    err: list[str] = []
    reader = threading.Thread(
        target=lambda: err.extend(
            decoder.decode(chunk) for chunk in iter(lambda: os.read(proc.stderr.fileno(), 1 << 16), b"")
        ),
        daemon=True,
    )
    reader.start()
    deadline = time.monotonic() + 240
    while f"epoch 2 {when}" not in "".join(err):  # tqdm names the phase the run is in
        assert proc.poll() is None and time.monotonic() < deadline, "".join(err)[-2000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=240) == 130, "".join(err)[-3000:]
    reader.join(timeout=10)
    stderr = "".join(err)
    assert "Traceback" not in stderr
    command = re.search(r"Resume with:\n  (python -m trainer .*)", stderr).group(1)
    assert command == f"python -m trainer --config {out / 'config.json'} --run.resume_from {out}"
    done = sorted(
        int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-")
    )
    # sampling: epoch 2's samples are dropped, epoch 2 (the last finished) is saved; training: epoch 3 finishes first
    assert done == ([2] if when == "sampling" else [3]), (done, stderr[-2000:])
    assert ("finishing this epoch's updates" in stderr) == (when == "training")
    resumed = subprocess.run(
        [sys.executable, *command.split()[1:]], capture_output=True, text=True, timeout=300, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    one = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    two = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert one.keys() == two.keys() and all((one[k] == two[k]).all() for k in one)


def test_a_scorer_failing_mid_run_is_one_message_and_status_2(tmp_path, tiny_cache, start_server):
    server = start_server("--model", "synthetic", "--fail-prompt", "a broken prompt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a broken prompt\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--preset",
            "tiny",
            "--run.output_dir",
            str(tmp_path / "run"),
            "--pretrained.cache_dir",
            str(tiny_cache),
            "--run.log_with",
            "none",
            "--reward.url",
            server.url,
            "--reward.scorer",
            "synthetic",
            "--prompt.fn",
            "from_file",
            "--prompt.path",
            str(prompts),
            "--sample.num_steps",
            "2",
            "--sample.batch_size",
            "2",
            "--train.batch_size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "500 scorer_error: scorer synthetic failed: ValueError: cannot score the prompt 'a broken prompt'"
        in result.stderr
    )
