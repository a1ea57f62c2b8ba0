"""The one transformer of every model family (GPT-NeoX/Pythia, GPT-2, Llama, Qwen2 ...), in plain PyTorch.

A family (megapile/models/) is a set of choices here: the norm, the MLP, the positions, which linears have
biases, grouped-query attention. This module reads `cfg.family` and never compares family names.

Nothing here knows about DeepSpeed or parallelism: wrappers in `megapile/parallel/` take a
plain `GPT`. The model is built on the meta device and filled by `init_weights(seed)`, so
every parallel layout starts from the same weights (`build_model` does both steps).

Parameter names (stable and human-readable; layer ids are the ModuleDict keys):

    embed.weight                    token embedding, (padded_vocab, C)
    pos_embed.weight                learned positions (gpt2), (max_seq_len, C)
    blocks.{i}.ln1.{weight,bias}    LayerNorm before attention (RMSNorm families: weight only)
    blocks.{i}.attn.qkv.{weight,bias}   fused QKV, ((nh + 2 nkv) hs, C); output rows are laid out per
                                    key/value group as [q_0 .. q_{g-1}, k, v], g = nh / nkv query heads
                                    sharing one key/value head. With nkv == nh (MHA) that is per head
                                    [q, k, v] (head 0: q k v, head 1: q k v, ...), like HF GPTNeoX, so a
                                    tensor-parallel split by whole key/value groups is one slice
    blocks.{i}.attn.proj.{weight,bias}  attention output projection, (C, C)
    blocks.{i}.ln2.{weight,bias}    LayerNorm before the MLP (or RMSNorm)
    blocks.{i}.mlp.gate.weight      gated MLPs only: SwiGLU gate, (F, C); the MLP is fc_out(silu(gate x) * fc_in x)
    blocks.{i}.mlp.fc_in.{weight,bias}  (F, C) (gated: the SwiGLU "up" projection)
    blocks.{i}.mlp.fc_out.{weight,bias} (C, F) (gated: "down")
    final_norm.{weight,bias}
    head.weight                     output projection, (padded_vocab, C); absent when
                                    embeddings are tied (the head then reuses embed.weight)

Which `.bias` names exist is the family's: all (neox, gpt2), none (llama), only attn.qkv's (qwen2).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megapile.config import ModelConfig

# ----------------------------------------------------------------------------- rotary


def rotary_inv_freq(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """The rotary frequencies, (rotary_dims / 2,) fp32, Llama-3 scaled when model.rope_scaling is set."""
    rd = cfg.rotary_dims
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    # Long wavelengths (beyond what the original context saw) are slowed by `factor`, short ones kept;
    # in between, a linear blend in (original context / wavelength) avoids a jump between the two.
    wavelen = 2 * math.pi / inv_freq
    blend = (sc.original_max_seq_len / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    blend = blend.clamp(0.0, 1.0)  # 0: fully scaled (low frequency), 1: unchanged (high frequency)
    return (1 - blend) * inv_freq / sc.factor + blend * inv_freq


def rotary_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (T, rotary_dims), in fp32; the same numbers HF GPTNeoX, Llama and Qwen2 compute."""
    inv_freq = rotary_inv_freq(cfg, device)
    freqs = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq  # (T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, rd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dims channels of each head of x (B, nh, T, hs); pass the rest through."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


# ----------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Llama, Qwen2), computed in fp32 whatever the input dtype, as HF Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The family's norm: RMSNorm (weight only), or LayerNorm with a bias."""
    if cfg.family.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


