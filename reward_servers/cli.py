"""``reward-server``: host one scorer over HTTP with uvicorn, one replica per GPU (or CPU replicas)."""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from protocol.errors import cli_message
from scorers.scorer import SCORERS, scorer_options, scorer_target

# CLI fields handed to the scorer's constructor when it takes them (and an error when it does not).
SCORER_OPTIONS = (
    "checkpoint",
    "processor",
    "weights",
    "mode",
    "bertscore_model",
    "bertscore_layer",
    "max_new_tokens",
    "latency_ms",
    "oom_above",
    "fail_prompt",
    "nan_prompt",
)


class ServerSettings(BaseSettings):
    """Serve a reward scorer over msgpack/HTTP (POST /v1/score). Every flag also reads REWARD_SERVER_<NAME>."""

    model_config = SettingsConfigDict(
        env_prefix="REWARD_SERVER_", cli_prog_name="reward-server", cli_kebab_case=True, cli_implicit_flags=True
    )

    model: str = Field(
        description=f"scorer to serve: {', '.join(sorted(SCORERS))}, one an installed package "
        "registers (entry point diffusion_rl.scorers), or module:Class / module:function"
    )
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, ge=0, le=65535)
    gpus: str | None = Field(None, description="comma-separated CUDA device ids, one replica each (e.g. 6,7)")
    replicas: int = Field(1, gt=0, description="CPU replicas when --gpus is not given")
    max_batch: int = Field(
        32, gt=0, description="images per model call, merged across requests (at most the scorer's own limit)"
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")
    max_queue: int = Field(4096, gt=0, description="images queued before requests get 503 + Retry-After")
    token: SecretStr | None = Field(None, description="bearer token required on /v1/score (or REWARD_SERVER_TOKEN)")
    max_images: int = Field(256, gt=0, description="images per request")
    max_pixels: int = Field(1024 * 1024, gt=0, description="height x width per image")
    max_body_mb: float = Field(256.0, gt=0, description="request body size limit in MiB")
    max_elements: int = Field(100_000, gt=0, description="msgpack values per request body (refused with 413 beyond)")
    max_decoded_mb: float = Field(
        2048.0, gt=0, description="MiB of decoded pixels held by all requests in flight; beyond it 503 + Retry-After"
    )
    max_videos: int = Field(64, gt=0, description="videos per request")
    max_frames: int = Field(256, gt=0, description="frames per video")
    max_video_mb: float = Field(
        2048.0, gt=0, description="MiB of decoded pixels of all the videos of one request (413 beyond)"
    )
    video_pooling: Literal["mean", "min", "none"] = Field(
        "mean",
        description="how an image scorer's frame scores become a video's score; none: refuse videos "
        "(a video scorer such as temporal scores whole videos whatever this says)",
    )
    body_timeout_s: float = Field(30.0, gt=0, description="seconds a request body may take to arrive (408 after)")
    drain_delay_s: float = Field(
        0.0, ge=0, description="on SIGTERM, answer /readyz 503 and keep serving this long before draining"
    )
    log_level: str = Field("info")
    # scorer options
    checkpoint: str | None = Field(None, description="model id or path of the scorer's network ('tiny': built offline)")
    processor: str | None = Field(
        None, description="clipscore/pickscore: processor id or path, if not the checkpoint's"
    )
    weights: str | None = Field(
        None,
        description="aesthetic: the LAION MLP weights (.pth or .safetensors); "
        "hpsv2: HPS_v2.1_compressed.pt; imagereward: ImageReward.pt",
    )
    mode: str | None = Field(
        None, description="llava: bertscore (default) or strict; vlm: pointwise (default), yesno or pairwise"
    )
    bertscore_model: str | None = Field(None, description="llava bertscore: encoder id or path")
    bertscore_layer: int | None = Field(None, description="llava bertscore: hidden layer to match (default: last)")
    max_new_tokens: int | None = Field(None, gt=0, description="llava: answer length limit; ocr: the reading's")
    latency_ms: float | None = Field(None, ge=0, description="synthetic: seconds of fake model time per batch, in ms")
    oom_above: int | None = Field(None, ge=0, description="synthetic: simulate out-of-memory above this batch size")
    options: dict[str, str | int | float] = Field(
        {},
        description="further constructor options of the scorer, for your own Scorer classes "
        "(e.g. --options threshold=0.5)",
    )
    fail_prompt: str | None = Field(None, description="synthetic: a batch holding this prompt raises (drills)")
    nan_prompt: str | None = Field(None, description="synthetic: an image with this prompt scores NaN (drills)")

    @field_validator("model")
    @classmethod
    def _known(cls, name: str) -> str:
        scorer_target(name)  # raises saying what is wrong
        return name

    @model_validator(mode="after")
    def _options_apply(self) -> "ServerSettings":
        accepted = scorer_options(self.model)
        for option in SCORER_OPTIONS:
            if getattr(self, option) is not None and option not in accepted:
                raise ValueError(f"--{option.replace('_', '-')} does not apply to scorer {self.model!r}")
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise ValueError(
                f"--options: scorer {self.model!r} takes no option {', '.join(unknown)}"
                + (f" (it takes {', '.join(sorted(accepted))})" if accepted else "")
            )
        return self

    def devices(self) -> list[str]:
        if self.gpus is None:
            return ["cpu"] * self.replicas
        ids = [part.strip() for part in self.gpus.split(",") if part.strip()]
        if not ids or not all(i.isdigit() for i in ids):
            raise SystemExit(f"reward-server: --gpus must be comma-separated device ids, got {self.gpus!r}")
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [i for i in ids if int(i) >= count]
        if missing:
            raise SystemExit(
                f"reward-server: --gpus {self.gpus}: GPU {', '.join(missing)} does not exist "
                f"(this process sees {count} CUDA device(s); CUDA_VISIBLE_DEVICES renumbers them)"
            )
        return [f"cuda:{i}" for i in ids]

    def serve(self) -> None:
        import uvicorn

        from protocol import Limits
        from reward_servers.app import create_app
        from reward_servers.service import ServingOptions
        from scorers.scorer import create_scorer

        logging.basicConfig(level=self.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        keep_freed_memory()
        options = ServingOptions(
            devices=self.devices(),
            max_batch=self.max_batch,
            max_wait_ms=self.max_wait_ms,
            max_queue=self.max_queue,
            max_decoded_bytes=int(self.max_decoded_mb * 1024 * 1024),
            body_timeout_s=self.body_timeout_s,
            drain_delay_s=self.drain_delay_s,
            token=self.token.get_secret_value() if self.token else None,
            limits=Limits(
                self.max_images,
                self.max_pixels,
                int(self.max_body_mb * 1024 * 1024),
                self.max_elements,
                max_videos=self.max_videos,
                max_frames=self.max_frames,
                max_video_bytes=int(self.max_video_mb * 1024 * 1024),
            ),
            video_pooling=None if self.video_pooling == "none" else self.video_pooling,
        )
        scorer_options = {
            **self.options,
            **{k: getattr(self, k) for k in SCORER_OPTIONS if getattr(self, k) is not None},
        }
        app = create_app(functools.partial(create_scorer, self.model, **scorer_options), options)
        uvicorn.run(app, host=self.host, port=self.port, log_level=self.log_level, timeout_graceful_shutdown=120)


def keep_freed_memory() -> None:
    """Let glibc keep freed request buffers for reuse instead of returning them to the OS.

    By default each multi-megabyte body is mmapped and unmapped per request, and the next request pays for
    faulting in fresh pages: measured as most of the server time for 32 images of 512 px (bench/protocol.py).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = CliApp.run(ServerSettings, cli_args=argv)
    except ValidationError as exc:
        raise SystemExit(f"reward-server: {cli_message(exc, kebab=True)}") from None
    settings.serve()


if __name__ == "__main__":
    main()
