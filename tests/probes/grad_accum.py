"""How far bf16 gradients summed over 8 micro-batches land from one 8-sample micro-batch, per ZeRO stage and
train.grad_accum_dtype (a test probe, not product code). Prints `stage S ACCUM: DIFF OPTIMIZER` per case:
DIFF = |g_accum8 - g_micro8| / |g_micro8| over all parameters, read with DeepSpeed's safe_get_full_grad
after the last backward, before the step.

    python tests/probes/grad_accum.py 1,2,3 auto,bf16
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from megapile.config import Config  # noqa: E402
from megapile.model import build_model  # noqa: E402
from megapile.parallel.ds_config import resolve_ds_config  # noqa: E402
from megapile.parallel.layout import Layout  # noqa: E402
from megapile.parallel.parallelize import parallelize  # noqa: E402


def grads(stage: int, accum_dtype: str, micro: int, data: torch.Tensor):
    cfg = Config()
    cfg.model.vocab_size, cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads = 1024, 2, 64, 4
    cfg.model.max_seq_len, cfg.train.seq_len = 64, 32
    cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.grad_accum_dtype = 8, micro, accum_dtype
    ds = resolve_ds_config({"zero_optimization": {"stage": stage}}, cfg, 1, "bf16", "probe")
    model = build_model(cfg.model, seed=0)
    engine = parallelize(cfg, Layout(1, 1, 1, 1), model, ds).engine
    for j in range(8 // micro):
        x = data[j * micro:(j + 1) * micro]
        engine.backward(engine(x[:, :-1], targets=x[:, 1:]))
        if j < 8 // micro - 1:
            engine.step()  # a micro-step: no update before the accumulation boundary
    out = {n: safe_get_full_grad(p).double() for n, p in engine.module.named_parameters()}
    name = type(engine.optimizer).__name__
    engine.destroy()
    return out, name


def main() -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    deepspeed.init_distributed("gloo")
    data = torch.randint(0, 1024, (8, 33), generator=torch.Generator().manual_seed(0))
    for stage in map(int, sys.argv[1].split(",")):
        for accum_dtype in sys.argv[2].split(","):
            summed, name = grads(stage, accum_dtype, 1, data)
            whole, _ = grads(stage, accum_dtype, 8, data)
            diff = sum((summed[n] - whole[n]).pow(2).sum() for n in whole) ** 0.5
            size = sum(whole[n].pow(2).sum() for n in whole) ** 0.5
            print(f"stage {stage} {accum_dtype}: {float(diff / size):.4e} {name}", flush=True)


if __name__ == "__main__":
    main()
