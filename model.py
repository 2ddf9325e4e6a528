"""
The pico-decoder: a Llama-style decoder-only transformer in plain PyTorch.

    tokens -> embedding_proj -> n_layers x [RMSNorm -> GQA attention (RoPE) -> +residual,
                                            RMSNorm -> SwiGLU              -> +residual]
           -> output_norm -> de_embedding_proj -> logits

Module names follow pico-train (`layers.3.attention.v_proj`, `layers.3.swiglu.w_2`, ...) because
the learning-dynamics config (`layer_suffixes`) refers to them. The file also saves and loads
Hugging Face checkpoints: our own (below) and pico-train's published ones.

Checkpoints come in one of two formats, chosen by what the model computes (why_not_llama):
- the Llama export, while the model is exactly Llama: save_pretrained() writes its weights under
  transformers' LlamaForCausalLM names (_HF_NAMES, at the end of the file) with a Llama config.json,
  so transformers loads every checkpoint, no remote code;
- the pico-decoder's own format, once model.py is changed so that it is not (a LayerNorm, another
  activation, a new weight): this file's weight names, a config.json of model_type
  "pico_decoder_own" holding the ModelConfig, and a copy of the model.py that wrote it.
  load_pretrained() reads it back with that model.py; transformers does not load it at all.
So any change to the blocks trains, checkpoints and resumes as it is, with no setting to change.

How why_not_llama() decides, at every start-up (12 ms at the demo's 256 tokens, 0.2 s at 2048 on
two CPU cores: bench.py's "format check" rows; the run's model is never touched): it builds a
small model of the same class (PROBE: 2 layers, 4 query and 2 KV heads, vocabulary 64; norm_eps,
theta, max_seq_len and any setting a fork adds are the run's), gives every weight random values
(the norms' gains too, so a changed gain shows), and compares its float64 logits on max_seq_len
random tokens with llama_logits(), Llama written out from its definition, on the same weights
under their Llama names. The model is Llama only if every weight has a Llama name,
every Llama weight is there, and the logits agree to 1e-6 of their scale. Names alone never decide:
F.gelu for F.silu keeps every name and fails on the logits. It cannot see a change that shows only
at other sizes than the probe's (say, in layers past the second), nor one under 1e-6 of the logits.

Initialisation: PyTorch's module defaults, exactly as pico-train trains its published models
(nn.Embedding ~ N(0, 1), nn.Linear weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), norm weights 1).
We add no custom init on purpose, so runs are comparable with the pico-decoder suite.
"""

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# enable_gqa lets SDPA share each KV head across its group of query heads without copying;
# it appeared in torch 2.5. On a GPU only SDPA's flash kernel (fp16/bf16, no mask) supports it:
# elsewhere it would fall back to the math kernel, which materialises the T x T attention matrix.
# There, and before torch 2.5, we repeat the KV heads instead (same result).
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def sdpa_shares_kv_heads(q, mask):
    """Whether to let SDPA share the KV heads itself (enable_gqa) for these queries."""
    return _SDPA_HAS_GQA and (q.device.type == "cpu" or (q.dtype in (torch.float16, torch.bfloat16)
                                                         and mask is None))


