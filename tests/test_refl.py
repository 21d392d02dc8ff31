"""ReFL / DRaFT / AlignProp: differentiable rewards in process and served (/v1/score_grad)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol import RewardClient, RewardServerError
from scorers import world
from scorers.scorer import create_scorer, score_grad

CAPTIONS = list(world.CAPTIONS["two_object"][:6])


@pytest.fixture(scope="module")
def renders():
    return np.stack([world.render(c, i) for i, c in enumerate(CAPTIONS)])


@pytest.mark.parametrize("name", ["aesthetic", "clipscore", "pickscore"])
def test_the_tensor_path_is_the_scoring_path(renders, name):
    """At the CLIP's own size the differentiable preprocessing is the processor's exactly; the gradient
    matches central finite differences of the scores."""
    scorer = create_scorer(name, checkpoint="tiny-shapes")
    scorer.load("cpu")
    pixels = torch.from_numpy(renders).permute(0, 3, 1, 2).double().div(255)
    expected = scorer.score(renders, CAPTIONS, [{}] * len(CAPTIONS)).scores
    scores = scorer.score_tensor(pixels.float(), CAPTIONS)
    np.testing.assert_allclose(scores.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    out = score_grad(scorer, renders / 255.0, CAPTIONS, [{}] * len(CAPTIONS))
    direction = torch.randn_like(pixels[:1]) * (pixels[:1] > 0.05) * (pixels[:1] < 0.95)  # away from the [0, 1] edges
    h = 1e-3
    plus = scorer.score_tensor((pixels[:1] + h * direction).float(), CAPTIONS[:1]).item()
    minus = scorer.score_tensor((pixels[:1] - h * direction).float(), CAPTIONS[:1]).item()
    analytic = float((torch.from_numpy(out.gradients[:1]).permute(0, 3, 1, 2).double() * direction).sum())
    assert analytic == pytest.approx((plus - minus) / (2 * h), rel=2e-2, abs=1e-4 * max(1.0, abs(analytic)))


@pytest.mark.slow
def test_remote_gradient_equals_the_local_one(start_server, renders):
    local = create_scorer("aesthetic", checkpoint="tiny-shapes")
    local.load("cpu")
    images = renders / 255.0
    expected = score_grad(local, images, CAPTIONS, [{}] * len(CAPTIONS))
    server = start_server("--model", "aesthetic", "--checkpoint", "tiny-shapes")
    # Tolerances relative to each quantity's largest magnitude. float32 on the wire is the same computation:
    # measured 0 apart. float16 images and gradients: scores measured 2.9e-4 apart (4e-4 of their 0.71), gradients
    # 1.3e-4 (7e-4 of their 0.19; the median |gradient| is 3.7e-4); 1e-3 of scale fails a server sending zeros,
    # or gradients 1% off.
    with RewardClient(server.url) as client:
        for encoding, dtype, tolerance in (("f32", "float32", 1e-6), ("f16", "float16", 1e-3)):
            reply, gradients = client.submit_grad(images, CAPTIONS, None, encoding, dtype).result(timeout=60)
            np.testing.assert_allclose(
                reply.scores, expected.scores, rtol=0, atol=tolerance * np.abs(expected.scores).max()
            )
            np.testing.assert_allclose(
                gradients, expected.gradients, rtol=0, atol=tolerance * np.abs(expected.gradients).max()
            )
            assert reply.gradient_dtype == dtype and gradients.dtype == np.float32


@pytest.mark.slow
def test_score_grad_refusals(start_server, renders):
    import httpx

    from protocol import build_request, pack

    shapes = start_server("--model", "shapes")  # a verifier: no gradient
    with RewardClient(shapes.url, retries=3) as client:
        with pytest.raises(RewardServerError, match="501 not_differentiable"):
            client.submit_grad(renders / 255.0, CAPTIONS).result(timeout=30)
        assert client.submit(renders, CAPTIONS).result(timeout=30).scores  # still serving /v1/score
    aesthetic = start_server("--model", "aesthetic", "--checkpoint", "tiny-shapes")
    assert httpx.get(f"{aesthetic.url}/v1/info").json()["differentiable"] is True

    def post(path, body):
        return httpx.post(f"{aesthetic.url}{path}", content=body, headers={"content-type": "application/x-msgpack"})

    from protocol import unpack

    uint8 = build_request(renders, CAPTIONS, gradient_dtype="float32")
    reply = post("/v1/score_grad", uint8)
    assert reply.status_code == 422 and unpack(reply.content)["error"]["field"] == "images.0.encoding"
    floats = build_request(renders / 255.0, CAPTIONS, encoding="f32")
    assert post("/v1/score", floats).status_code == 422  # /v1/score takes uint8 images
    out_of_range = build_request(renders / 100.0, CAPTIONS, encoding="f32", gradient_dtype="float32")
    reply = post("/v1/score_grad", out_of_range)
    assert reply.status_code == 422 and "in [0, 1]" in unpack(reply.content)["error"]["message"]
    short = {
        "version": 1,
        "request_id": "x",
        "images": [{"height": 2, "width": 2, "channels": 3, "encoding": "f32", "data": b"\0" * 47}],
        "prompts": ["a"],
        "metadata": [{}],
    }
    assert post("/v1/score_grad", pack(short)).status_code == 422
    assert post("/v1/score_grad", pack({**short, "gradient_dtype": "float64"})).status_code == 422
    assert httpx.get(f"{aesthetic.url}/healthz").status_code == 200


# -- the loop -----------------------------------------------------------------------------------------


def refl_config(tmp_path, **refl):
    from trainer.config import Config

    return Config(
        algorithm="refl",
        run={"output_dir": tmp_path / "run", "log_with": "none"},
        pretrained={"model": "tiny-shapes"},
        prompt={"fn": "shapes"},
        reward={"scorer": "aesthetic", "options": {"checkpoint": "tiny-shapes"}},
        train={"batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "adam_weight_decay": 0.0},
        refl={"num_steps": 8, "mid_low": 4, "mid_high": 7, "max_train_steps": 2, **refl},
    )


def count_grad_calls(run_fn, family_model):
    calls = []
    handle = family_model.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    try:
        run_fn()
    finally:
        handle.remove()
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("mode,expected", [("refl", 1), ("draft", 3), ("alignprop", None)])
def test_truncated_backprop_touches_only_its_steps(tmp_path, mode, expected):
    from trainer import run as run_setup
    from trainer.algorithms.refl.loop import rollout

    cfg = refl_config(tmp_path, mode=mode, draft_k=3)
    with run_setup.started(cfg, 1) as run:
        trained = run_setup.load_model(run, 1)
        unet = trained.family.denoiser
        out = {}
        calls = count_grad_calls(
            lambda: out.update(zip(("x0", "n"), rollout(run, trained, ["a red circle"] * 2, 64, None))), unet
        )
    with_grad = sum(calls)
    assert with_grad == out["n"] and out["x0"].requires_grad
    if mode == "refl":  # the steps before mid without grad, mid with it, none after
        assert with_grad == 1 and calls[-1] and 5 <= len(calls) <= 8 and not any(calls[:-1])
    elif mode == "draft":
        assert calls == [False] * 5 + [True] * 3
    else:  # AlignProp: the last k of 8 steps, k drawn
        assert len(calls) == 8 and calls == sorted(calls) and with_grad >= 1


@pytest.mark.slow
def test_refl_moves_the_weights_and_a_zero_grad_scale_does_not(tmp_path):
    from safetensors.torch import load_file

    from trainer.algorithms.refl.loop import train

    history = train(refl_config(tmp_path / "a"))
    assert [m["step"] for m in history] == [0, 1] and all(m["denoiser_calls_with_grad"] == 1 for m in history)
    assert all(np.isfinite(m["reward_mean"]) and m["grad_norm"] > 0 for m in history)
    moved = load_file(tmp_path / "a" / "run" / "lora" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in moved.items() if "lora_B" in k or "lora.up" in k)
    train(refl_config(tmp_path / "b", grad_scale=0.0))  # no weight decay in refl_config: only the loss moves them
    still = load_file(tmp_path / "b" / "run" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(v.abs().max() == 0 for k, v in still.items() if "lora_B" in k or "lora.up" in k)


@pytest.mark.slow
def test_a_refl_step_with_the_reward_served_has_the_local_gradient(tmp_path, start_server):
    """The whole step's parameter gradient through the real server and client equals the in-process one."""
    from trainer import run as run_setup
    from trainer.algorithms.refl.loop import differentiable_reward, rollout

    server = start_server("--model", "aesthetic", "--checkpoint", "tiny-shapes")
    grads = {}
    for where in ("local", "remote"):
        cfg = refl_config(tmp_path / where)
        if where == "remote":
            cfg.reward.url, cfg.reward.options = [server.url], {}
        with run_setup.started(cfg, 1) as run:
            trained = run_setup.load_model(run, 1)
            torch.manual_seed(0)  # the same adapters in both (loading an in-process scorer draws from torch's stream)
            with torch.no_grad():
                for p in trained.trainable.values():
                    p.copy_(torch.randn_like(p) * 0.01)
            x0, _ = rollout(run, trained, ["a red circle left of a blue square"] * 2, 64, None)
            rewards = differentiable_reward(run)(
                trained.family.vae.decode(x0), ["a red circle left of a blue square"] * 2
            )
            torch.relu(2.0 - rewards).mean().backward()
            grads[where] = torch.cat([p.grad.flatten() for p in trained.trainable.values()])
    assert grads["local"].abs().max() > 0
    torch.testing.assert_close(
        grads["remote"], grads["local"], rtol=1e-4, atol=1e-6 * grads["local"].abs().max().item()
    )


