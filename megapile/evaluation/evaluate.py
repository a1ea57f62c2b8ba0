"""`megapile eval`: loss, perplexity and bits per UTF-8 byte on held-out Pile data, overall and per component.

    megapile eval --checkpoint runs/x/checkpoints --data 'pile/val.jsonl.zst' [--per-component] [--max-docs N]
    torchrun --nproc_per_node 8 -m megapile.cli eval --checkpoint ... --data ...     # data-parallel, same numbers
    torchrun --nproc_per_node 8 -m megapile.cli eval --tensor-parallel 4 ...   # 2 copies, each split over 4 ranks

--data is Pile-format jsonl(.zst/.gz) (a glob is fine) or a preprocessed dataset prefix (`.bin/.idx`).
--checkpoint is a training checkpoint of any layout or a Hugging Face directory (`megapile export-hf`).

Each document is scored on its own, as the Pile paper and the LM Evaluation Harness do: its tokens are
predicted after an `<|endoftext|>` token, in windows of `--seq-len` tokens (default: the model's context).
With the default stride (= seq-len) every window after the first predicts the next seq-len tokens from the
window's inputs only; a stride S < seq-len slides the window S tokens at a time and scores only the S new
tokens, each with seq-len - S more tokens of context. The final window of a document is always a full
seq-len of inputs (when the document is that long) that scores only the tokens not yet scored. This is the
Harness's `loglikelihood_rolling` (context_len = seq-len - stride + 1), so `lm_eval` reports the same numbers.

Metrics, summed over documents (NLL in nats):
    loss           NLL / tokens                 perplexity       exp(loss)
    bits_per_byte  NLL / (ln 2 × UTF-8 bytes)   byte_perplexity  2 ** bits_per_byte
    word_perplexity exp(NLL / words), words = len(re.split(r"\\s+", text)) as in the Harness

With several processes, document i goes to rank i % world_size; sums are gathered in float64. With
--tensor-parallel N, each group of N ranks holds one copy of the model split N ways (each rank reads only
its parts from the checkpoint: megapile/parallel/tensor_inference.py), and document i goes to copy
i % (world_size / N).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from megapile.data import DataError
from megapile.data.indexed import IndexedDataset, dataset_exists
from megapile.data.reader import JsonlSource
from megapile.hf.export import ExportError, is_hf_dir, load_model
from megapile.parallel.tensor_inference import groups as tensor_groups
from megapile.reporting.progress import bar as progress_bar
from megapile.runtime import distributed

OVERALL = "overall"


@dataclass
class Totals:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    nll: float = 0.0  # nats, summed over predicted tokens

    def add(self, other: "Totals") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def metrics(self) -> dict[str, Any]:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        bpb = self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan")
        return {
            "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "words": self.words,
            "nll_nats": self.nll, "loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bpb,
            "byte_perplexity": 2.0 ** bpb, "word_perplexity": math.exp(self.nll / self.words) if self.words else float("nan"),
        }


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """The Pile paper's metric: total NLL in nats / (ln 2 × UTF-8 bytes)."""
    return nll_nats / (math.log(2) * num_bytes)


def rolling_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a document of n tokens: (start, end, scored). The inputs are positions start..end of
    [eod] + tokens[:-1], the targets tokens[start:end], and only the last `scored` targets count.
    Every token is scored exactly once."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    end = min(seq_len, n)
    out = [(0, end, end)] if n else []
    while end < n:
        new = min(n - end, stride)
        end += new
        out.append((max(0, end - seq_len), end, new))
    return out


@torch.no_grad()
def window_nll(model, inputs: list[list[int]], targets: list[list[int]], scored: list[int]) -> list[float]:
    """Summed NLL (nats, float64) of the last scored[i] targets of each window, one forward for the batch."""
    device = next(model.parameters()).device
    T = max(len(x) for x in inputs)
    x = torch.zeros(len(inputs), T, dtype=torch.long, device=device)
    y = torch.zeros_like(x)
    mask = torch.zeros(len(inputs), T, dtype=torch.bool, device=device)
    for i, (inp, tgt, k) in enumerate(zip(inputs, targets, scored)):  # right-padded: causal, so harmless
        x[i, : len(inp)] = torch.tensor(inp)
        y[i, : len(tgt)] = torch.tensor(tgt)
        mask[i, len(tgt) - k : len(tgt)] = True
    h = model.hidden_states(x)  # (B, T, C)
    logits = F.linear(h, model._head_weight()[: model.cfg.vocab_size]).float()  # real vocabulary only
    logp = logits.log_softmax(dim=-1).gather(-1, y[..., None]).squeeze(-1)  # (B, T)
    return (-(logp.double() * mask)).sum(dim=1).tolist()