@dataclass
class ModelConfig:
    # defaults are the seed's (pico-decoder-medium shape)
    d_model: int = 768
    n_layers: int = 12
    vocab_size: int = 50304
    max_seq_len: int = 2048
    attention_n_heads: int = 12
    attention_n_kv_heads: int = 4
    activation_hidden_dim: int = 3072
    norm_eps: float = 1e-6
    position_emb_theta: float = 10000.0

    def __post_init__(self):
        for name in ("d_model", "n_layers", "vocab_size", "max_seq_len", "attention_n_heads",
                     "attention_n_kv_heads", "activation_hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.attention_n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by attention_n_heads "
                             f"({self.attention_n_heads})")
        if self.attention_n_heads % self.attention_n_kv_heads:
            raise ValueError(f"attention_n_heads ({self.attention_n_heads}) must be divisible by "
                             f"attention_n_kv_heads ({self.attention_n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / attention_n_heads = {self.head_dim} must be even "
                             f"for RoPE (it rotates pairs of dimensions)")
        if not self.norm_eps > 0 or not self.position_emb_theta > 0:
            raise ValueError("norm_eps and position_emb_theta must be positive")

    @property
    def head_dim(self):
        return self.d_model // self.attention_n_heads


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 at least (when x is bf16, say)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim, max_seq_len, theta):
    """cos/sin tables of shape (max_seq_len, head_dim) for the rotary embedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd): frequency i drives dims i and i + hd/2
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, hd) by position. We pair dimension i with i + hd/2 ("halves", as
    transformers' Llama does); pico-train pairs 2i with 2i+1 ("interleaved"). The two are the same
    model up to a fixed permutation of q/k rows, which load_pretrained() applies at import.
    Only queries and keys turn: their dot product then depends on the distance between two positions
    alone; values carry content, and turning them would only garble what attention mixes."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for `max_len` positions."""

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (config.n_layers, batch_size, config.attention_n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions filled; advanced by PicoDecoder.forward

    def update(self, layer, k, v):
        end = self.pos + k.size(2)
        if end > self.k.size(3):
            raise ValueError(f"KV cache holds {self.k.size(3)} positions; {end} needed")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    """Grouped-query self-attention: n_heads query heads share n_kv_heads key/value heads;
    query head h reads KV head h // (n_heads / n_kv_heads)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.attention_n_heads, config.attention_n_kv_heads
        self.head_dim = config.head_dim
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        mask, is_causal = None, True
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
            S = k.size(2)  # cached + new positions
            if T == 1:
                is_causal = False  # one new token may look at everything before it
            elif S > T:
                # SDPA's is_causal aligns the mask top-left; with a prefix in the cache we need
                # it aligned bottom-right: new token i sees keys 0 .. S - T + i
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
                is_causal = False

        group, gqa = self.n_heads // self.n_kv_heads, {}
        if group > 1 and sdpa_shares_kv_heads(q, mask):
            gqa = {"enable_gqa": True}
        elif group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    """w_2(silu(w_0 x) * w_1 x): w_0 is the gate, w_1 the up projection, w_2 the down projection."""

    def __init__(self, config):
        super().__init__()
        self.w_0 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)
        self.w_1 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)
        self.w_2 = nn.Linear(config.activation_hidden_dim, config.d_model, bias=False)

    def forward(self, x):
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.swiglu_norm = RMSNorm(config.d_model, config.norm_eps)
        self.swiglu = SwiGLU(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, kv_cache)
        return x + self.swiglu(self.swiglu_norm(x))


class PicoDecoder(nn.Module):
    """The whole model. Change anything: the checkpoints follow (their two formats: the top of this file)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.output_norm = RMSNorm(config.d_model, config.norm_eps)
        self.de_embedding_proj = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # non-persistent: rebuilt from the config, never saved, owned by this model (not shared)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.position_emb_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, targets=None, kv_cache=None, reduction="mean", head_grad=True, top1=False):
        """input_ids (B, T) -> (logits (B, T, vocab), None) without targets. With targets (B, T):
        (None, mean cross-entropy); reduction="none": (None, per-token results); reduction="both":
        (None, (mean, per-token results)), where the mean carries the gradient, as with "mean". The
        per-token results are {"loss": (B, T) cross-entropies} and, with top1=True, "top1": (B, T),
        whether the target was the most likely token. With targets the full logits are never
        materialised (LinearCrossEntropy, the same numbers as F.cross_entropy, computed in chunks).
        head_grad=False: no gradient for the output head's weight (a capture that does not need it
        skips a third of the head's work; the other gradients are the same to the bit).
        With a KVCache, input_ids are the tokens after those already cached."""
        B, T = input_ids.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len "
                             f"({self.config.max_seq_len})")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]

        x = self.embedding_proj(input_ids)  # (B, T, d_model)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache)
        x = self.output_norm(x)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None:
            return self.de_embedding_proj(x), None  # (B, T, vocab)

        h, t, w = x.reshape(B * T, -1), targets.reshape(B * T), self.de_embedding_proj.weight
        w = w if head_grad else w.detach()
        chunk = 4096 if h.is_cuda else 256  # tokens per chunk: the logits buffer is 256 x V (51 MB) on CPU
        if reduction == "none" and torch.is_grad_enabled():  # per-token losses that carry gradients
            logits = [(h[i:i + chunk] @ w.t()).float() for i in range(0, B * T, chunk)]
            per_token = {"loss": torch.cat([F.cross_entropy(z, t[i * chunk:(i + 1) * chunk], reduction="none")
                                            for i, z in enumerate(logits)]).view(B, T)}
            if top1:
                per_token["top1"] = (torch.cat([z.argmax(1) for z in logits]) == t).view(B, T)
            return None, per_token
        if reduction == "none":  # evaluation: the same chunked loop, no gradients
            _, losses, _, _, hits = head_losses(h, w, t, chunk, top1=top1)
        else:  # the same as F.cross_entropy(h @ w.t(), t), chunked: the (B*T, vocab) logits never exist at once
            loss, losses, hits = LinearCrossEntropy.apply(h, w, t, chunk, torch.is_grad_enabled(), top1)
            if reduction == "mean":
                return None, loss
        per_token = {"loss": losses.view(B, T), **({"top1": hits.view(B, T)} if top1 else {})}
        return None, (loss, per_token) if reduction == "both" else per_token

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, eos_token_id=None):
        """Sample max_new_tokens after input_ids (B, T) using a KV cache; temperature 0 is greedy.
        Stops early once every row has produced eos_token_id (when given)."""
        B, T = input_ids.shape
        if T < 1:
            raise ValueError("generate() needs a prompt of at least one token")
        total = T + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len ({self.config.max_seq_len})")
        p = self.embedding_proj.weight
        cache = KVCache(self.config, B, total, device=p.device, dtype=p.dtype)
        out, step_input = input_ids, input_ids
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits, _ = self(step_input, kv_cache=cache)
            logits = logits[:, -1, :].float()  # (B, vocab)
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            out = torch.cat([out, next_token], dim=1)
            step_input = next_token  # (B, 1): only the new token goes through the model
            if eos_token_id is not None:
                done |= next_token.squeeze(1) == eos_token_id
                if bool(done.all()):
                    break
        return out

    def num_params(self, matmul_only=False):
        """All parameters, or only those in matrix multiplies (embedding lookup and norms excluded,
        output head included): the N of the 6N FLOPs-per-token rule."""
        if not matmul_only:
            return sum(p.numel() for p in self.parameters())
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6N for the matmuls, forward and backward (N = num_params(matmul_only=True)),
        plus 12 * L * H * hd * T for the attention scores and values (the accounting of the PaLM
        paper's appendix B, which MFU figures usually follow)."""
        c = self.config
        T = seq_len or c.max_seq_len
        return 6 * self.num_params(matmul_only=True) + 12 * c.n_layers * c.attention_n_heads * c.head_dim * T


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (h @ weight.T) against targets, computed `chunk` tokens at a time.

    The output head of a small model is its biggest tensor: 2048 tokens x 50,304 vocabulary entries
    is 412 MB of fp32 logits per sequence, plus as much again for their gradient. Here each chunk's
    logits are made in one reused buffer, turned into the loss and, in place, into d loss / d logits
    (= softmax - onehot), which gives the gradients for h and weight at once; backward() only scales
    them. Memory stays small, and on CPU the reused buffer also spares the page faults a fresh
    50 MB tensor per chunk would cost. Targets equal to -100 are ignored, as in F.cross_entropy."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, grad_enabled=True, top1=False):
        # grad_enabled: torch.is_grad_enabled() where the caller stands (inside forward it is
        # always off); without it an evaluation would compute gradients it never uses
        need = (grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1])
        loss, token_losses, grad_h, grad_w, hits = head_losses(h, weight, targets, chunk, *need, top1=top1)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(token_losses)  # a by-product for evaluation; the gradient is the mean's
        return loss, token_losses, hits

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None, None)