def image_folder(folder, renders):
    """diffusers' text-to-image layout: images and a metadata.jsonl of file_name and text."""
    import json

    from PIL import Image

    folder.mkdir(parents=True)
    lines = []
    for i, (image, caption) in enumerate(zip(renders, CAPTIONS)):
        Image.fromarray(image).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow
def test_the_pretraining_step_alone_moves_the_weights(tmp_path, renders):
    """grad_scale 0 leaves the reward step without effect; the pre-training steps (one after every second
    reward step) train the denoising loss on the real images and move the adapters."""
    from safetensors.torch import load_file

    from trainer.algorithms.refl.loop import train

    data = image_folder(tmp_path / "real", renders)
    history = train(refl_config(tmp_path, grad_scale=0.0, max_train_steps=4, pretrain_data=str(data), pretrain_every=2))
    assert ["pretrain_loss" in m for m in history] == [False, True, False, True]
    assert all(0 < m["pretrain_loss"] < 10 and m["pretrain_grad_norm"] > 0 for m in history[1::2])
    moved = load_file(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in moved.items() if "lora_B" in k or "lora.up" in k)


def test_pretraining_data_is_checked_before_the_model_loads(tmp_path, renders):
    from trainer.pairs import PairsError, load_images

    data = image_folder(tmp_path / "real", renders)
    ds = load_images(str(data))
    assert len(ds) == len(CAPTIONS) and ds[0]["caption"] == CAPTIONS[0] and ds[0]["label_0"] == 1.0
    (data / "metadata.jsonl").write_text('{"file_name": "0.png", "prompt": "a red circle"}\n')
    with pytest.raises(PairsError, match=r"refl.pretrain_data: .* needs an image column .* caption column"):
        load_images(str(data))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairsError, match="refl.pretrain_data: .* neither"):
        load_images(str(tmp_path / "empty"))
    with pytest.raises(PairsError, match="refl.pretrain_data: .*missing: no such folder"):
        load_images(str(tmp_path / "missing"))