# ----------------------------------------------------------------------------- documents


def iter_documents(data: str, tokenizer, max_docs: Optional[int]) -> Iterator[tuple[int, str, Optional[str], Optional[list[int]]]]:
    """(index, text, component, tokens or None) of each document; tokens are given for preprocessed data."""
    prefix = re.sub(r"\.(bin|idx)$", "", data)
    count = 0
    if dataset_exists(prefix):
        ds = IndexedDataset(prefix)
        component = None
        if os.path.exists(prefix + ".json"):
            with open(prefix + ".json") as f:
                component = json.load(f).get("component")
        for i in range(len(ds)):
            if max_docs is not None and count >= max_docs:
                return
            tokens = [int(t) for t in ds[i]]
            if tokens and tokens[-1] == tokenizer.eod_id:
                tokens = tokens[:-1]
            yield i, tokenizer.decode(tokens), component, tokens
            count += 1
        return
    for i, doc in enumerate(JsonlSource(data)):
        if max_docs is not None and i >= max_docs:
            return
        yield i, doc.text, doc.component, None


def evaluate(model, tokenizer, data: str, *, seq_len: Optional[int] = None, stride: Optional[int] = None,
             max_docs: Optional[int] = None, batch_size: int = 4, rank: int = 0, world_size: int = 1,
             progress=None) -> dict[str, Totals]:
    """This rank's totals per component (and OVERALL); `gather` combines ranks."""
    seq_len = seq_len or model.cfg.max_seq_len
    stride = stride or seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    totals: dict[str, Totals] = {OVERALL: Totals()}
    batch: list[tuple[str, list[int], list[int], int]] = []

    def flush() -> None:
        nlls = window_nll(model, [b[1] for b in batch], [b[2] for b in batch], [b[3] for b in batch])
        for (component, *_), nll in zip(batch, nlls):
            totals[component].nll += nll
            totals[OVERALL].nll += nll
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for i, text, component, tokens in iter_documents(data, tokenizer, max_docs):
        if i % world_size != rank:
            continue
        tokens = tokenizer.encode(text) if tokens is None else tokens
        if not tokens:
            continue
        component = component or "unknown"
        doc = Totals(1, len(tokens), len(text.encode("utf-8")), count_words(text))
        totals.setdefault(component, Totals()).add(doc)
        totals[OVERALL].add(doc)
        inputs = [tokenizer.eod_id] + tokens[:-1]
        for start, end, scored in rolling_windows(len(tokens), seq_len, stride):
            batch.append((component, inputs[start:end], tokens[start:end], scored))
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    return totals


