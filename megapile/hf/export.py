"""Hugging Face directories in and out: `megapile export-hf`, `model.init_from`, and model loading
for `megapile eval` / `megapile generate`.

    megapile export-hf --checkpoint runs/x/checkpoints --output hf/x [--dtype bf16] [--max-shard-size 5GB]

An export is a directory `transformers` loads offline with `AutoModelForCausalLM.from_pretrained`:

    config.json                     the family's transformers config (GPTNeoXConfig, GPT2Config, LlamaConfig, ...)
    model.safetensors               or model-0000k-of-0000n.safetensors + model.safetensors.index.json
                                    past --max-shard-size
    generation_config.json          bos/eos = <|endoftext|>, pad = <|padding|> when the tokenizer has it
    tokenizer.json, tokenizer_config.json, special_tokens_map.json

Weights come from a training checkpoint of any ZeRO stage and data-parallel size (through
`checkpoint.portable.read_full_weights`, the fp32 master weights) or from another HF directory.
The conversion itself is `megapile/hf/convert.py`, tested for exact logits.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from megapile.checkpoint import carried_tokenizer, fragments, portable, tools
from megapile.config import Config, ConfigError, ModelConfig
from megapile.data import DataError
from megapile.data.tokenizer import load_tokenizer
from megapile.hf.convert import HF_CLASS, config_to_hf, load_hf_dir, state_dict_for_disk
from megapile.model import meta_gpt
from megapile.models import family
from megapile.parallel.tensor_inference import build_split, cut, local_shape
from megapile.reporting.progress import bar

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Fields of ModelConfig that describe the weights: taken from the HF directory by model.init_from.
SHAPE_FIELDS = ("arch", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                "max_seq_len", "rotary_pct", "rotary_base", "rope_scaling", "parallel_residual", "tie_embeddings",
                "activation", "norm_eps")


class ExportError(ValueError):
    """A problem with the user's paths or checkpoint; the message is one line."""


@dataclass
class Loaded:
    """A model ready for inference, from a training checkpoint or a Hugging Face directory."""

    model: Any  # megapile.model.GPT, in eval mode
    cfg: ModelConfig
    tokenizer: Any  # megapile.data.tokenizer.Tokenizer
    source: str  # what was loaded, for messages: "runs/x/checkpoints/global_step4 (step 4)"
    step: Optional[int] = None


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor],
                                                                             Optional[str], Any]:
    """(model config, full weights in `dtype`, tokenizer path, Found) of a training checkpoint of any layout."""
    cfg, tokenizer, found = _checkpoint_info(path)
    return cfg, _full_weights(cfg, found, dtype), tokenizer, found