@pytest.mark.slow
@pytest.mark.parametrize("model,lora", [("tiny-sdxl", True), ("tiny-sd3", True), ("tiny-shapes", False)])
def test_refl_on_every_family_and_full_finetuning(tmp_path, model, lora):
    """A DRaFT-2 step through each family's sampler, predicted x0 and decoder moves its weights (LoRA), and
    full finetuning moves the denoiser itself."""
    from trainer import run as run_setup
    from trainer.algorithms.refl.loop import differentiable_reward, rollout

    cfg = refl_config(tmp_path, mode="draft", draft_k=2, max_train_steps=1)
    cfg.pretrained.model, cfg.train.lora = model, lora
    with run_setup.started(cfg, 1) as run:
        trained = run_setup.load_model(run, 1)
        before = {k: p.detach().clone() for k, p in trained.trainable.items()}
        stats: dict = {"grad_norm": []}
        resolution = trained.family.native_resolution()
        x0, calls = rollout(run, trained, ["a red circle"] * 2, resolution, None)
        rewards = differentiable_reward(run)(trained.family.vae.decode(x0), ["a red circle"] * 2)
        run_setup.backward_and_step(run, trained, torch.relu(100.0 - rewards).mean(), stats)
    assert calls == 2 and torch.isfinite(rewards).all() and float(stats["grad_norm"][0]) > 0
    moved = sum(float((p.detach() - before[k]).abs().max()) > 0 for k, p in trained.trainable.items())
    assert moved > 0 and (lora or len(trained.trainable) > 100)  # full finetuning trains every denoiser weight