def gather(totals: dict[str, Totals], world_size: int) -> dict[str, Totals]:
    """Sum every rank's totals, in rank order, on every rank."""
    if world_size == 1:
        return totals
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, {k: asdict(v) for k, v in totals.items()})
    out: dict[str, Totals] = {}
    for part in parts:
        for k, v in part.items():
            out.setdefault(k, Totals()).add(Totals(**v))
    return out


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'component':<24} {'docs':>7} {'tokens':>11} {'bytes':>12} {'loss':>8} {'ppl':>10} {'bits/byte':>10}"]
    for name, m in results.items():
        lines.append(f"{name:<24} {m['documents']:>7,} {m['tokens']:>11,} {m['bytes']:>12,} {m['loss']:>8.4f} "
                     f"{m['perplexity']:>10.3f} {m['bits_per_byte']:>10.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint, a checkpoint directory (its newest good checkpoint) or an HF directory")
    parser.add_argument("--data", required=True, help="Pile-format jsonl(.zst/.gz) file or glob, or a .bin/.idx prefix")
    parser.add_argument("--per-component", action="store_true", help="a row per meta.pile_set_name too")
    parser.add_argument("--max-docs", type=int, default=None, help="only the first N documents")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's context)")
    parser.add_argument("--stride", type=int, default=None, help="slide windows by this many tokens (default: seq-len)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--output", "-o", default=None,
                        help="JSON results (default: RUN_DIR/eval/<checkpoint>_<data>.json, or ./eval_<model>_<data>.json)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights and compute (bf16: half the memory, for models that do not fit in fp32)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="split the model over groups of N ranks (whole key/value heads each; for a model that does "
                             "not fit one device); the documents are shared among the groups")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tokenizer", help="tokenizer to use (default: the checkpoint's own copy; another must be byte-identical)")


def _default_output(loaded, checkpoint: str, data: str) -> str:
    base = os.path.basename(data)
    if re.search(r"[*?\[]", base):  # a glob: name it after its folder
        base = os.path.basename(os.path.dirname(data)) or "data"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", re.sub(r"(\.jsonl|\.json)?(\.zstd?|\.gz)?$", "", base))
    if is_hf_dir(checkpoint):
        return f"eval_{os.path.basename(os.path.normpath(checkpoint))}_{name}.json"
    ckpt = loaded.source.split(" (")[0]
    return os.path.join(os.path.dirname(os.path.dirname(ckpt)), "eval", f"{os.path.basename(ckpt)}_{name}.json")


def cli_main(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"megapile: error: {message}", file=sys.stderr)
        return 1

    for key in ("max_docs", "seq_len", "stride", "batch_size", "tensor_parallel"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            return fail(f"--{key.replace('_', '-')} must be >= 1")
    try:
        env = distributed.detect(os.environ)
        device = distributed.local_device(env, os.environ)
    except distributed.LaunchError as e:
        return fail(str(e))
    tp = args.tensor_parallel
    if env.world_size % tp:
        return fail(f"--tensor-parallel {tp} must divide the number of processes ({env.world_size})")
    cuda = device.type == "cuda"
    if env.world_size > 1:
        if cuda:
            torch.cuda.set_device(device)
        distributed.init(env, backend="nccl" if cuda else "gloo")
    # ranks [0, tp) split the first copy of the model, [tp, 2 tp) the second, ...; each copy scores its documents
    tp_rank, copy, copies = env.rank % tp, env.rank // tp, env.world_size // tp
    group = tensor_groups(env.world_size, tp)[copy] if tp > 1 else None
    try:
        loaded = load_model(args.checkpoint, device, args.tokenizer, args.dtype, tp, tp_rank, group)
        bar = progress_bar(desc="eval", unit="window", enabled=env.is_main and not args.no_progress)
        totals = evaluate(loaded.model, loaded.tokenizer, args.data, seq_len=args.seq_len, stride=args.stride,
                          max_docs=args.max_docs, batch_size=args.batch_size, rank=copy,
                          world_size=copies, progress=bar.update)
        bar.close()
    except (ExportError, DataError, ValueError, KeyError) as e:
        return fail(str(e).strip("'\""))
    totals = gather(totals if tp_rank == 0 else {}, env.world_size)  # one count per copy of the model
    if env.world_size > 1:
        distributed.shutdown()
    if not env.is_main:
        return 0
    if totals[OVERALL].tokens == 0:
        return fail(f"{args.data}: no documents to evaluate")
    overall = totals.pop(OVERALL)
    rows = {OVERALL: overall.metrics()}
    components = {k: totals[k].metrics() for k in sorted(totals)} if args.per_component else {}
    seq_len = args.seq_len or loaded.cfg.max_seq_len
    result = {"checkpoint": loaded.source, "step": loaded.step, "data": args.data, "seq_len": seq_len,
              "stride": args.stride or seq_len, "max_docs": args.max_docs, "world_size": env.world_size, "tensor_parallel": tp, "dtype": args.dtype,
              OVERALL: rows[OVERALL], "components": components}
    output = args.output or _default_output(loaded, args.checkpoint, args.data)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"{loaded.source} on {args.data}: windows of {seq_len} tokens, stride {result['stride']}")
    print(format_table({**components, **rows}))
    print(f"wrote {output}")
    return 0