NORMS = (nn.LayerNorm, RMSNorm)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.groups = cfg.kv_groups  # query heads per key/value head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.family.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.family.linear_bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.flash_attn_func = _import_flash_attn() if cfg.attention == "flash_attn" else None
        # None: attention-probability dropout draws from the process's generator like every other dropout.
        # An int k: from a generator seeded by (one draw from the process's generator, k). Tensor parallelism
        # sets k = tensor rank: the ranks of a group share one process stream (the same masks on the
        # replicated residual stream) yet drop different probabilities in their different heads. The seed is
        # a draw, so activation-checkpointing recompute and a resumed run reproduce the same masks.
        self.dropout_stream: Optional[int] = None

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                cache: Optional["LayerCache"] = None) -> torch.Tensor:
        B, T, _ = x.shape
        g, hs = self.groups, self.head_dim
        # -1 groups: a tensor-parallel shard of qkv (whole key/value groups) runs this code unchanged.
        qkv = self.qkv(x).view(B, T, -1, (g + 2) * hs)  # per group [q_0 .. q_{g-1}, k, v]
        qkv = qkv.transpose(1, 2)  # (B, nkv, T, (g + 2) hs)
        q, k, v = qkv.split([g * hs, hs, hs], dim=-1)  # k, v: (B, nkv, T, hs)
        q = q.unflatten(-1, (g, hs)).transpose(2, 3).flatten(1, 2)  # (B, nh, T, hs), head = group * g + j
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if p > 0 and self.dropout_stream is not None:
            with _forked_rng(q.device, self.dropout_stream):
                y = self._attend(q, k, v, p, cache)
        else:
            y = self._attend(q, k, v, p, cache)
        return self.resid_dropout(self.proj(y))  # back on the process stream

    @property
    def kv_heads(self) -> int:
        """The key/value heads this module holds: the model's, or a tensor-parallel rank's share (whole groups)."""
        return self.qkv.weight.shape[0] // ((self.groups + 2) * self.head_dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                cache: Optional["LayerCache"]) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs)) v, causal, with dropout p on the probabilities: (B, T, nh * hs).
        k and v hold nkv heads; each serves g = nh / nkv consecutive query heads."""
        B, T = q.shape[0], q.shape[2]
        if cache is not None:  # incremental decoding: append k, v (nkv heads: the GQA saving), attend over all
            k, v = cache.append(k, v)  # each (B, nkv, start + T, hs)
            k, v = self._expand_kv(k), self._expand_kv(v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, dropout_p=p)  # (B, nh, T, hs)
            y = y.transpose(1, 2).reshape(B, T, -1)
        elif self.flash_attn_func is not None:  # flash-attn takes fewer key/value heads as they are
            y = self.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=True)
            y = y.reshape(B, T, -1)  # flash_attn returns (B, T, nh, hs)
        else:
            k, v = self._expand_kv(k), self._expand_kv(v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
            y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs)
        return y

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(B, nkv, T, hs) -> (B, nh, T, hs): each key/value head repeated for the g query heads of its group."""
        return t if self.groups == 1 else t.repeat_interleave(self.groups, dim=1)


def activation_fn(name: str):
    return {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "silu": F.silu}[name]


class MLP(nn.Module):
    """fc_out(act(fc_in x)): GPT-NeoX and GPT-2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=cfg.family.linear_bias)
        self.fc_out = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=cfg.family.linear_bias)
        self.act = activation_fn(cfg.activation)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))


class GatedMLP(nn.Module):
    """fc_out(act(gate x) * fc_in x): Llama's SwiGLU (act = silu). Gate and up are two linears, not
    one fused matrix, so splitting each column-parallel gives every tensor rank the gate and up outputs of the
    same intermediate features."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.family.linear_bias
        self.gate = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=bias)
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=bias)
        self.fc_out = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=bias)
        self.act = activation_fn(cfg.activation)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.act(self.gate(x)) * self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln2 = make_norm(cfg)
        self.mlp = GatedMLP(cfg) if cfg.family.mlp == "gated" else MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                cache: Optional["LayerCache"] = None) -> torch.Tensor:
        if self.parallel_residual:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            return x + self.attn(self.ln1(x), rope, cache) + self.mlp(self.ln2(x))
        x = x + self.attn(self.ln1(x), rope, cache)  # GPT-2
        return x + self.mlp(self.ln2(x))


