"""Diffusion-DPO's own command-line flags (github.com/SalesforceAIResearch/DiffusionDPO, train.py), translated
into this trainer's settings, so that its launchers run with only the script name changed:

    accelerate launch --mixed_precision="fp16" -m trainer.dpo --pretrained_model_name_or_path=$MODEL_NAME \\
      --dataset_name=$DATASET_NAME --train_batch_size=1 --gradient_accumulation_steps=1 --max_train_steps=2000 \\
      --lr_scheduler="constant_with_warmup" --lr_warmup_steps=500 --learning_rate=1e-8 --scale_lr \\
      --checkpointing_steps 500 --beta_dpo 5000 --output_dir="tmp-sd15"

Both ``--flag=value`` and ``--flag value`` are accepted; this trainer's own flags pass through unchanged.
"""

from __future__ import annotations

import os

# seed flag -> our flag (taking the same value)
VALUED = {
    "--pretrained_model_name_or_path": "--pretrained.model",
    "--revision": "--pretrained.revision",
    "--dataset_name": "--dpo.dataset",
    "--cache_dir": "--dpo.cache_dir",
    "--train_batch_size": "--train.batch_size",
    "--gradient_accumulation_steps": "--train.gradient_accumulation_steps",
    "--max_train_steps": "--dpo.max_train_steps",
    "--learning_rate": "--train.learning_rate",
    "--lr_scheduler": "--train.lr_scheduler",
    "--lr_warmup_steps": "--train.lr_warmup_steps",
    "--checkpointing_steps": "--dpo.checkpointing_steps",
    "--resolution": "--sample.resolution",
    "--dataloader_num_workers": "--dpo.dataloader_num_workers",
    "--seed": "--run.seed",
    "--output_dir": "--run.output_dir",
    "--beta_dpo": "--dpo.beta",
    "--max_grad_norm": "--train.max_grad_norm",
    "--adam_beta1": "--train.adam_beta1",
    "--adam_beta2": "--train.adam_beta2",
    "--adam_weight_decay": "--train.adam_weight_decay",
    "--adam_epsilon": "--train.adam_epsilon",
    "--mixed_precision": "--run.mixed_precision",
    "--report_to": "--run.log_with",
    "--proportion_empty_prompts": "--dpo.proportion_empty_prompts",
    "--resume_from_checkpoint": "--run.resume_from",
}
# seed switch -> our flags
SWITCHES = {
    "--scale_lr": ["--dpo.scale_lr"],
    "--use_adafactor": ["--train.use_adafactor"],
    "--gradient_checkpointing": ["--train.gradient_checkpointing"],
    "--random_crop": ["--dpo.random_crop"],
    "--no_hflip": ["--no-dpo.hflip"],
    "--sft": ["--dpo.sft"],
    "--sdxl": [],  # the family is read from the checkpoint's model_index.json
}
# the seed's --choice_model names -> our scorers (it relabels every pair as it trains)
CHOICE_MODELS = {"aes": "aesthetic", "aesthetic": "aesthetic", "clip": "clipscore", "pickscore": "pickscore"}


def translate(args: list[str]) -> list[str]:
    """``args`` with every Diffusion-DPO flag replaced by ours. Under ``accelerate launch --mixed_precision``
    (which the seed's launchers use) the run takes that precision unless the arguments set one."""
    out, i = [], 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in VALUED or flag == "--choice_model":
            if not eq:
                if i + 1 >= len(args):
                    raise SystemExit(f"python -m trainer.dpo: {flag} needs a value")
                i, value = i + 1, args[i + 1]
            if flag == "--choice_model":
                out += ["--dpo.relabel", "--reward.scorer", CHOICE_MODELS.get(value.lower(), value)]
            elif flag == "--report_to" and value == "all":
                out += [VALUED[flag], "tensorboard"]
            else:
                out += [VALUED[flag], value]
        elif flag in SWITCHES and not eq:
            out += SWITCHES[flag]
        else:
            out.append(args[i])
        i += 1
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched and "--run.mixed_precision" not in out and not any(a.startswith("--run.mixed_precision=") for a in out):
        out += ["--run.mixed_precision", launched]
    return out
