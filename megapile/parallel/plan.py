"""`megapile plan`: which parallel layouts fit a model on N GPUs, on paper, before renting them.

    megapile plan --model configs/neox-20b.yaml --gpus 96 --gpu-memory 40

Memory per GPU = model states + activations, in bytes, for bf16 mixed precision with Adam:
- Model states, 20 bytes per parameter held (DeepSpeed's own accounting): bf16 weights 2, bf16 grads 2,
  fp32 grads 4, fp32 master weights 4, Adam moments 8. ZeRO-1 shards the fp32 master weights and moments
  (12) over data parallel, ZeRO-2 also the gradients (18), ZeRO-3 everything (20) plus a gathered layer.
  A GPU holds 1/TP of each layer and the layers of its pipeline stage (the first stage also the input
  embedding, the last the output head).
- Activations per layer and micro-batch (Korthikanti et al. 2022, flash attention so no s×s scores):
  s·b·h·(10 + 24/TP) bytes for multi-head attention and a 4h GELU MLP. In general the split part is
  4 + 4·nkv/nh (Q and the output projection's input, K and V, 2 bytes each) + 4·f/h (GELU: its input and
  output) or 8·f/h (SwiGLU: gate, up, silu(gate) and their product); `activation_units`. With full
  activation checkpointing only the layer input, 2·s·b·h, plus one
  layer's working set during its recomputation. With a pipeline, the first stage keeps PP micro-batches
  in flight (1F1B). The last stage adds the fp32 logits of one micro-batch, s·b·V/TP × 4.
- Fits when total × 1.1 (allocator fragmentation) + 1.5 GB (CUDA context, NCCL buffers) ≤ GPU memory.
- Host memory for `checkpoint.async` (megapile/checkpoint/background.py), per node: each GPU's snapshot is the
  part of the fp32 masters and Adam moments it writes, 12 bytes per parameter element, 1/DP of what it holds
  whole (ZeRO shards them; ZeRO-0's replicas each write a 1/DP share), times the GPUs of a node.

Only layouts that training accepts are listed (in bf16): the same rule, `parallel.layout.layout_refusal`, decides
both (e.g. tensor parallelism takes ZeRO-1/2, a pipeline ZeRO-1 in bf16, both together ZeRO-1 only).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

from megapile.checkpoint.background import SNAPSHOT_BYTES_PER_ELEMENT
from megapile.config import ConfigError, ModelConfig, load_config
from megapile.parallel.layout import layout_refusal

GB = 1e9
_FRAGMENTATION, _CONTEXT_BYTES = 1.1, 1.5 * GB
PLANNED_DTYPE = "bf16"  # what the memory model assumes, and what train.dtype auto gives on A100/H100


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro: int
    checkpointing: bool


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    params_per_gpu: float
    states_bytes: float
    activation_bytes: float

    @property
    def total_bytes(self) -> float:
        return (self.states_bytes + self.activation_bytes) * _FRAGMENTATION + _CONTEXT_BYTES

    @property
    def snapshot_bytes(self) -> float:
        """Host memory one GPU's asynchronous-checkpoint snapshot takes (checkpoint.async)."""
        return SNAPSHOT_BYTES_PER_ELEMENT * self.params_per_gpu / self.layout.dp

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total_bytes <= gpu_memory_gb * GB


def layer_params(m: ModelConfig) -> int:
    """One transformer block: QKV + output projection + MLP, and two norms. QKV is h x (nh + 2 nkv) hs (3h^2
    without grouped-query attention); the MLP has two h x f matrices, three when gated (SwiGLU: gate, up,
    down); biases and norm biases as the family has them."""
    fam = m.family
    h, f = m.hidden_size, m.ffn_size
    qkv = h * m.qkv_size
    mlp = fam.mlp_matrices * h * f
    biases = (m.qkv_size if fam.qkv_bias else 0) + (h + (fam.mlp_matrices - 1) * f + h if fam.linear_bias else 0)
    norms = 2 * h * _norm_params(m)
    return qkv + h * h + mlp + biases + norms


def _norm_params(m: ModelConfig) -> int:
    """Parameters per hidden unit of a norm: LayerNorm's weight and bias, RMSNorm's weight."""
    return 2 if m.family.norm == "layernorm" else 1


def activation_units(m: ModelConfig, tp: int) -> float:
    """One layer's stored activations in units of s·b·h bytes (bf16, flash attention): 10 replicated on every
    tensor rank (the two norms' inputs, the QKV and MLP inputs, two dropout masks) + the part split over tp."""
    attention = 4 + 4 * m.kv_heads / m.num_heads  # Q and proj input; K and V, nkv of nh heads
    # f-wide tensors kept, 2 bytes each: fc_in's output and the activation's; gated: gate, up, act(gate), product
    mlp = 2 * (4 if m.family.mlp == "gated" else 2) * m.ffn_size / m.hidden_size
    return 10 + (attention + mlp) / tp


def total_params(m: ModelConfig) -> int:
    embed = m.padded_vocab_size * m.hidden_size
    head = 0 if m.tie_embeddings else embed
    positions = m.max_seq_len * m.hidden_size if m.family.positions == "learned" else 0
    final_norm = m.hidden_size * _norm_params(m)
    return m.num_layers * layer_params(m) + embed + head + positions + final_norm