# ----------------------------------------------------------------------------- loss


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross_entropy(x @ w.T, targets), ignoring targets == -100, for training.

    The gradient of cross-entropy with respect to the logits is softmax - one_hot, so the
    forward computes the gradients of x and w too, a chunk of rows at a time, and keeps them
    instead of the logits: the (N, vocab) logits are never stored whole (a memory win on GPU),
    and one chunk buffer is reused where log_softmax + nll_loss + their backwards allocate several
    logits-sized tensors, which glibc's malloc page-faults in anew every step (a speed win on CPU;
    docs/performance.md). Logits, softmax and the weight-gradient sum are at least fp32.

    The saved gradients are unscaled (neither 1/count nor the loss scale) until `grad_loss` arrives in
    backward: under fp16 a row's terms, 1/count x ~1/V, are subnormal or zero, while DeepSpeed's loss scale
    (~2^16) would have lifted them. The weight gradient is saved in fp32, which under bf16/fp16 keeps
    V x C x 2 bytes more than a half-precision copy would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk_elems: int = 1 << 26,
                workspace: Optional[list] = None):
        # x (N, C), w (V, C), targets (N,)
        N, V = x.shape[0], w.shape[0]
        chunks = max(1, math.ceil(N * V / chunk_elems))  # 2^26 fp32 logits: 256 MiB a chunk at most
        rows = math.ceil(N / chunks)  # equal chunks: no slow sliver at the end
        valid = targets != -100
        acc_dtype = torch.promote_types(x.dtype, torch.float32)  # logits, softmax and sums: >= fp32
        mask = valid.to(acc_dtype)[:, None]  # (N, 1) 0/1: ignored rows weigh 0; 1/count waits for backward
        inv_count = 1 / valid.sum().clamp(min=1).to(acc_dtype)
        safe_targets = targets.clamp(min=0)[:, None]  # (N, 1); ignored rows weigh 0
        loss = torch.zeros((), dtype=acc_dtype, device=x.device)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(w, dtype=acc_dtype)
        # One logits buffer for every chunk, and from call to call when the caller keeps a `workspace` list:
        # on CPU a fresh one is page-faulted in anew each time.
        buf = None
        if x.dtype == acc_dtype:
            buf = workspace[0] if workspace else None
            if buf is None or buf.numel() < rows * V or buf.dtype != x.dtype or buf.device != x.device:
                buf = torch.empty(rows * V, dtype=x.dtype, device=x.device)
                if workspace is not None:
                    workspace[:] = [buf]
            buf = buf[: rows * V].view(rows, V)
        for s in range(0, N, rows):
            xs, ts, ms = x[s : s + rows], safe_targets[s : s + rows], mask[s : s + rows]
            if buf is not None:
                logits = torch.mm(xs, w.t(), out=buf[: xs.shape[0]])  # (n, V)
            else:
                logits = (xs @ w.t()).to(acc_dtype)  # (n, V); fp32 under bf16/fp16
            target_logit = logits.gather(1, ts)  # (n, 1)
            top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            # softmax in place: ATen's kernel makes its three passes over one row at a time, which stays in
            # cache; separate sub_/exp_/sum/mul_ passes each stream the whole chunk through memory.
            probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
            # logsumexp = top + log(sum exp(l - top)) = top - log(largest probability), which is >= 1/V and
            # so never underflows (the target's probability can, when the loss is large).
            log_sum = -probs.amax(dim=-1, keepdim=True).log()  # (n, 1)
            loss += ((top + log_sum - target_logit) * ms).sum()
            grad = probs.scatter_add_(1, ts, torch.full_like(target_logit, -1.0)).mul_(ms)  # softmax - one_hot
            # Unscaled, the half matmuls' results are O(|w|) and O(|x|): no underflow.
            grad_h = grad.to(x.dtype)
            torch.mm(grad_h, w, out=grad_x[s : s + rows])  # (n, C)
            if grad_w.dtype == grad_h.dtype:
                grad_w.addmm_(grad_h.t(), xs)  # (V, C)
            else:
                grad_w += (grad_h.t() @ xs).to(acc_dtype)
        ctx.save_for_backward(grad_x, grad_w, inv_count)
        ctx.w_dtype = w.dtype
        loss *= inv_count
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w, inv_count = ctx.saved_tensors
        s = inv_count * grad_loss  # 1/count x loss scale, in >= fp32, before anything is cast to half
        return (grad_x.to(s.dtype) * s).to(grad_x.dtype), (grad_w * s).to(ctx.w_dtype), None, None, None


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every token seen so far, for incremental decoding (`GPT.forward_cached`).

    Prompts of different lengths share a batch left-padded: row b starts with `pad[b]` padding
    tokens that no real token attends to, and its positions count from its first real token.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, pad: Optional[torch.Tensor] = None,
                 kv_heads: Optional[int] = None):
        """`kv_heads`: the key/value heads this process holds, cfg.kv_heads unless the model is split over a tensor
        group (`GPT.kv_cache` reads them off the model)."""
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds model.max_seq_len {cfg.max_seq_len}")
        kv_heads = kv_heads or cfg.kv_heads
        shape = (batch_size, kv_heads, max_len, cfg.head_dim)  # (B, nkv, Tmax, hs): GQA caches nkv heads
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled, padding included
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self.valid = torch.arange(max_len, device=device)[None, :] >= self.pad[:, None]  # (B, Tmax) False on padding


