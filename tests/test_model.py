"""model.py against independent references: transformers' Llama, a naive pico-train-style
implementation (interleaved RoPE, explicit mask), and full recomputation for the KV cache."""

import json
import os
import runpy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import edited_repo, import_file
from model import (Attention, KVCache, ModelConfig, PicoDecoder, _name_map, llama_logits, load_pretrained,
                   save_pretrained, why_not_llama)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(d_model=32, n_layers=2, vocab_size=97, max_seq_len=24, attention_n_heads=4,
             attention_n_kv_heads=2, activation_hidden_dim=48)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = PicoDecoder(ModelConfig(**{**SMALL, **overrides}))
    with torch.no_grad():  # norm weights start at 1; perturb them so a misplaced norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(batch=2, length=16, vocab=97, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = small_model()
    save_pretrained(model, tmp_path)
    ids = tokens()
    ours, _ = model(ids)
    for cls in (transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM):
        for impl in ("sdpa", "eager"):
            hf = cls.from_pretrained(tmp_path, attn_implementation=impl).eval()
            assert type(hf).__name__ == "LlamaForCausalLM"
            with torch.no_grad():
                theirs = hf(ids).logits
            assert (ours - theirs).abs().max().item() <= 1e-5, (cls.__name__, impl)
    assert json.load(open(tmp_path / "generation_config.json"))["eos_token_id"] == 50279


def test_save_load_round_trip_is_exact(tmp_path):
    model = small_model()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2), k1
    ids = tokens()
    assert torch.equal(model(ids)[0], loaded(ids)[0])