def _full_weights(cfg: ModelConfig, found: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's merge prints progress lines
        weights = portable.read_full_weights(found.path, found.state.zero_stage, dtype)
    _check_names(cfg, found, set(weights))
    return weights


def _checkpoint_info(path: str) -> tuple[ModelConfig, Optional[str], Any]:
    try:
        found = tools.resolve(path)
    except (FileNotFoundError, ConfigError) as e:  # ConfigError: a state format newer than this megapile
        raise ExportError(str(e)) from None
    model = dict(found.state.config["model"])
    model.update(activation_checkpointing=False, attention="sdpa", init_from=None)
    # the tokenizer the checkpoint carries; for one saved before checkpoints carried it, the run's data.tokenizer
    tokenizer = carried_tokenizer(found.path) or found.state.config["data"].get("tokenizer")
    return ModelConfig(**model), tokenizer, found


def _check_names(cfg: ModelConfig, found: Any, names: set[str]) -> None:
    expected = set(meta_gpt(cfg).state_dict())
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise ExportError(f"{found.path}: could not reassemble full weights from this layout "
                          f"(tensor {found.state.tensor}, pipeline {found.state.pipeline}): "
                          f"missing {missing[:3]}, unexpected {extra[:3]}")


def _checkpoint_parts(cfg: ModelConfig, found: Any, dtype: torch.dtype, tensor: int, rank: int):
    """`part(name, split_dim)` for megapile.parallel.tensor_inference: this rank's part of each parameter, read
    from the checkpoint's slices alone where it has them (no rank holds the whole model), else cut from the
    full weights."""
    if not fragments.present(found.path):
        return cut(_full_weights(cfg, found, dtype), tensor, rank)
    stored = fragments.Stored(found.path)
    _check_names(cfg, found, set(stored.params))

    def part(name: str, dim: Optional[int]) -> torch.Tensor:
        shape = local_shape(stored.params[name]["shape"], dim, tensor)
        numel = int(torch.Size(shape).numel())
        return stored.read(name, "fp32", dim, rank if dim is not None else 0, tensor, 0, numel).view(shape).to(dtype)

    return part


def load_model(path: str, device: torch.device | str = "cpu", tokenizer: Optional[str] = None,
               dtype: str = "fp32", tensor: int = 1, tensor_rank: int = 0, group: Any = None) -> Loaded:
    """A GPT in eval mode, its weights in `dtype` (fp32, or bf16 for models that do not fit in fp32: the 20B
    preset needs 80 GB in fp32, 40 GB in bf16), plus its tokenizer, from a checkpoint (dir) or an HF directory.
    `tensor` > 1: this rank's part of a model split over the tensor group `group` (its rank there `tensor_rank`;
    megapile/parallel/tensor_inference.py)."""
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such checkpoint or model directory")
    step, trained_with = None, None
    if is_hf_dir(path):
        cfg, weights = load_hf_dir(path)
        part = cut(weights, tensor, tensor_rank)
        tokenizer = tokenizer or path
        source = f"{path} (Hugging Face {cfg.family.hf.hf_class})"
    else:
        cfg, ckpt_tokenizer, found = _checkpoint_info(path)
        part = _checkpoint_parts(cfg, found, DTYPES[dtype], tensor, tensor_rank)
        tokenizer = tokenizer or ckpt_tokenizer
        step, trained_with = found.step, found.state.fingerprints.get("tokenizer")
        source = f"{found.path} (step {found.step})"
        if not tokenizer:
            raise ExportError(f"{found.path}: the run had no data.tokenizer; pass --tokenizer")
    try:
        tok = load_tokenizer(tokenizer)
    except DataError as e:
        raise ExportError(str(e)) from None
    if trained_with and tok.fingerprint != trained_with:
        raise ExportError(f"tokenizer {tokenizer} is not the one {found.path} was trained with (sha256 "
                          f"{tok.fingerprint[:12]}, trained with {trained_with[:12]})")
    try:
        model = build_split(cfg, part, tensor, group, torch.device(device), DTYPES[dtype])
    except ValueError as e:  # a split that does not divide the heads
        raise ExportError(str(e)) from None
    return Loaded(model, cfg, tok, source, step)


# ----------------------------------------------------------------------------- writing


def export(source: str, output: str, dtype: str = "fp32", max_shard_bytes: int = 5 * 10**9,
           tokenizer: Optional[str] = None, show_progress: bool = False) -> dict[str, Any]:
    """Write `source` (checkpoint or HF directory) as a Hugging Face directory; return a summary."""
    loaded = load_model(source, "cpu", tokenizer)
    sd = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    files = write_hf_dir(loaded.cfg, sd, loaded.tokenizer, output, DTYPES[dtype], max_shard_bytes, show_progress)
    return {"source": loaded.source, "output": output, "arch": loaded.cfg.arch, "files": files,
            "parameters": sum(t.numel() for t in sd.values())}


def write_hf_dir(cfg: ModelConfig, sd: dict[str, torch.Tensor], tok, output: str,
                 dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 * 10**9,
                 show_progress: bool = False) -> list[str]:
    """config.json, (sharded) safetensors, and with a tokenizer `tok` (None: weights only, as a test or a
    benchmark that brings no tokenizer writes them) generation_config.json and the tokenizer files, into
    `output`. The one Hugging Face writer: `megapile export-hf` and every test write through it."""
    # lazy: transformers is optional (a test extra) and adds ~0.7 s to torch; eval/generate of a checkpoint skip it
    import transformers

    os.makedirs(output, exist_ok=True)
    for name in os.listdir(output):  # a re-export must not leave shards of the previous one behind
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name):
            os.unlink(os.path.join(output, name))
    hf_config = config_to_hf(cfg)
    hf_config.dtype = _HF_DTYPE_NAMES[dtype]
    files = ["config.json"]
    if tok is not None:
        eod, pad = tok.eod_id, tok.pad_id
        hf_config.bos_token_id = hf_config.eos_token_id = eod
        hf_config.pad_token_id = pad if pad != eod else None
        transformers.GenerationConfig(bos_token_id=eod, eos_token_id=eod, pad_token_id=pad).save_pretrained(output)
        files.append("generation_config.json")
    hf_config.save_pretrained(output)
    hf_sd = state_dict_for_disk(cfg, sd)
    files += _save_sharded({k: v.detach().to("cpu", dtype).contiguous() for k, v in hf_sd.items()}, output,
                           max_shard_bytes, show_progress)
    if tok is not None:
        files += write_tokenizer(tok, output, cfg.max_seq_len)
    return files