def estimate(m: ModelConfig, layout: Layout, seq_len: int) -> Estimate:
    t, pp = layout.tp, layout.pp
    embed = m.padded_vocab_size * m.hidden_size
    layers_per_stage = -(-m.num_layers // pp)  # the fullest stage
    # The fullest GPU: first stage (embedding) or last stage (head); with one stage it holds both.
    edge = embed * (1 if pp > 1 or m.tie_embeddings else 2)
    params = (layers_per_stage * layer_params(m) + edge) / t
    shard = {0: 0, 1: 12, 2: 18, 3: 20}[layout.zero]
    states = params * (20 - shard) + params * shard / layout.dp
    if layout.zero == 3:
        states += 2 * 2 * layer_params(m) / t  # gathered bf16 weights of the layer in use and the next
    s, b, h = seq_len, layout.micro, m.hidden_size
    full = s * b * h * activation_units(m, t)  # one layer's stored activations, bf16
    in_flight = min(pp, 8) if pp > 1 else 1  # 1F1B: the first stage holds PP micro-batches
    if layout.checkpointing:
        acts = layers_per_stage * 2 * s * b * h * in_flight + full
    else:
        acts = layers_per_stage * full * in_flight
    acts += s * b * m.padded_vocab_size / t * 4  # fp32 logits of a micro-batch on the last stage
    return Estimate(layout, params, states, acts)


def candidates(m: ModelConfig, gpus: int, gpus_per_node: int, global_batch: int, micros: list[int]) -> list[Layout]:
    """Every layout training accepts for `m` on `gpus` GPUs (`layout_refusal`, the rule training applies), with
    tensor parallelism inside a node and micro-batches that divide the global batch."""
    out = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node:
            continue
        for pp in (1, 2, 4, 8, 16):
            for zero in (0, 1, 2, 3):
                if layout_refusal(m, gpus, tp, pp, zero, PLANNED_DTYPE) is not None:
                    continue
                dp = gpus // (tp * pp)
                for micro in micros:
                    if global_batch % (micro * dp) == 0:
                        out.extend(Layout(tp, pp, dp, zero, micro, ckpt) for ckpt in (False, True))
    return out


def deepspeed_estimate_gb(m: ModelConfig, layout: Layout) -> Optional[float]:
    """DeepSpeed's own model-state estimate, which covers data parallelism alone (TP = PP = 1, ZeRO-2/3)."""
    if layout.tp != 1 or layout.pp != 1 or layout.zero not in (2, 3):
        return None
    # lazy: deepspeed (with torch, ~2.5 s) only for these rows; `megapile plan` imports nothing heavy otherwise
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    # lazy: as the line above
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = total_params(m)
    if layout.zero == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=layout.dp, cpu_offload=False)
    else:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(n, layer_params(m), num_gpus_per_node=layout.dp,
                                                         cpu_offload=False, cpu_offload_params=False)
    return gpu / GB


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a run config (configs/*.yaml) whose model section to plan")
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs")
    parser.add_argument("--gpu-memory", type=float, required=True, help="GB per GPU (e.g. 40, 80)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallel stays within a node")
    parser.add_argument("--micro-batch", type=int, action="append", help="micro-batch sizes to try (default 1 2 4 8)")
    parser.add_argument("--all", action="store_true", help="also list layouts that do not fit")


def cli_main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.model)
        if cfg.model.vocab_size is None:
            raise ConfigError(f"{args.model}: model.vocab_size must be set to plan")
    except ConfigError as e:
        print(f"megapile: error: {e}", file=sys.stderr)
        return 1
    m, seq = cfg.model, cfg.train.seq_len
    rows = [estimate(m, lay, seq) for lay in
            candidates(m, args.gpus, args.gpus_per_node, cfg.train.global_batch_size, args.micro_batch or [1, 2, 4, 8])]
    rows.sort(key=lambda e: (not e.fits(args.gpu_memory), e.layout.tp * e.layout.pp, e.layout.checkpointing,
                             e.layout.zero, -e.layout.micro))
    print(f"{args.model}: {total_params(m) / 1e9:.2f}B parameters, seq {seq}, global batch "
          f"{cfg.train.global_batch_size}, {args.gpus} GPUs x {args.gpu_memory:g} GB")
    print(f"{'TP':>3} {'PP':>3} {'DP':>4} {'ZeRO':>4} {'micro':>5} {'act.ckpt':>8} {'params/GPU*':>11} "
          f"{'states GB':>9} {'activ. GB':>9} {'total GB':>8} {'fits':>4} {'DeepSpeed states GB':>19} "
          f"{'async host GB/node':>18}")
    shown = 0
    for e in rows:
        fits = e.fits(args.gpu_memory)
        if not fits and not args.all:
            continue
        lay, ds = e.layout, deepspeed_estimate_gb(m, e.layout)
        print(f"{lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.zero:>4} {lay.micro:>5} {'yes' if lay.checkpointing else 'no':>8} "
              f"{e.params_per_gpu / 1e9:>10.2f}B {e.states_bytes / GB:>9.1f} {e.activation_bytes / GB:>9.1f} "
              f"{e.total_bytes / GB:>8.1f} {'yes' if fits else 'no':>4} {'' if ds is None else f'{ds:.1f}':>19} "
              f"{e.snapshot_bytes * min(args.gpus_per_node, args.gpus) / GB:>18.1f}")
        shown += 1
    print("* parameters one GPU holds before ZeRO shards them (its pipeline stage's layers / TP)")
    if not shown:
        print("no layout fits: add GPUs, use larger ones, or offload (ds_configs/zero3_offload.json)")
    return 0