# a from-scratch reference of pico-train's decoder: interleaved RoPE via complex numbers,
# explicit causal mask and softmax, KV heads repeated by hand
def reference_pico_train_logits(sd, cfg, ids):
    H, KV, hd = cfg["attention_n_heads"], cfg["attention_n_kv_heads"], cfg["d_model"] // cfg["attention_n_heads"]
    B, T = ids.shape

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["norm_eps"]) * w

    freqs = 1.0 / (cfg["position_emb_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # (B, T, heads, hd), pairs (2i, 2i+1)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(-2)

    x = sd["pico_decoder.embedding_proj.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = lambda name, i=i: sd[f"pico_decoder.layers.{i}.{name}.weight"]  # noqa: E731
        h = norm(x, p("attention_norm"))
        q = rope((h @ p("attention.q_proj").T).view(B, T, H, hd))
        k = rope((h @ p("attention.k_proj").T).view(B, T, KV, hd))
        v = (h @ p("attention.v_proj").T).view(B, T, KV, hd)
        k, v = k.repeat_interleave(H // KV, dim=2), v.repeat_interleave(H // KV, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / hd ** 0.5
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * hd)
        x = x + y @ p("attention.o_proj").T
        h = norm(x, p("swiglu_norm"))
        x = x + (F.silu(h @ p("swiglu.w_0").T) * (h @ p("swiglu.w_1").T)) @ p("swiglu.w_2").T
    x = norm(x, sd["pico_decoder.output_norm.weight"])
    return x @ sd["pico_decoder.de_embedding_proj.weight"].T


@pytest.mark.parametrize("model_type", ["pico_decoder", "pico"])
def test_pico_train_checkpoint_import(tmp_path, model_type):
    cfg = {**SMALL, "norm_eps": 1e-6, "position_emb_theta": 10000.0}
    torch.manual_seed(3)
    ours = PicoDecoder(ModelConfig(**SMALL)).state_dict()
    sd = {"pico_decoder." + k: torch.randn_like(v) * 0.3 for k, v in ours.items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    json.dump({**cfg, "model_type": model_type, "architectures": ["PicoDecoderHF"]},
              open(tmp_path / "config.json", "w"))
    model = load_pretrained(tmp_path)
    ids = tokens()
    with torch.no_grad():
        ours, _ = model(ids)
    ref = reference_pico_train_logits(sd, cfg, ids)
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_causality():
    model = small_model()
    ids = tokens(length=20)
    for t in (0, 7, 18):
        changed = ids.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 97
        a, b = model(ids)[0], model(changed)[0]
        assert torch.equal(a[:, :t + 1], b[:, :t + 1])
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_gqa_sdpa_matches_repeated_kv_reference():
    cfg = ModelConfig(**SMALL)
    torch.manual_seed(0)
    attn = Attention(cfg, 0)
    model = PicoDecoder(cfg)
    x = torch.randn(3, 12, cfg.d_model)
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    y = attn(x, cos, sin)

    from model import apply_rope
    H, KV, hd = 4, 2, cfg.head_dim
    q = apply_rope(attn.q_proj(x).view(3, 12, H, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(3, 12, KV, hd).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(3, 12, KV, hd).transpose(1, 2)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # head h -> kv h // 2
    s = (q @ k.transpose(-1, -2)) / hd ** 0.5
    s = s.masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf"))
    ref = attn.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(3, 12, H * hd))
    assert (y - ref).abs().max().item() <= 1e-5


def greedy_by_recomputation(model, ids, n):
    for _ in range(n):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_generate_with_cache_equals_recomputation(prompt_len):
    model = small_model()
    ids = tokens(batch=2, length=prompt_len)
    fast = model.generate(ids, max_new_tokens=24 - prompt_len, temperature=0)
    assert fast.shape == (2, 24)
    assert torch.equal(fast, greedy_by_recomputation(model, ids, 24 - prompt_len))


def test_cache_prefill_in_chunks_matches_full_forward():
    model = small_model()
    ids = tokens(length=20)
    full, _ = model(ids)
    cache = KVCache(model.config, 2, 20)
    parts = [model(chunk, kv_cache=cache)[0] for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:20])]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_sampling_respects_top_k_and_is_seeded():
    model = small_model()
    ids = tokens(length=3)
    torch.manual_seed(5)
    a = model.generate(ids, 10, temperature=1.0, top_k=1)
    assert torch.equal(a, model.generate(ids, 10, temperature=0))  # top-1 sampling is greedy
    torch.manual_seed(5)
    b = model.generate(ids, 10, temperature=0.8, top_k=5)
    torch.manual_seed(5)
    assert torch.equal(b, model.generate(ids, 10, temperature=0.8, top_k=5))


@pytest.mark.parametrize("batch,length", [(2, 17), (3, 100)])  # 300 tokens: a full 256-token chunk + a partial one
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(batch, length):
    model = small_model(max_seq_len=128)
    ids = tokens(batch=batch, length=length)
    targets = ids[:, 1:].clone()
    targets[0, :3] = -100  # ignored positions
    _, loss = model(ids[:, :-1], targets)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(ids[:, :-1])
    ref = F.cross_entropy(logits.view(-1, 97), targets.reshape(-1))
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    for n, p in model.named_parameters():
        assert (ours[n] - p.grad).abs().max().item() <= 1e-6 * max(1.0, p.grad.abs().max().item()), n
    manual = F.cross_entropy(logits.view(-1, 97), targets.reshape(-1), reduction="none").view(batch, length - 1)
    top1 = (logits.argmax(-1) == targets) & (targets != -100)
    with torch.no_grad():  # the per-token results an evaluation adds up, chunked, and the same with gradients
        _, per_token = model(ids[:, :-1], targets, reduction="none", top1=True)
    assert (per_token["loss"] - manual).abs().max().item() <= 1e-5 and torch.equal(per_token["top1"], top1)
    _, per_token = model(ids[:, :-1], targets, reduction="none", top1=True)
    assert (per_token["loss"] - manual).abs().max().item() <= 1e-5 and per_token["loss"].requires_grad
    assert torch.equal(per_token["top1"], top1)


def test_kv_heads_repeated_where_sdpa_cannot_share_them(monkeypatch):
    import model as model_module
    m = small_model()  # 4 query heads over 2 KV heads
    ids = tokens(batch=2, length=20)
    shared, _ = m(ids)
    monkeypatch.setattr(model_module, "_SDPA_HAS_GQA", False)  # the explicit-repeat path
    repeated, _ = m(ids)
    assert (shared - repeated).abs().max().item() <= 1e-5
    monkeypatch.undo()
    q = torch.empty(1, 4, 8, 8, device="meta")  # a non-CPU device: only flash (half precision) shares
    assert not model_module.sdpa_shares_kv_heads(q, None)
    assert model_module.sdpa_shares_kv_heads(q.bfloat16(), None)
    assert not model_module.sdpa_shares_kv_heads(q.bfloat16(), torch.ones(8, 8, dtype=torch.bool))
    assert model_module.sdpa_shares_kv_heads(torch.empty(1, 4, 8, 8), None)  # CPU: its flash kernel shares


def test_chunked_loss_under_bf16_autocast_matches_autocast_reference():
    # the GPU recipe: fp32 weights, bf16 autocast. The head's matmuls must run in bf16 (as the
    # reference's autocast linear does) while the softmax and the loss stay fp32.
    model = small_model(max_seq_len=128)
    ids = tokens(batch=3, length=100)
    _, loss32 = model(ids[:, :-1], ids[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        ours = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        logits, _ = model(ids[:, :-1])
        assert logits.dtype == torch.bfloat16
        ref = F.cross_entropy(logits.float().view(-1, 97), ids[:, 1:].reshape(-1))
        ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 < abs(loss.item() - loss32.item())  # bf16 really used
    for n, p in model.named_parameters():
        # the reference rounds the head's weight gradient to bf16; ours accumulates it in fp32
        tol = 1e-2 if n == "de_embedding_proj.weight" else 1e-3
        assert (ours[n] - p.grad).abs().max().item() <= tol * p.grad.abs().max().item(), n


@pytest.mark.slow
def test_torch_compile_matches_eager():
    # train.py --compile=True and bench.py --gpu run the model through torch.compile (Inductor)
    model = small_model(max_seq_len=128).train()
    ids = tokens(batch=2, length=65)
    results = []
    for run in (model, torch.compile(model)):
        _, loss = run(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert abs(eager - compiled) <= 1e-5
    for n, g in eager_grads.items():
        assert (g - compiled_grads[n]).abs().max().item() <= 1e-5 * max(1.0, g.abs().max().item()), n


@pytest.mark.parametrize("size,expected", [("tiny", 11_282_784), ("small", 64_595_328),
                                           ("medium", 181_095_168), ("large", 569_808_384)])
def test_preset_parameter_counts(size, expected):
    g = runpy.run_path(os.path.join(ROOT, "config", f"pico_decoder_{size}.py"))
    cfg = ModelConfig(**{k: g[k] for k in ModelConfig.__dataclass_fields__ if k in g})
    with torch.device("meta"):
        model = PicoDecoder(cfg)
    assert model.num_params() == expected
    # FLOPs per token: 6 x (every Linear) + attention term, counted here from shapes by hand
    L, d, f, V, T = cfg.n_layers, cfg.d_model, cfg.activation_hidden_dim, cfg.vocab_size, cfg.max_seq_len
    kv = cfg.attention_n_kv_heads * cfg.head_dim
    matmul = L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * V
    assert model.flops_per_token() == 6 * matmul + 12 * L * d * T


@pytest.mark.parametrize("bad,message", [
    (dict(d_model=30), "divisible by attention_n_heads"),
    (dict(attention_n_kv_heads=3), "divisible by attention_n_kv_heads"),
    (dict(d_model=12, attention_n_heads=4, attention_n_kv_heads=2), "must be even"),
    (dict(n_layers=0), "positive integer"),
])
def test_bad_configs_fail_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, **bad})


def test_too_long_sequence_fails_clearly():
    model = small_model()
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        model(tokens(length=25))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(tokens(length=20), max_new_tokens=10)


def test_rope_tables_belong_to_each_model():
    a, b = PicoDecoder(ModelConfig(**SMALL)), PicoDecoder(ModelConfig(**{**SMALL, "d_model": 64}))
    assert a.rope_cos.shape == (24, 8) and b.rope_cos.shape == (24, 16)
    assert "rope_cos" not in a.state_dict()


def test_the_mfu_peak_is_the_most_specific_gpu_names():
    from model import gpu_peak_flops
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12,
             "NVIDIA GeForce RTX 4090": None, "Tesla V100-SXM2-16GB": None}
    assert {n: gpu_peak_flops(n) for n in names} == names


def test_both_reductions_and_no_head_gradient_change_no_other_number():
    # what a learning-dynamics capture asks for: the mean (which carries the gradient) with the
    # per-token losses of the same pass, and no gradient for the head's weight when it is not captured
    model = small_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 25))
    x, y = ids[:, :-1], ids[:, 1:]
    layers = [model.layers[0].attention.v_proj.weight, model.layers[1].swiglu.w_2.weight]
    _, loss = model(x, y)
    full = torch.autograd.grad(loss, layers + [model.de_embedding_proj.weight])
    _, (both, per_token) = model(x, y, reduction="both", head_grad=False, top1=True)
    assert torch.equal(both, loss) and not per_token["loss"].requires_grad
    with torch.no_grad():  # evaluation's numbers, to the bit
        apart = model(x, y, reduction="none", top1=True)[1]
    assert all(torch.equal(per_token[k], apart[k]) for k in ("loss", "top1"))
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(both, layers), full[:2], strict=True))
    assert not model.de_embedding_proj.weight.grad_fn and model.de_embedding_proj.weight.grad is None


