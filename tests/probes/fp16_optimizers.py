"""Round trip of a ZeRO-0 bf16 optimizer state through megapile's reshard code, on DeepSpeed's real FP16
optimizers: the unfused one (what DeepSpeed picks on CPU) and the fused one (what it picks on GPU, with
FusedAdam). Built directly around a torch Adam in one gloo process, since no CPU engine builds the fused one.

For each: full fp32 weights and moments are applied with portable._apply_stage0_optimizer; then the fp32
masters and the inner Adam state must hold exactly those values, and the optimizer's own state_dict (what
DeepSpeed saves) must read back through portable._read_stage0 to the same values. Prints one line per optimizer.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer  # noqa: E402
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer  # noqa: E402

from megapile.checkpoint import portable  # noqa: E402
from megapile.config import ModelConfig  # noqa: E402
from megapile.model import build_model, param_groups  # noqa: E402


def main() -> None:
    deepspeed.init_distributed("gloo")
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_heads=2, vocab_size=64, max_seq_len=16)
    for wrapper in (FP16_UnfusedOptimizer, FP16_Optimizer):
        model = build_model(cfg, seed=0).to(torch.bfloat16)
        groups = param_groups(model, 0.1)  # two groups, so the fused masters are two flats
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in groups for p in g["params"]]
        optimizer = wrapper(torch.optim.AdamW(groups, lr=1e-3), low_precision_dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(1)
        full = {key: {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
                for key in ("fp32", "exp_avg", "exp_avg_sq")}
        full["step"] = 7
        params = dict(model.named_parameters())
        for n, p in params.items():
            p.data.copy_(full["fp32"][n])  # what apply_full_state does before the optimizer
        portable._apply_stage0_optimizer(optimizer, params, full)

        masters = (list(zip(order, (m for ms in optimizer.fp32_groups for m in ms))) if wrapper is FP16_UnfusedOptimizer
                   else list(portable._unflatten(optimizer.fp32_groups_flat, order, params).items()))
        exact = all(torch.equal(m.float().view(full["fp32"][n].shape), full["fp32"][n]) for n, m in masters)
        read = portable._read_stage0({"module": {n: p.detach() for n, p in params.items()},
                                      "optimizer": optimizer.state_dict()}, order)
        round_trip = read["step"] == 7 and all(torch.equal(read[key][n], full[key][n]) for key in full if key != "step"
                                                for n in order)
        print(f"{wrapper.__name__}: masters {len(masters)} exact {exact} round trip {round_trip}", flush=True)


if __name__ == "__main__":
    main()
