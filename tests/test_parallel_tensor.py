"""Tensor-parallel layers against their dense counterparts, forward and backward, on 2 gloo ranks.

megapile's AutoTP plan (megapile/parallel/tensor.py) is applied by `deepspeed.initialize` to a 1-block GPT;
every rank then runs the sharded qkv (column), proj (row), attention, MLP and whole block on the same input
and compares with the dense model built from the same seed: outputs and input gradients equal the dense
ones, and each weight/bias gradient equals the matching slice of the dense gradient. The attention dropout of a
split block, by AutoTP or by a pipeline stage (`pipeline.shard_block`, TP × PP), draws from a generator of each
tensor rank's own: peers start from the same process stream yet drop different probabilities in their own heads.

Run as a test (the harness starts this file on 2 ranks) or directly:
torchrun --nproc_per_node 2 tests/test_parallel_tensor.py
"""
import os
import sys

import pytest
from harness import run_ranks  # also when this file runs as the worker: its folder, tests/, is on sys.path

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["neox", "llama"])  # llama: 2 key/value heads (one per rank), SwiGLU, no biases
def test_tensor_parallel_layers_equal_dense(arch, tmp_path):
    proc = run_ranks("ranks", 2, [HERE], tmp_path / "logs", timeout=300, env={"MEGAPILE_TEST_ARCH": arch})
    for part in ("qkv column", "proj row", "attention", "mlp", "block", "autotp dropout", "stage dropout"):
        assert f"rank 0 {part}: ok" in proc.stdout and f"rank 1 {part}: ok" in proc.stdout, proc.stdout


def _worker() -> None:
    sys.path.insert(0, ROOT)
    import deepspeed
    import torch
    import torch.distributed as dist

    from megapile.config import ModelConfig
    from megapile.model import build_model, rotary_cos_sin
    from megapile.parallel.parallelize import prepare_tensor_parallel
    from megapile.parallel.tensor import autotp_section, shard_block

    deepspeed.init_distributed("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    arch = os.environ.get("MEGAPILE_TEST_ARCH", "neox")
    llama = dict(num_kv_heads=2, intermediate_size=96) if arch == "llama" else {}
    cfg = ModelConfig(arch=arch, num_layers=1, hidden_size=64, num_heads=4, vocab_size=256, max_seq_len=32, **llama)
    dense = build_model(cfg, seed=7).double()
    sharded = build_model(cfg, seed=7).double()
    ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
          "tensor_parallel": autotp_section(tp, cfg.family.tensor_plan)}
    mpu = prepare_tensor_parallel(sharded, tp)
    engine, *_ = deepspeed.initialize(model=sharded, config=ds, mpu=mpu)
    model = engine.module
    T = 8
    rope = rotary_cos_sin(cfg, T, torch.device("cpu"))
    rope = tuple(t.double() for t in rope)
    x_all = torch.randn(2, T, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    C = cfg.hidden_size

    def check(part, run_dense, run_sharded, x_dense, in_slice=slice(None), out_slice=slice(None), prefix=""):
        for m in (dense, model):
            m.zero_grad(set_to_none=True)
        xd = x_dense.clone().requires_grad_(True)
        xs = x_dense[..., in_slice].clone().requires_grad_(True)
        yd, ys = run_dense(xd), run_sharded(xs)
        torch.testing.assert_close(ys, yd[..., out_slice], rtol=1e-10, atol=1e-12)
        g = torch.randn(yd.shape, dtype=yd.dtype, generator=torch.Generator().manual_seed(1))
        yd.backward(g)
        ys.backward(g[..., out_slice])
        torch.testing.assert_close(xs.grad, xd.grad[..., in_slice], rtol=1e-10, atol=1e-12)  # all-reduced in backward
        dense_params = dict(dense.named_parameters())
        count = 0
        for name, p in model.named_parameters():
            if not name.startswith(prefix) or p.grad is None:
                continue
            full = dense_params[name].grad
            dim = cfg.family.tensor_plan.split_dim(name)
            if dim is not None:
                full = full.chunk(tp, dim=dim)[rank]
            assert p.shape == full.shape, (name, p.shape, full.shape)
            torch.testing.assert_close(p.grad, full, rtol=1e-10, atol=1e-12)
            count += 1
        assert count > 0, part
        print(f"rank {rank} {part}: ok ({count} gradients)", flush=True)

    block_d, block_s = dense.blocks["0"], model.blocks["0"]
    rows = cfg.qkv_size  # this rank's key/value groups of the fused qkv output: a contiguous slice
    cols = slice(rank * rows // tp, (rank + 1) * rows // tp)
    check("qkv column", block_d.attn.qkv, block_s.attn.qkv, x_all, out_slice=cols, prefix="blocks.0.attn.qkv")
    feats = slice(rank * C // tp, (rank + 1) * C // tp)  # row-parallel input: this rank's slice of the features
    check("proj row", block_d.attn.proj, block_s.attn.proj, x_all, in_slice=feats, prefix="blocks.0.attn.proj")
    check("attention", lambda x: block_d.attn(x, rope), lambda x: block_s.attn(x, rope), x_all,
          prefix="blocks.0.attn")
    check("mlp", block_d.mlp, block_s.mlp, x_all, prefix="blocks.0.mlp")
    check("block", lambda x: block_d(x, rope), lambda x: block_s(x, rope), x_all, prefix="blocks.0")

    def check_dropout(part, attn):
        """The generator the attention-probability dropout draws its mask from, sampled where the mask is made,
        after every rank seeded the process stream alike: a tensor peer's must differ."""
        draws, attend = [], attn._attend
        attn._attend = lambda *args: (draws.append(torch.rand(4).tolist()), attend(*args))[1]
        attn.dropout = 0.1
        torch.manual_seed(0)
        attn.train()(x_all, rope)
        peers = [None] * tp
        dist.all_gather_object(peers, draws, group=mpu.get_tensor_model_parallel_group())
        assert peers[0] != peers[1], (part, peers)
        print(f"rank {rank} {part}: ok", flush=True)

    check_dropout("autotp dropout", block_s.attn)
    stage_block = build_model(cfg, seed=7).double().blocks["0"]
    shard_block(stage_block, mpu.get_tensor_model_parallel_group(), cfg.family.tensor_plan)
    check_dropout("stage dropout", stage_block.attn)
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    from megapile.runtime.process_exit import exit_now

    _worker()
    exit_now(0)  # as megapile's entry points end: DeepSpeed/gloo may abort a finished process at C++ teardown
