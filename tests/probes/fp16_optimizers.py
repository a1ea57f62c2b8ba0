"""Round trip of a ZeRO-0 bf16 optimizer state through megapile's slice code, on DeepSpeed's real FP16 optimizers:
the unfused one (what DeepSpeed picks on CPU) and the fused one (what it picks on GPU, with FusedAdam). Built
directly around a torch Adam in one gloo process, since no CPU engine builds the fused one.

For each: full fp32 weights and moments are loaded with `slices.load` (as a resume does); then the fp32 masters
and the inner Adam state must hold exactly those values, the module's bf16 weights their rounding, and what a
save writes (`slices.holder(...).get`) must read back the same values. Prints one line per optimizer.
"""
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer  # noqa: E402
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer  # noqa: E402

from megapile.checkpoint import portable, slices  # noqa: E402
from megapile.checkpoint.fragments import KINDS  # noqa: E402
from megapile.config import ModelConfig  # noqa: E402
from megapile.model import build_model, param_groups  # noqa: E402
from megapile.parallel.layout import Layout  # noqa: E402


def main() -> None:
    deepspeed.init_distributed("gloo")
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_heads=2, vocab_size=64, max_seq_len=16)
    for wrapper in (FP16_UnfusedOptimizer, FP16_Optimizer):
        model = build_model(cfg, seed=0).to(torch.bfloat16)
        groups = param_groups(model, 0.1)  # two groups, so the fused masters are two flats
        optimizer = wrapper(torch.optim.AdamW(groups, lr=1e-3), low_precision_dtype=torch.bfloat16)
        engine = SimpleNamespace(module=model, optimizer=optimizer, lr_scheduler=None,
                                 zero_optimization_stage=lambda: 0)
        g = torch.Generator().manual_seed(1)
        full = {key: {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for key in KINDS}
        full["step"] = 7
        slices.load(engine, portable.FullState(full), Layout(1, 1, 1, 1), 0, cfg.num_layers, cfg.family.tensor_plan)

        accessor = slices.holder(engine)
        held = slices.held(engine, Layout(1, 1, 1, 1), 0, cfg.num_layers, cfg.family.tensor_plan)
        exact = all(torch.equal(accessor.get(h, key), full[key][h.name].reshape(-1)) for h in held for key in KINDS)
        module = all(torch.equal(h.param.detach(), full["fp32"][h.name].bfloat16()) for h in held)
        # independently of megapile's mapping: the optimizer's own masters, in its own order
        names = {id(p): n for n, p in model.named_parameters()}
        for group, params in zip(_masters(optimizer), optimizer.fp16_groups):
            expected = torch.cat([full["fp32"][names[id(p)]].reshape(-1) for p in params])
            exact = exact and torch.equal(torch.cat([m.reshape(-1) for m in group]), expected)
        steps = {float(s["step"]) for s in accessor.states()}
        print(f"{wrapper.__name__}: masters {len(held)} exact {exact and module} round trip {steps == {7.0}}",
              flush=True)


def _masters(optimizer) -> list[list[torch.Tensor]]:
    if hasattr(optimizer, "fp32_groups_flat"):
        return [[flat] for flat in optimizer.fp32_groups_flat]
    return optimizer.fp32_groups


if __name__ == "__main__":
    main()
