"""megapile/train.py with a NaN injected into the loss of chosen steps on rank 0 (with pipeline parallelism: on
the last stage) (a test harness, not product code): MEGAPILE_NAN_STEPS="3,4" (1-based optimizer steps),
MEGAPILE_NAN_ACCUM = micro-batches per step."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megapile import model, train  # noqa: E402
from megapile.parallel import pipeline  # noqa: E402

NAN_STEPS = {int(s) for s in os.environ["MEGAPILE_NAN_STEPS"].split(",")}
ACCUM = int(os.environ["MEGAPILE_NAN_ACCUM"])
_original = model.GPT.forward
_calls = [0]


def forward(self, input_ids, targets=None):
    out = _original(self, input_ids, targets)
    if targets is not None and self.training:
        _calls[0] += 1
        step = (_calls[0] - 1) // ACCUM + 1
        if step in NAN_STEPS and os.environ.get("RANK", "0") == "0":
            out = out * float("nan")
    return out


def _local_weights(engine):
    return [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]


_original_step = train.train_step


def train_step(run, first_sample):
    """Report whether a step with an injected NaN left this rank's weights exactly as they were."""
    step = first_sample // run.cfg.train.global_batch_size  # 0-based; the batch size is fixed in these runs
    before = _local_weights(run.engine)
    out = _original_step(run, first_sample)
    if step + 1 in NAN_STEPS:
        same = all(torch.equal(a, b) for a, b in zip(before, _local_weights(run.engine)))
        print(f"rank {os.environ.get('RANK', '0')} step {step + 1} weights unchanged: {same}", flush=True)
    return out


_original_lm_loss = pipeline.lm_loss
_loss_calls = [0]


def lm_loss(logits, targets):
    """The pipeline's loss (last stage): NaN on every micro-batch of the chosen steps; evaluation is left alone."""
    out = _original_lm_loss(logits, targets)
    if torch.is_grad_enabled():
        _loss_calls[0] += 1
        if (_loss_calls[0] - 1) // ACCUM + 1 in NAN_STEPS:
            out = out * float("nan")
    return out


model.GPT.forward = forward
pipeline.lm_loss = lm_loss
train.train_step = train_step
sys.exit(train.main())