def head_losses(h, weight, targets, chunk, need_grad_h=False, need_grad_w=False, top1=False):
    """The loop behind LinearCrossEntropy: (mean loss, per-token losses (N,), d mean / d h,
    d mean / d weight, whether each target was the most likely token (N,)), each gradient and the
    last only if asked for. h (N, d), weight (V, d), targets (N,). A per-token result that needs
    the logits is computed here, chunk by chunk, as top1 is.
    Under autocast the matmuls run in its dtype (bf16), chosen here explicitly; the softmax and
    the losses are always fp32."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    valid = targets != -100
    weights = valid / valid.sum().clamp(min=1)  # each token's share of the mean
    targets = targets.masked_fill(~valid, 0)
    loss = torch.zeros((), device=h.device, dtype=torch.float32)
    token_losses = torch.empty(h.size(0), device=h.device, dtype=torch.float32)
    need_grad = need_grad_h or need_grad_w
    grad_h = torch.empty_like(h) if need_grad_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad_w else None
    hits = torch.zeros(h.size(0), device=h.device, dtype=torch.bool) if top1 else None
    with torch.no_grad(), torch.autocast(device, enabled=False):
        h_, w = h.to(dtype), weight.to(dtype)
        buffer = torch.empty(min(chunk, h.size(0)), w.size(0), device=h.device, dtype=dtype)
        rows = torch.arange(buffer.size(0), device=h.device)
        for i in range(0, h.size(0), chunk):
            hc, tc, wc = h_[i:i + chunk], targets[i:i + chunk], weights[i:i + chunk]
            n = hc.size(0)
            z = torch.mm(hc, w.t(), out=buffer[:n]).float()  # logits (n, V)
            if top1:
                hits[i:i + n] = (z.argmax(1) == tc) & valid[i:i + n]
            z_max = z.amax(1, keepdim=True)
            z_target = z.gather(1, tc[:, None])
            p = z.sub_(z_max).exp_()  # exp(logits - max), in place
            p_sum = p.sum(1, keepdim=True)
            token_losses[i:i + n] = (z_max + p_sum.log() - z_target).squeeze(1)  # logsumexp - target
            loss += (token_losses[i:i + n] * wc).sum()
            if need_grad:
                g = p.mul_(wc[:, None] / p_sum)  # softmax, weighted
                g[rows[:n], tc] -= wc  # minus onehot: d loss / d logits
                g = g.to(dtype)
                if need_grad_h:
                    grad_h[i:i + chunk] = g @ w
                if need_grad_w and g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), hc)  # in place: no (V, d) temporary per chunk
                elif need_grad_w:
                    grad_w += g.t() @ hc  # bf16 product, accumulated in fp32
    return loss, token_losses.masked_fill_(~valid, 0.0), grad_h, grad_w, hits


# dense bf16 peaks per GPU (NVIDIA's data sheets give twice these, "with sparsity"); the PCIe and
# NVL cards run slower clocks than the SXM ones that carry the bare name
GPU_BF16_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                       "A100": 312e12}


def gpu_peak_flops(device_name):
    """The dense bf16 peak of a GPU by its name (for MFU), or None where it is not known: never guessed.
    The most specific name matches ("NVIDIA H100 PCIe" is an H100 PCIe, not an H100 SXM)."""
    known = [name for name in GPU_BF16_PEAK_FLOPS if name in device_name]
    return GPU_BF16_PEAK_FLOPS[max(known, key=len)] if known else None


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints. Our own are the Llama export while the model is Llama, else our own
# format (the top of this file); pico-train's are `pico_decoder.`-prefixed keys with interleaved RoPE.

EOS_TOKEN_ID, PAD_TOKEN_ID = 50279, 1  # <|endoftext|> and <|padding|> of the OLMo tokenizer

_HF_NAMES = [  # (our name, Llama name); {i} is the layer index
    ("embedding_proj.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attention.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.swiglu_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.swiglu.w_0.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.swiglu.w_1.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.swiglu.w_2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("de_embedding_proj.weight", "lm_head.weight"),
]


def _name_map(n_layers):
    pairs = {}
    for ours, theirs in _HF_NAMES:
        for i in range(n_layers if "{i}" in ours else 1):
            pairs[ours.format(i=i)] = theirs.format(i=i)
    return pairs


# the small model why_not_llama() builds of the model's class (the other settings are the run's)
PROBE = dict(d_model=32, n_layers=2, vocab_size=64, attention_n_heads=4, attention_n_kv_heads=2,
             activation_hidden_dim=48)


def llama_logits(weights, config, input_ids):
    """Llama's logits, written out from its definition (transformers' LlamaForCausalLM; checked
    against it by tests/test_model.py), for weights under their Llama names: the reference that
    why_not_llama() holds the model to. Plain on purpose: an explicit mask, repeated KV heads."""
    (B, T), c = input_ids.shape, config
    H, KV, hd = c.attention_n_heads, c.attention_n_kv_heads, c.head_dim
    w = weights["model.embed_tokens.weight"]
    # RoPE tables in fp32, as transformers makes them: rotate (x_i, x_{i + hd/2}) by position x freq_i
    freq = 1.0 / (c.position_emb_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angle = torch.arange(T, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos().to(w.dtype), angle.sin().to(w.dtype)

    def rope(x):
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def rms_norm(x, gain):
        return gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps)

    seen = torch.ones(T, T, dtype=torch.bool).tril()  # position t attends to positions 0..t
    x = w[input_ids]
    for i in range(c.n_layers):
        def p(name, i=i):
            return weights[f"model.layers.{i}.{name}.weight"]
        h = rms_norm(x, p("input_layernorm"))
        q = (h @ p("self_attn.q_proj").T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ p("self_attn.k_proj").T).view(B, T, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
        v = (h @ p("self_attn.v_proj").T).view(B, T, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=seen)  # softmax(q k^T / sqrt(hd)) v
        x = x + y.transpose(1, 2).reshape(B, T, H * hd) @ p("self_attn.o_proj").T
        h = rms_norm(x, p("post_attention_layernorm"))
        x = x + (F.silu(h @ p("mlp.gate_proj").T) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return rms_norm(x, weights["model.norm.weight"]) @ weights["lm_head.weight"].T


def _few(names):
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def why_not_llama(model):
    """None where `model`'s class computes exactly transformers' Llama, so its checkpoints are the
    Llama export; else why not, in words. How it decides: the top of this file. It leaves `model`
    and every random generator as they were."""
    def unnamed(state, n_layers):  # why these weights are not exactly Llama's, or None
        names = _name_map(n_layers)
        if extra := [k for k in state if k not in names]:
            return f"its weights {_few(extra)} have no name in transformers' Llama (model._HF_NAMES)"
        if missing := [k for k in names if k not in state]:
            return f"it lacks Llama's weights {_few(missing)}"
        return None

    if why := unnamed(model.state_dict(), model.config.n_layers):
        return why
    try:  # the names are Llama's: now the maths, on a small model of the same class
        config = replace(model.config, **PROBE)
        with torch.random.fork_rng(devices=[]):
            probe = type(model)(config).to("cpu", torch.float64).eval()
    except Exception as e:  # noqa: BLE001 - a changed model.py may fail in any way
        return f"a small model of its class could not be made to compare with Llama ({type(e).__name__}: {e})"
    state, names = probe.state_dict(), _name_map(config.n_layers)
    if why := unnamed(state, config.n_layers):  # (a weight that only some sizes make)
        return why
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in state.items():
            r = torch.randn(v.shape, generator=g, dtype=torch.float64)
            v.copy_(1 + 0.5 * r if v.dim() == 1 else r if names[k] == "model.embed_tokens.weight"
                    else r / math.sqrt(v.shape[-1]))
        ids = torch.randint(0, config.vocab_size, (1, config.max_seq_len), generator=g)
        try:
            ours = probe(ids)[0]
        except Exception as e:  # noqa: BLE001
            return f"its forward pass failed on the small model ({type(e).__name__}: {e})"
        llama = llama_logits({names[k]: v for k, v in state.items()}, config, ids)
    diff, scale = (ours - llama).abs().max().item(), llama.abs().max().item()
    if not diff <= 1e-6 * scale:  # (NaN too)
        return (f"its weights have Llama's names but it computes something else: on the same weights its "
                f"logits differ from Llama's by up to {diff:.2g} (of {scale:.2g})")
    return None


def llama_config_dict(config, dtype=torch.float32):
    """config.json of the equivalent transformers LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.attention_n_heads,
        "num_key_value_heads": config.attention_n_kv_heads, "head_dim": config.head_dim,
        "intermediate_size": config.activation_hidden_dim, "hidden_act": "silu",
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.position_emb_theta,
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": False, "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
        "bos_token_id": None, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID,
        "pico_decoder": asdict(config),  # our own field names, for readers of the file
    }


