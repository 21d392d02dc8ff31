"""Loading a model family and making its denoiser trainable (LoRA adapters or full), with mixed-precision
placement; saving what was trained."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from trainer.sharding import any_sharded

from trainer.config import Config
from trainer.families import text_encoders
from trainer.families.flux import Flux
from trainer.families.flux2 import Flux2
from trainer.families.qwenimage import QwenImage
from trainer.families.sd1 import SD1
from trainer.families.sd3 import SD3
from trainer.families.sdxl import SDXL
from trainer.families.wan import Wan
from trainer.families.zimage import ZImage

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FAMILIES = {
    family.pipeline_class: family for family in (SD1, SDXL, SD3, Flux, Flux2, QwenImage, ZImage, Wan)
}  # a diffusers pipeline class -> its family
TINY = {
    "tiny": "tiny_pipeline_path",
    "tiny-sdxl": "tiny_sdxl_path",
    "tiny-sd3": "tiny_sd3_path",
    "tiny-flux": "tiny_flux_path",
    "tiny-flux2": "tiny_flux2:tiny_flux2_path",
    "tiny-qwenimage": "tiny_qwenimage:tiny_qwenimage_path",
    "tiny-zimage": "tiny_zimage:tiny_zimage_path",
    "tiny-wan": "tiny_wan:tiny_wan_path",
}  # built offline: a function of trainer/families/tiny_pipeline.py, or "module:function" of another module there
# pretrained by trainer/tools/shapes_model.py (tiny-shapes-sd3: its --family sd3)
SHIPPED = {name: Path(__file__).parent.parent / "weights" / name for name in ("tiny-shapes", "tiny-shapes-sd3")}


def load_family(cfg: Config, device: torch.device):
    """The model family of ``pretrained.model`` (told by its pipeline class in model_index.json), loaded:
    frozen, on ``device``, in the mixed-precision dtype (a fully finetuned denoiser in fp32)."""
    from diffusers import DiffusionPipeline

    path = cfg.pretrained.model
    if path in TINY:
        from trainer.families import (  # by name: tests/test_layout.py sees them
            tiny_flux2,
            tiny_pipeline,
            tiny_qwenimage,
            tiny_wan,
            tiny_zimage,
        )

        module, _, build = TINY[path].rpartition(":")
        modules = {
            "tiny_pipeline": tiny_pipeline,
            "tiny_flux2": tiny_flux2,
            "tiny_qwenimage": tiny_qwenimage,
            "tiny_zimage": tiny_zimage,
            "tiny_wan": tiny_wan,
        }
        path = str(getattr(modules[module or "tiny_pipeline"], build)(cfg.pretrained.cache_dir))
    path = str(SHIPPED.get(path, path))
    kind = DiffusionPipeline.load_config(path, revision=cfg.pretrained.revision).get("_class_name")
    if kind not in FAMILIES:
        raise ValueError(f"pretrained.model: {path} is a {kind}; supported pipelines: {', '.join(FAMILIES)}")
    extra = {"sample": ("num_frames", "width", "guidance_scale_2"), "pretrained": ("train_experts",)}
    taken = getattr(FAMILIES[kind], "settings", ())  # the settings of a video or two-expert family, where it has some
    for name in (f"{g}.{k}" for g, keys in extra.items() for k in keys if getattr(getattr(cfg, g), k) is not None):
        if name not in taken:
            raise ValueError(f"{name}: a {kind} has no such setting (a video or two-expert family's)")
    dtype = DTYPES[cfg.run.mixed_precision]
    family = FAMILIES[kind].load(path, cfg, dtype)  # each family takes the settings it has
    offloaded = text_encoders(family.pipe) if cfg.run.offload_text_encoders else {}
    for module in family.frozen_modules():
        module.requires_grad_(False)
        if all(module is not encoder for encoder in offloaded.values()):
            module.to(device)
    if offloaded:
        from accelerate import cpu_offload

        for encoder in offloaded.values():  # weights kept on the CPU, each layer's moved to the device for its forward
            cpu_offload(encoder, execution_device=device)
    if not cfg.train.lora and dtype != torch.float32:
        family.denoiser.to(dtype=torch.float32)  # full finetuning keeps fp32 master weights; LoRA's base stays half
    return family


def family_of(pipe):
    """The family of an already loaded pipeline, by its class."""
    if type(pipe).__name__ not in FAMILIES:
        raise ValueError(f"a {type(pipe).__name__} is not a supported family; supported: {', '.join(FAMILIES)}")
    return FAMILIES[type(pipe).__name__](pipe)


def load_pipeline(cfg: Config, device: torch.device):
    """The diffusers pipeline alone (see ``load_family``)."""
    return load_family(cfg, device).pipe


def frozen_copy(denoiser, cfg: Config, reference: bool = False) -> torch.nn.Module | None:
    """Full finetuning with a KL to the base (train.kl_coef), NormGuard's hinge (train.norm_guard_coef), or an
    algorithm that compares with the base (``reference``: Diffusion-DPO): a frozen copy of the denoiser as
    loaded, in the frozen weights' dtype (sharded like the denoiser under run.sharding). LoRA needs none: its
    base is the same denoiser with the adapters off."""
    if cfg.train.lora or not (cfg.train.kl_coef or cfg.train.norm_guard_coef or reference):
        return None
    import copy

    return copy.deepcopy(denoiser).requires_grad_(False).to(DTYPES[cfg.run.mixed_precision]).eval()


def make_trainable(denoiser, cfg: Config) -> dict[str, torch.nn.Parameter]:
    """Adapters (or the whole denoiser) set to train; returns them by name (the names checkpoints use)."""
    if not cfg.train.lora:
        denoiser.requires_grad_(True)
        return dict(denoiser.named_parameters())
    from peft import LoraConfig

    denoiser.add_adapter(
        LoraConfig(
            r=cfg.train.lora_rank,
            lora_alpha=cfg.train.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=cfg.train.lora_targets,
        )
    )
    params = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
    for p in params.values():  # adapters train in fp32 whatever the base dtype
        p.data = p.data.float()
    return params


def load_tuned(family, lora: Path | None = None, denoiser: Path | None = None) -> None:
    """A run's saved weights into the family's pipeline: its ``lora/`` folder (the pipeline's own
    ``load_lora_weights``, or the family's ``load_lora`` where it has one: Wan2.2's experts, each from its file) or
    a fully finetuned denoiser folder (``unet/``, ``transformer/``); neither: as is."""
    if lora is not None:
        if hasattr(family, "load_lora"):
            family.load_lora(lora)
        else:
            family.pipe.load_lora_weights(lora)
    elif denoiser is not None:
        base = family.denoiser
        tuned = type(base).from_pretrained(denoiser).to(base.device, base.dtype)
        setattr(family.pipe, family.denoiser_name, tuned)


def save_weights(family, cfg: Config, output_dir: Path, gathered: dict[str, torch.Tensor] | None = None) -> Path:
    """LoRA in diffusers format (the family pipeline's ``load_lora_weights``) or a full denoiser folder.
    ``gathered``: a sharded denoiser's whole weights (trainer.sharding.gathered_state_dict), saved in their place."""
    denoiser, where = family.denoiser, output_dir / family.denoiser_name
    if not cfg.train.lora and gathered is None:
        denoiser.save_pretrained(where)
        return where
    if (
        not cfg.train.lora
    ):  # the layout save_pretrained writes (shards and an index past 10 GB), which from_pretrained reads
        from huggingface_hub import save_torch_state_dict

        denoiser.save_config(where)
        save_torch_state_dict(gathered, where, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        return where
    from peft.utils import get_peft_model_state_dict

    # peft-format keys on purpose: convert_state_dict_to_diffusers renames attention keys to the old
    # lora.down/up form but leaves conv keys alone, and load_lora_weights then drops the attention adapters.
    # contiguous: safetensors refuses the strided views channels-last conv weights are (run.channels_last)
    layers = {k: v.contiguous() for k, v in get_peft_model_state_dict(denoiser, state_dict=gathered).items()}
    family.save_lora(layers, output_dir / "lora")
    return output_dir / "lora"


@contextlib.contextmanager
def adapters_disabled(model):
    """The LoRA denoiser as the base model inside (the KL references: no second copy)."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


@contextlib.contextmanager
def weights_swapped(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]):
    """The trainable parameters hold ``tensors`` inside; restored after. DiffusionNFT's old policy and DPO's
    EMA reference run this way, without a second adapter or model. Whole parameters swap their storage (no
    copy); sharded ones (run.sharding) are copied into in place, since FSDP gathers from its own storage and
    would not see a swapped one."""
    if any_sharded(params):
        saved = {name: p.detach().clone() for name, p in params.items()}
        _copy_into(params, tensors)
        try:
            yield
        finally:
            _copy_into(params, saved)
        return
    saved = {name: p.data for name, p in params.items()}
    try:
        for name, p in params.items():
            p.data = tensors[name].to(p.dtype)
        yield
    finally:
        for name, p in params.items():
            p.data = saved[name]


@torch.no_grad()
def _copy_into(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(tensors[name])