class LayerCache:
    """One layer's view of a KVCache for one forward call over positions [start, start + T)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int, mask: torch.Tensor):
        self.keys, self.values, self.start, self.mask = keys, values, start, mask

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + k.shape[2]
        self.keys[:, :, self.start : end] = k
        self.values[:, :, self.start : end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


# ----------------------------------------------------------------------------- model


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # The loss's fp32 logits chunk, kept from step to step on CPU, where glibc would unmap a freed one and
        # the next step would page-fault all of it in again (~10 % of a pythia-14m step; docs/performance.md).
        # GPU allocators cache freed blocks themselves, so there it is not kept.
        self._loss_workspace: list = []
        V, C = cfg.padded_vocab_size, cfg.hidden_size
        self.embed = nn.Embedding(V, C)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, C) if cfg.family.positions == "learned" else None
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.final_norm = make_norm(cfg)
        # Tied: the head reuses embed.weight in `_head_weight`, so no parameter is shared between
        # modules (sharing breaks under meta construction + to_empty and under sharding wrappers).
        self.head = None if cfg.tie_embeddings else nn.Linear(C, V, bias=False)
        self.use_rotary = uses_rotary(cfg)

    def _head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight  # (padded_vocab, C)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final-norm output, (B, T, C), before the output projection."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(input_ids)  # (B, T, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=input_ids.device))
        x = self.embed_dropout(x)
        rope = rotary_cos_sin(self.cfg, T, input_ids.device) if self.use_rotary else None
        every = self.cfg.checkpoint_every
        for i, block in enumerate(self.blocks.values()):
            if self.cfg.activation_checkpointing and self.training and i % every == 0:  # every k-th block
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, padded_vocab); with targets (B, T), the scalar loss
        instead (what an engine wrapping the model calls: `engine(x, targets=y)`)."""
        if targets is not None:
            return self.loss(input_ids, targets)
        return F.linear(self.hidden_states(input_ids), self._head_weight())

    def kv_cache(self, batch_size: int, max_len: int, pad: Optional[torch.Tensor] = None) -> KVCache:
        """An empty KVCache for this model as it is held: its device and dtype, and the key/value heads its
        attention holds (a rank of a tensor-parallel split caches only its own)."""
        weight = self._head_weight()
        kv_heads = next(iter(self.blocks.values())).attn.kv_heads
        return KVCache(self.cfg, batch_size, max_len, weight.device, weight.dtype, pad, kv_heads)

    def forward_cached(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, padded_vocab) of the T tokens that follow the cache.length already in
        `cache`, whose keys and values are appended to it (for generation; no dropout)."""
        B, T = input_ids.shape
        start, end = cache.length, cache.length + T
        if end > cache.max_len:
            raise ValueError(f"sequence length {end} exceeds the cache length {cache.max_len}")
        device = input_ids.device
        steps = torch.arange(start, end, device=device)  # (T,)
        positions = (steps[None, :] - cache.pad[:, None]).clamp(min=0)  # (B, T), from each row's first real token
        x = self.embed(input_ids)  # (B, T, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        rope = None
        if self.use_rotary:
            cos, sin = rotary_cos_sin(self.cfg, cache.max_len, device)  # (Tmax, rd)
            rope = (cos[positions][:, None], sin[positions][:, None])  # each (B, 1, T, rd)
        keys = torch.arange(end, device=device)
        allowed = (keys[None, :] <= steps[:, None])[None] & cache.valid[:, None, :end]  # (B, T, end): causal, not padding
        allowed |= keys[None, None, :] == steps[None, :, None]  # padding attends to itself: no empty softmax rows
        mask = allowed[:, None]  # (B, 1, T, end)
        for i, block in enumerate(self.blocks.values()):
            x = block(x, rope, LayerCache(cache.keys[i], cache.values[i], start, mask))
        cache.length = end
        return F.linear(self.final_norm(x), self._head_weight())

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the real vocabulary (targets == -100 are ignored).

        Only the first vocab_size rows of the head are multiplied, so the padding columns never
        enter the softmax and the logits are materialised once, contiguous, without a slice copy.
        For training, `model.chunked_loss` (default) uses LinearCrossEntropy; false takes the plain
        F.linear + F.cross_entropy path, which holds the whole (B*T, vocab) logits in fp32.
        """
        x = self.hidden_states(input_ids)  # (B, T, C)
        w = self._head_weight()[: self.cfg.vocab_size]  # (vocab, C), a view: no copy
        if self.cfg.chunked_loss and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            if torch.is_autocast_enabled(x.device.type):  # as autocast runs F.linear: in its dtype (the custom
                dt = torch.get_autocast_dtype(x.device.type)  # Function is not on autocast's op list)
                x, w = x.to(dt), w.to(dt)
            workspace = self._loss_workspace if x.device.type == "cpu" else None
            return LinearCrossEntropy.apply(x.flatten(0, 1), w, targets.flatten(), 1 << 26, workspace)
        logits = F.linear(x, w)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    # ------------------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Fill every parameter from `seed`, identically on any device, world size or layout.

        Each parameter draws from its own CPU generator seeded by (seed, parameter name), so the
        values depend only on the name and the shape — not on the order parameters are visited,
        nor on which pipeline stage holds them. Linear and embedding weights ~ N(0, init_std);
        the projections into the residual stream (attn.proj, mlp.fc_out) use the GPT-NeoX
        scaled init N(0, init_std / sqrt(2 * num_layers)); biases 0; norm weights 1, biases 0.
        """
        for name, p in self.named_parameters():  # GPT's own function: pipeline stages call this on a stand-in
            p.copy_(GPT.initial_value(self, name, tuple(p.shape), seed))

    def initial_value(self, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """Parameter `name`'s initial value (fp32, on the CPU): what `init_weights` puts there. A function of
        (seed, name, shape) only, so a rank that holds a slice of the parameter can compute it alone."""
        std = self.cfg.init_std
        module_name, _, kind = name.rpartition(".")
        if isinstance(self.get_submodule(module_name), NORMS):
            return torch.full(shape, 1.0 if kind == "weight" else 0.0)
        if kind == "bias":
            return torch.zeros(shape)
        if module_name.endswith(("attn.proj", "mlp.fc_out")):
            std = std / math.sqrt(2 * self.cfg.num_layers)
        g = torch.Generator(device="cpu").manual_seed(_name_seed(seed, name))
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)

    # ------------------------------------------------------------------------- counting

    def num_params(self, exclude_embedding: bool = True) -> int:
        """Parameter count. exclude_embedding drops the token and position tables and an untied
        head, like Pythia's "non-embedding" counts (pythia-14m: 1,189,888)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
            if self.head is not None:
                n -= self.head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward):

            6 * N_matmul + 12 * num_layers * hidden_size * seq_len

        N_matmul = every parameter except the lookup tables (token and position embeddings),
        with the output projection counted once even when tied (padded_vocab * hidden).
        Grouped-query attention and SwiGLU enter through N_matmul as the weights really are: per
        layer the QKV projection is C * (nh + 2 nkv) * hs (not 3 C^2) and the SwiGLU MLP has three
        C x F matrices (gate, up, down) instead of two.
        The second term is the attention score and weighted-value matmuls (QK^T and AV: 2 matmuls
        of 2*T*C flops each per token per layer forward, times 3 for forward + backward),
        counted without causal masking, as in the PaLM / Megatron MFU convention. It counts query
        heads (nh * hs = C): with GQA each query head still scores every key, so it is unchanged.
        """
        cfg = self.cfg
        n_matmul = self.num_params(exclude_embedding=True) + cfg.padded_vocab_size * cfg.hidden_size
        return 6 * n_matmul + 12 * cfg.num_layers * cfg.hidden_size * seq_len


def uses_rotary(cfg: ModelConfig) -> bool:
    return cfg.family.positions == "rotary" and cfg.rotary_dims > 0


class _NoInitOnMeta(torch.overrides.TorchFunctionMode):
    """Initializers do nothing on meta tensors (they hold no values), yet run through torch._refs, whose first call
    imports torch._dynamo: 1.1 s of a process's start-up, for nothing. Here they return at once; a real tensor
    (never made on purpose inside `meta_gpt`) is still initialised."""

    FILLS = (torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def meta_gpt(cfg: ModelConfig) -> GPT:
    """GPT(cfg) on the meta device: its shapes and names, no memory, no random draws."""
    with torch.device("meta"), _NoInitOnMeta():
        return GPT(cfg)


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> GPT:
    """Construct on the meta device (no memory, no random draws), materialise on `device`, init."""
    model = meta_gpt(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def compile_blocks(model: GPT) -> GPT:
    """`model.compile`: torch.compile each transformer block in place (parameter names unchanged).

    Per block rather than the whole model: every block has the same code and shapes, so one graph
    is traced and reused, and the loss, checkpointing and DeepSpeed hooks stay outside the graph.
    """
    for block in model.blocks.values():
        block.compile()
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, as GPT-NeoX does: weight decay on matrices and embeddings, none on
    biases and norm weights (every 1-D parameter)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # a parameter partitioned as it was built (ZeRO-3's zero.Init) keeps its full shape in ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@contextlib.contextmanager
def _forked_rng(device: torch.device, stream: int):
    """Inside: `device`'s generator seeded by (a draw from the process's CPU generator, `stream`); after: the
    generators as they were, less that one draw."""
    draw = int(torch.randint(0, 2**62, (1,)).item())
    seed = (draw ^ (stream * 0x9E3779B97F4A7C15)) & (2**63 - 1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        yield


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _import_flash_attn():
    try:
        # lazy: an optional GPU package whose CUDA extension is large; only model.attention=flash_attn needs it
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise ImportError(
            "model.attention is 'flash_attn' but the flash-attn package is not importable "
            f"({e}); install flash-attn or set model.attention: sdpa"
        ) from None
    return flash_attn_func