OWN_FORMAT = "pico_decoder_own"  # config.json's model_type for a model that is not Llama


def own_config_dict(config, dtype=torch.float32):
    """config.json of the pico-decoder's own format: no transformers class reads it."""
    return {"architectures": ["PicoDecoder"], "model_type": OWN_FORMAT, "pico_decoder": asdict(config),
            "torch_dtype": str(dtype).removeprefix("torch."), "eos_token_id": EOS_TOKEN_ID,
            "pad_token_id": PAD_TOKEN_ID,
            "how_to_load": "not a Llama: weights under the names of the model.py saved beside this file; with "
                           "that model.py importable, `from model import load_pretrained; load_pretrained(folder)`"}


def save_pretrained(model, path, dtype=None, llama=None):
    """Write config.json, generation_config.json and model.safetensors in the format the model calls
    for (the top of this file): a Llama checkpoint that transformers loads with
    AutoModelForCausalLM.from_pretrained(path), no remote code, where llama is true; else the own
    format, with this model.py beside it. llama=None: decided here, by why_not_llama()."""
    from safetensors.torch import save_file  # the standard weights format, torch-only otherwise

    if llama is None:
        llama = why_not_llama(model) is None
    os.makedirs(path, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    names = _name_map(model.config.n_layers) if llama else {k: k for k in model.state_dict()}
    state = {names[k]: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype, copy=True)
             for k, v in model.state_dict().items()}  # (copies: safetensors refuses tied weights' shared memory)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump((llama_config_dict if llama else own_config_dict)(model.config, dtype), f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID, "do_sample": True}, f, indent=2)
    if not llama:
        shutil.copyfile(os.path.abspath(__file__), os.path.join(path, "model.py"))