def test_the_llama_reference_is_transformers_llama():
    """llama_logits, which why_not_llama holds the model to, against transformers' own Llama."""
    transformers = pytest.importorskip("transformers")
    model, ids = small_model(), tokens()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=97, max_position_embeddings=24, rms_norm_eps=1e-6, rope_theta=10000.0)).eval()
    names = _name_map(2)
    hf.load_state_dict({names[k]: v for k, v in model.state_dict().items()})
    with torch.no_grad():
        ref = llama_logits({names[k]: v for k, v in model.state_dict().items()}, model.config, ids)
        assert (ref - hf(ids).logits).abs().max().item() <= 1e-5


class WithPositionTable(PicoDecoder):  # a learner's change: a learned position table (a new weight)
    def __init__(self, config):
        super().__init__(config)
        self.position_emb = torch.nn.Embedding(config.max_seq_len, config.d_model)


class TiedHead(PicoDecoder):  # the output head shares the embedding: every weight still has a Llama name
    def __init__(self, config):
        super().__init__(config)
        self.de_embedding_proj.weight = self.embedding_proj.weight


def test_whether_the_model_is_llama_is_decided_by_what_it_computes(tmp_path, monkeypatch):
    import model as model_module
    config = ModelConfig(**SMALL)
    assert why_not_llama(PicoDecoder(config)) is None and why_not_llama(TiedHead(config)) is None
    assert "position_emb.weight have no name in transformers' Llama" in why_not_llama(WithPositionTable(config))

    class RMSNormInFP32(model_module.RMSNorm):  # the same maths, rounded through fp32: still Llama
        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

    class LayerNormWithoutBias(model_module.RMSNorm):
        def forward(self, x):
            return F.layer_norm(x, x.shape[-1:], self.weight, None, self.eps)

    class OtherEps(model_module.RMSNorm):
        def __init__(self, dim, eps):
            super().__init__(dim, 1e-5)  # the config says 1e-6

    def gelu_swiglu(self, x):
        return self.w_2(F.gelu(self.w_0(x)) * self.w_1(x))

    for norm, swiglu in ((LayerNormWithoutBias, None), (OtherEps, None), (None, gelu_swiglu)):
        with monkeypatch.context() as m:  # keeping every weight's name but not the maths is never Llama
            if norm:
                m.setattr(model_module, "RMSNorm", norm)
            if swiglu:
                m.setattr(model_module.SwiGLU, "forward", swiglu)
            why = why_not_llama(model_module.PicoDecoder(config))
        assert why and "its weights have Llama's names but it computes something else" in why, (norm, why)
    with monkeypatch.context() as m:
        m.setattr(model_module, "RMSNorm", RMSNormInFP32)
        assert why_not_llama(model_module.PicoDecoder(config)) is None
    with monkeypatch.context() as m:  # a norm removed: a Llama weight is missing
        m.setattr(model_module, "RMSNorm", lambda dim, eps: torch.nn.Identity())
        why = why_not_llama(model_module.PicoDecoder(config))
        assert "it lacks Llama's weights layers.0.attention_norm.weight" in why

    model = small_model()  # the check leaves the model and the random generators as they were
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    assert why_not_llama(model) is None
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("edit", ["gelu", "position_table"])
def test_a_model_that_is_not_llama_is_saved_in_its_own_format_and_loads_back(tmp_path, edit):
    transformers = pytest.importorskip("transformers")
    edited = import_file(edited_repo(tmp_path, edit) / "model.py", f"edited_model_{edit}")
    torch.manual_seed(0)
    model = edited.PicoDecoder(edited.ModelConfig(**SMALL)).eval()
    save_dir = str(tmp_path / "own")
    edited.save_pretrained(model, save_dir)  # decides the format itself: the model is not Llama
    config = json.load(open(tmp_path / "own" / "config.json"))
    assert config["model_type"] == "pico_decoder_own" and config["pico_decoder"] == SMALL | {
        "norm_eps": 1e-6, "position_emb_theta": 10000.0}
    assert (tmp_path / "own" / "model.py").read_text() == (tmp_path / f"repo-{edit}" / "model.py").read_text()
    loaded, ids = edited.load_pretrained(save_dir), tokens()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])
    with pytest.raises((ValueError, KeyError, OSError)):  # transformers does not take it for a Llama
        transformers.AutoModelForCausalLM.from_pretrained(save_dir)


def test_a_checkpoint_is_read_only_by_a_model_py_that_makes_its_weights(tmp_path):
    save_pretrained(WithPositionTable(ModelConfig(**SMALL)), str(tmp_path / "table"))  # a new weight: own format too
    with pytest.raises(ValueError, match=r"weights do not match this model.py's model \(it was written by the "
                                         r"model.py saved beside it\): missing \[\], unexpected \['position_emb"):
        load_pretrained(str(tmp_path / "table"))  # read with a model.py that lacks the table: said, not guessed
    save_pretrained(small_model(), str(tmp_path / "ok"))  # the unchanged model: every weight under its Llama name
    from safetensors.torch import load_file
    assert set(load_file(str(tmp_path / "ok" / "model.safetensors"))) == set(_name_map(2).values())
    assert not (tmp_path / "ok" / "model.py").exists()
