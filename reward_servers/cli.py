"""``reward-server``: host one scorer over HTTP with uvicorn."""

from __future__ import annotations

import ctypes
import logging
import sys

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from reward_servers.scorer import SCORERS


class ServerSettings(BaseSettings):
    """Serve a reward scorer over msgpack/HTTP (POST /v1/score)."""

    model_config = SettingsConfigDict(
        env_prefix="REWARD_SERVER_", cli_prog_name="reward-server", cli_kebab_case=True, cli_implicit_flags=True
    )

    model: str = Field(description=f"scorer to serve: {', '.join(sorted(SCORERS))}")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("cpu", description="torch device for the scorer's model")
    max_images: int = Field(256, gt=0, description="images per request")
    max_pixels: int = Field(1024 * 1024, gt=0, description="height x width per image")
    max_body_mb: float = Field(256.0, gt=0, description="request body size limit in MiB")
    log_level: str = Field("info")

    @field_validator("model")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(sorted(SCORERS))}")
        return name

    def cli_cmd(self) -> None:
        import uvicorn

        from protocol import Limits
        from reward_servers.app import create_app
        from reward_servers.scorer import create_scorer

        logging.basicConfig(level=self.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        keep_freed_memory()
        limits = Limits(self.max_images, self.max_pixels, int(self.max_body_mb * 1024 * 1024))
        app = create_app(create_scorer(self.model), limits, self.device)
        uvicorn.run(app, host=self.host, port=self.port, log_level=self.log_level)


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
    CliApp.run(ServerSettings, cli_args=argv)


if __name__ == "__main__":
    main()
