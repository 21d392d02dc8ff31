"""bench.shard_estimate: per-GPU memory and communication of a sharded step, checked against hand arithmetic;
its activations (stand-ins at full depth, linear in depth without checkpointing) against the full-depth step."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_estimate as ge
from bench import shard_estimate as se
from bench import shard_models as sm

FULL_1B = {"frozen": 0, "trained": 1e9, "unit": 1e8, "unit_trained": 1e8, "root": 1e7}


def test_a_1b_full_finetune_on_4_gpus_by_hand():
    """16 bytes a parameter (fp32 master 4, fp32 gradient 4, AdamW's two moments 8) over 4 GPUs is 4e9 bytes;
    gathered: the root and two 1e8-parameter units in bf16, plus one unit's gradients in bf16 and fp32."""
    row = se.per_gpu(FULL_1B, 4, "fsdp", activations=3e9, frozen=5e9, lora=False)
    assert row["sharded_weights"] + row["sharded_grads"] + row["sharded_optimizer"] == 4e9
    assert row["gathered"] == (1e7 + 2 * 1e8) * 2 + 1e8 * (2 + 4)
    assert row["accumulated_grads"] == 0
    assert row["total"] == 4e9 + 1.02e9 + 5e9 + 3e9
    # Each GPU sends 3/4 of the bf16 weights in the forward's all-gather and again in the backward's, and 3/4 of
    # the fp32 gradients in the reduce-scatter, which a full finetune runs every micro-batch.
    comm = se.communication(FULL_1B, 4, "fsdp", micro_batches=10, lora=False)
    assert comm["all_gather_per_micro_batch"] == 0.75 * 2e9 * 2
    assert comm["reduce_scatter_per_sync"] == 0.75 * 4e9
    assert comm["per_optimizer_step"] == 10 * (3e9 + 3e9)


def test_lora_shards_the_frozen_base_and_syncs_once():
    """LoRA on a 1e9-parameter base with 1e7 adapter parameters, on 8 GPUs: the base's bf16 weights and the
    adapters' 16 bytes are sharded; the deferred sync keeps every adapter gradient unsharded in fp32."""
    sizes = {"frozen": 1e9, "trained": 1e7, "unit": 1e8, "unit_trained": 1e6, "root": 1e7}
    row = se.per_gpu(sizes, 8, "fsdp", activations=0, frozen=0, lora=True)
    assert row["sharded_weights"] + row["sharded_grads"] + row["sharded_optimizer"] == (2e9 + 16e7) / 8
    assert row["accumulated_grads"] == 4e7
    comm = se.communication(sizes, 8, "fsdp", micro_batches=10, lora=True)
    assert comm["all_gather_per_micro_batch"] == 7 / 8 * 1.01e9 * 2 * 2  # the frozen base is gathered too
    assert comm["per_optimizer_step"] == 10 * comm["all_gather_per_micro_batch"] + 7 / 8 * 4e7


def test_memory_falls_with_gpus_and_hybrid_stops_at_a_node():
    totals = [se.per_gpu(FULL_1B, n, "fsdp", 0, 0, False)["total"] for n in se.GPU_COUNTS]
    assert all(a > b for a, b in zip(totals, totals[1:]))
    hybrid = {n: se.per_gpu(FULL_1B, n, "hybrid", 0, 0, False)["total"] for n in se.GPU_COUNTS}
    assert hybrid[8] == totals[se.GPU_COUNTS.index(8)] == hybrid[16] == hybrid[32]
    # Across 4 nodes hybrid all-reduces each GPU's fp32 gradient shard (4e9 / 8 bytes) among the 4 replicas.
    comm = se.communication(FULL_1B, 32, "hybrid", micro_batches=1, lora=False)
    assert comm["all_reduce_per_sync"] == 2 * 3 / 4 * 4e9 / 8
    assert comm["reduce_scatter_per_sync"] == 7 / 8 * 4e9


def test_fewest_gpus_by_hand():
    """(80 - 1.5) / 1.1 = 71.4 GB usable: 160 GB of state over n plus 10 GB fits from n = 3 (63.3 GB), not 2."""
    assert se.smallest(lambda n: 160e9 / n + 10e9) == 3
    assert se.smallest(lambda n: 75e9) is None


TINY_FLUX = {
    **ge.FLUX_DEV_TRANSFORMER,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 6, 6],
}


@pytest.mark.slow  # fake steps of a 5-block FLUX-shaped transformer (~15 s on 2 cores)
@pytest.mark.parametrize("lora", [True, False])
def test_activations_equal_the_full_depth_step(monkeypatch, lora):
    """The stand-ins (checkpointed) and the linear extrapolation in depth (not) give what the step on the real
    full-depth model keeps: byte for byte without checkpointing; with it, the stand-ins add their shared scalar
    gradient in backward, one 512-byte block here and nothing at full size, where the real blocks' recomputation
    sets the peak (FLUX.1-dev, SD3.5-M, Qwen-Image LoRA and SD3.5-L full at 512 px matched exactly)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layers = {"num_layers": 2, "num_single_layers": 3}
    checkpointed = (dict.fromkeys(layers, 1), {"transformer_blocks": {0: 1}, "single_transformer_blocks": {0: 2}})
    family = {**sm.FAMILIES["flux"], "config": TINY_FLUX, "layers": layers, "checkpointed": checkpointed}
    monkeypatch.setitem(sm.FAMILIES, "flux", family)
    torch.set_num_threads(1)
    sim = sm.Simulation(FakeTensorMode(allow_non_fake_inputs=True))
    step = sim.step("flux", sim.model("flux", layers, lora, sim.fake))
    for checkpointing in (True, False):
        full = [
            ge.run_step(step, "train", n, 128, sim.fake, checkpointing=checkpointing)["by_category"]["activations"]
            for n in (1, 2)
        ]
        estimated = sim.activations("flux", lora, 128, checkpointing)
        estimated = [estimated["batch1"], estimated["batch1"] + estimated["per_sample"]]
        if checkpointing:  # the stand-ins' shared scalar gradient, one 512-byte block at this size (0 at full size)
            assert all(0 <= e - f <= ge.BLOCK for e, f in zip(estimated, full)), (estimated, full)
        else:
            assert estimated == full
