"""The ``reward`` settings group: one scorer in process or served (one URL per replica), or a weighted sum of
them, and how the trainer talks to reward servers. Part of ``trainer.config.Config``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_serializer, field_validator

from protocol.errors import MASK, has_credentials, redact_url
from trainer.config.group import _Group


class RewardSource(_Group):
    """One scorer: in-process by name, or a reward server (one URL per replica)."""

    url: list[str] = Field([], description="reward server URL(s); empty scores in-process")
    scorer: str = Field(
        "compression",
        description="in-process: a scorer name, or your own module:function / "
        "module:Class; with url: a label for the server's",
    )
    options: dict[str, str | int | float] = Field(
        {},
        description="in-process scorer options, e.g. --reward.options weights=/models/sac+logos+ava1-l14-linearMSE.pth",
    )

    @field_validator("url")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        return [_server_url(url) for url in urls]

    @field_serializer("url")
    def _masked(self, urls: list[str]) -> list[str]:
        # Every dump (config.json, tracker hparams, --print-config) shows a password masked, as the token is
        # kept out of them; requests use the attribute, which keeps the real URL.
        return [redact_url(url) for url in urls]

    @field_validator("scorer")
    @classmethod
    def _known(cls, scorer: str, info: ValidationInfo) -> str:
        from scorers.scorer import scorer_target

        if not info.data.get("url"):
            scorer_target(scorer)  # a built-in, an entry point or module:function; raises saying what is wrong
        return scorer

    @field_validator("options")
    @classmethod
    def _options(cls, options: dict, info: ValidationInfo) -> dict:
        from scorers.scorer import scorer_options

        scorer = info.data.get("scorer")
        if options and scorer and not info.data.get("url"):
            accepted = scorer_options(scorer)
            unknown = sorted(set(options) - accepted)
            if unknown:
                raise ValueError(
                    f"scorer {scorer!r} takes no option {', '.join(unknown)}"
                    + (f" (it takes {', '.join(sorted(accepted))})" if accepted else "")
                )
        return options


def _server_url(url: str) -> str:
    """A reward server's base URL, checked here so that a typo fails before any model loads (the client
    appends /v1/score, so a path or query would silently point elsewhere)."""
    from urllib.parse import urlsplit

    expected = "expected http(s)://host[:port] with no path, query or fragment"
    shown = redact_url(url)  # these messages are printed: never the password
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"{shown!r} is not a reward server URL ({exc}); {expected}") from None
    problem = (
        "the scheme must be http or https"
        if parts.scheme not in ("http", "https")
        else "no host"
        if not parts.hostname
        else "a path"
        if parts.path not in ("", "/")
        else "a query"
        if parts.query or url.rstrip("/").endswith("?")
        else "a fragment"
        if parts.fragment or "#" in url
        else "a space"
        if any(c.isspace() for c in url)
        else None
    )
    if problem:
        raise ValueError(f"{shown!r} is not a reward server URL ({problem}); {expected}")
    if MASK in (parts.username, parts.password):  # a config.json given back: the mask would be sent
        raise ValueError(
            f"the password (or token) of {shown!r} is masked, as config.json and --print-config write it; give "
            "the URL with its credential again (e.g. --reward.url on the command line)"
        )
    return url.rstrip("/")


class RewardComponent(RewardSource):
    """One term of a weighted sum of rewards."""

    name: str | None = Field(None, description="label in logs and metrics (default: the scorer name)")
    weight: float = 1.0
    normalize: bool = Field(False, description="standardise this reward over the epoch before weighting")


class RewardConfig(RewardSource):
    components: list[RewardComponent] = Field(
        [],
        description="several rewards, summed with weights (JSON list, or [[reward.components]] in TOML); "
        "when empty, the single scorer above",
    )
    overlap: Literal["none", "epoch", "next_epoch"] = Field(
        "epoch",
        description="none: score after all sampling (TRL); epoch: each batch as soon as it is sampled "
        "(ddpo-pytorch); next_epoch: also sample epoch k+1 while epoch k's rewards finish (samples one update old)",
    )
    # exclude: no dump (config.json, tracker hparams) carries the token, not even masked: a masked copy
    # given back as --config would be sent as the token. The environment supplies it again.
    token: SecretStr | None = Field(
        None,
        exclude=True,
        description="bearer token for the reward servers (or DIFFUSION_RL_REWARD__TOKEN); never written to config.json",
    )
    aggregation: Literal["sum", "gdpo"] = Field(
        "sum",
        description="sum: the weighted sum of the components (each standardised over the epoch when it says "
        "normalize); gdpo: each component standardised within its group first (Flow-Factory's gdpo, Pref-GRPO's "
        "--apply_gdpo; with train.group_std global the sum is re-standardised over the batch as theirs is)",
    )
    encoding: Literal["raw", "png", "jpeg"] = "raw"
    timeout: float = Field(120.0, gt=0, description="seconds per request attempt")
    deadline: float = Field(600.0, gt=0, description="seconds to wait for an epoch's rewards before failing")
    retries: int = Field(8, ge=0, description="attempts after the first, for connection errors, 429 and 503 only")
    probe_timeout: float = Field(
        15.0, gt=0, description="seconds to wait at start-up, before any model loads, for every reward server's /readyz"
    )

    @field_validator("token")
    @classmethod
    def _not_the_mask(cls, token: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if token is not None and token.get_secret_value() == MASK:
            raise ValueError(
                f"reward.token: {MASK!r} is the mask older runs wrote to config.json in place of the token, not a "
                "token; delete it from the file and give the token as DIFFUSION_RL_REWARD__TOKEN"
            )
        urls = [*info.data.get("url", []), *(u for c in info.data.get("components", []) for u in c.url)]
        with_credentials = [redact_url(url) for url in urls if has_credentials(url)]
        if token is not None and with_credentials:
            # One Authorization header per request: httpx would send the URL's as Basic auth, not the token.
            raise ValueError(
                f"given together with URL credentials ({', '.join(with_credentials)}); a request carries one of "
                "them: give the token alone (the reward server checks it), or the credentials in the URL alone "
                "(for a proxy in front of it)"
            )
        return token

    @field_validator("components")
    @classmethod
    def _unique(cls, components: list[RewardComponent]) -> list[RewardComponent]:
        names = [c.name or c.scorer for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"component names must differ (got {names}); set name= on repeated scorers")
        return components

    @field_validator("aggregation")
    @classmethod
    def _one_normalisation(cls, aggregation: str, info: ValidationInfo) -> str:
        for i, c in enumerate(info.data.get("components") or []):
            if aggregation == "gdpo" and c.normalize:
                raise ValueError(
                    f"gdpo standardises every component within its group already: drop normalize from "
                    f"reward.components[{i}] ({c.name or c.scorer}) or use aggregation sum"
                )
        return aggregation

    def sources(self) -> list[RewardComponent]:
        """The components with names filled in; the single scorer as one component of weight 1."""
        parts = self.components or [RewardComponent(url=self.url, scorer=self.scorer, options=self.options)]
        return [c.model_copy(update={"name": c.name or c.scorer}) for c in parts]