def _save_sharded(sd: dict[str, torch.Tensor], output: str, max_shard_bytes: int,
                  show_progress: bool = False) -> list[str]:
    """model.safetensors, or shards of at most max_shard_bytes (a bigger tensor gets its own) + an index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(output, "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in bar(list(zip(names, shards)), desc="export", unit="shard", enabled=show_progress):
        save_file(shard, os.path.join(output, name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(output, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return names + ["model.safetensors.index.json"]


def write_tokenizer(tok, output: str, max_len: int) -> list[str]:
    """tokenizer.json plus the two small files AutoTokenizer reads for the special tokens."""
    tok.backend.save(os.path.join(output, "tokenizer.json"))
    eod = tok.backend.id_to_token(tok.eod_id)
    pad = tok.backend.id_to_token(tok.pad_id)
    special = {"bos_token": eod, "eos_token": eod, "unk_token": eod, "pad_token": pad}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, **special}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(output, name), "w") as f:
            json.dump(content, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# ----------------------------------------------------------------------------- model.init_from


def apply_init_from(cfg: Config) -> Optional[dict[str, torch.Tensor]]:
    """For `model.init_from=DIR`: take the model's shape from the HF directory (and its tokenizer when
    data.tokenizer is unset) into `cfg`; return the weights to load after build_model, or None."""
    if not cfg.model.init_from:
        return None
    path = cfg.model.init_from
    if not is_hf_dir(path):
        raise ConfigError(f"model.init_from: {path} is not a Hugging Face model directory (no config.json)")
    if cfg.parallel.pipeline > 1:
        raise ConfigError("model.init_from is not supported with parallel.pipeline > 1; "
                          "start with pipeline 1, checkpoint, then resume on the pipeline layout")
    try:
        hf_cfg, weights = load_hf_dir(path, pad_vocab_multiple=cfg.model.pad_vocab_multiple)
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(f"model.init_from: {path}: {e}") from None
    cfg.model = dataclasses.replace(cfg.model, **{k: getattr(hf_cfg, k) for k in SHAPE_FIELDS})
    has_tokenizer = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json"))
    if not cfg.data.tokenizer and has_tokenizer:
        cfg.data.tokenizer = path
    elif cfg.data.tokenizer and has_tokenizer:
        _check_same_vocab(cfg.data.tokenizer, path)
    return weights


def _check_same_vocab(data_tokenizer: str, model_dir: str) -> None:
    try:
        ours, theirs = load_tokenizer(data_tokenizer), load_tokenizer(model_dir)
    except DataError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    if ours.backend.get_vocab(with_added_tokens=True) != theirs.backend.get_vocab(with_added_tokens=True):
        raise ConfigError(f"data.tokenizer ({data_tokenizer}) is not the tokenizer of model.init_from ({model_dir}); "
                          "the data must be preprocessed with the model's tokenizer")


# ----------------------------------------------------------------------------- CLI


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)?\s*", text.upper())
    if not m:
        raise ExportError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MB, 1000000)")
    unit = (m.group(2) or "").rstrip("B")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit])


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint, a checkpoint directory (its newest good checkpoint) or an HF directory")
    parser.add_argument("--output", "-o", required=True, help="directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights on disk (default fp32)")
    parser.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this size (default 5GB)")
    parser.add_argument("--tokenizer", help="tokenizer to ship (default: the checkpoint's own copy; another must be byte-identical)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while writing shards")


def cli_main(args: argparse.Namespace) -> int:
    try:
        if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
            raise ExportError("--output must differ from --checkpoint")
        summary = export(args.checkpoint, args.output, args.dtype, parse_size(args.max_shard_size), args.tokenizer,
                         show_progress=not args.no_progress)
    except (ExportError, ConfigError, KeyError) as e:
        print(f"megapile: error: {str(e).strip(chr(34) + chr(39))}", file=sys.stderr)
        return 1
    print(f"exported {summary['source']} to {summary['output']} as "
          f"{HF_CLASS[summary['arch']]} "
          f"({summary['parameters'] / 1e6:.2f}M parameters, {args.dtype}): {', '.join(summary['files'])}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({summary['output']!r})")
    note = family(summary["arch"]).hf.tokenizer_note
    if note:
        print(f"tokenizer: {note.format(output=summary['output'])}")
    return 0