def _interleaved_to_halves(w, n_heads):
    """Reorder each head's q/k rows from pico-train's (x0, x1), (x2, x3), ... RoPE pairs to the
    (x_i, x_{i + hd/2}) pairs we use. w: (n_heads * hd, d_model)."""
    hd = w.size(0) // n_heads
    return w.view(n_heads, hd // 2, 2, -1).transpose(1, 2).reshape(n_heads * hd, -1)


def load_pretrained(path, device="cpu"):
    """Load a checkpoint directory (ours in either format, any Llama checkpoint, or pico-train's
    pico_decoder one) into this model.py's PicoDecoder, weights in the dtype they were stored in."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    weights = load_file(os.path.join(path, "model.safetensors"), device=str(device))
    kind = cfg.get("model_type")
    if kind == "llama":
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        if (cfg.get("rope_scaling") or {}).get("rope_type", "default") != "default":
            raise ValueError(f"{path}: RoPE scaling {cfg['rope_scaling']} is not supported")
        config = ModelConfig(
            d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            vocab_size=cfg["vocab_size"], max_seq_len=cfg["max_position_embeddings"],
            attention_n_heads=cfg["num_attention_heads"],
            attention_n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            activation_hidden_dim=cfg["intermediate_size"], norm_eps=cfg["rms_norm_eps"],
            position_emb_theta=float(theta))
        if cfg.get("head_dim", config.head_dim) != config.head_dim or cfg.get("tie_word_embeddings"):
            raise ValueError(f"{path}: head_dim != hidden_size / heads or tied embeddings are not "
                             f"supported by the pico-decoder")
        theirs = {v: k for k, v in _name_map(config.n_layers).items()}
        state = {theirs[k]: v for k, v in weights.items() if k in theirs}
    elif kind in ("pico_decoder", "pico"):
        config = ModelConfig(**{f.name: cfg[f.name] for f in fields(ModelConfig) if f.name in cfg})
        state = {k.removeprefix("pico_decoder."): v for k, v in weights.items()}
        for k in list(state):
            if k.endswith("attention.q_proj.weight"):
                state[k] = _interleaved_to_halves(state[k], config.attention_n_heads)
            elif k.endswith("attention.k_proj.weight"):
                state[k] = _interleaved_to_halves(state[k], config.attention_n_kv_heads)
    elif kind == OWN_FORMAT:
        settings = cfg.get("pico_decoder") if isinstance(cfg.get("pico_decoder"), dict) else {}
        if unknown := sorted(set(settings) - {f.name for f in fields(ModelConfig)}):
            raise ValueError(f"{path}/config.json has model settings this model.py does not know ({_few(unknown)}): "
                             f"it was written by another model.py (the one saved beside it)")
        config, state = ModelConfig(**settings), weights
    else:
        raise ValueError(f"{path}/config.json: model_type {kind!r} is none of 'llama' and {OWN_FORMAT!r} (our "
                         f"checkpoints) and 'pico_decoder'/'pico' (pico-train's)")

    with torch.device("meta"):
        model = PicoDecoder(config)
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        written_by = " (it was written by the model.py saved beside it)" if kind == OWN_FORMAT else ""
        raise ValueError(f"{path}: weights do not match this model.py's model{written_by}: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, assign=True)
    cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.position_emb_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)  # meta buffers -> real tables
    if any(t.is_meta for t in model.buffers()):  # a changed model.py made more buffers than the weights:
        with torch.random.fork_rng(devices=[]):  # build it for real (it computes them) and copy the weights in
            model = PicoDecoder(config).to(device)
        model.load_state_dict(state)
    return model
