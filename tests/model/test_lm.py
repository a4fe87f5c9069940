"""CausalLM tests over every arch: packed documents stay apart, caches continue exactly, loss masking, generate."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mom_train.config import ModelConfig
from mom_train.model import CausalLM, ModelOutput, build_model
from mom_train.loss import shift_labels

ARCHS = ["gated_deltanet", "transformer", "mom"]
RECURRENT = [a for a in ARCHS if a != "transformer"]
VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread():
    # these tiny models run thousands of small ops; extra threads only add contention on a shared machine
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def tiny_config(arch: str) -> ModelConfig:
    # a larger init_std than in training so every token visibly moves the outputs
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, vocab_size=VOCAB,
                      hidden_ratio=2, init_std=0.2, kernel_backend="torch")
    if arch == "gated_deltanet":
        cfg.expand_v = 2
    return cfg


def gpu_config(arch: str) -> ModelConfig:
    # heads of 64 (the triton kernels' common tile) on the GPU; triton picks the kernel backend
    return dataclasses.replace(tiny_config(arch), hidden_size=128, head_dim=64, kernel_backend="auto")


def tiny_model(arch: str) -> CausalLM:
    return build_model(tiny_config(arch)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def packed(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return torch.randint(0, VOCAB, (1, sum(lengths))), cu


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_equal_separate_runs(arch: str):
    model = tiny_model(arch)
    lengths = [5, 0, 1, 9, 7]
    ids, cu = packed(lengths)
    logits = model(ids, cu_seqlens=cu).logits
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        if b > a:
            alone = model(ids[:, a:b]).logits
            assert rel_err(logits[:, a:b], alone) < 1e-5, f"document {n}"


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_a_token_touches_only_its_document_from_there_on(arch: str):
    model = tiny_model(arch)
    ids, cu = packed([6, 8, 5])
    changed = ids.clone()
    pos = 9  # inside the second document [6, 14)
    changed[0, pos] = (ids[0, pos] + 1) % VOCAB
    before = model(ids, cu_seqlens=cu).logits[0]
    after = model(changed, cu_seqlens=cu).logits[0]
    diff = (after - before).abs().amax(-1)  # [T]
    scale = before.abs().max()
    untouched = torch.ones(ids.shape[1], dtype=torch.bool)
    untouched[pos:14] = False
    assert diff[untouched].max() < 1e-6 * scale
    assert diff[pos] > 1e-2 * scale
    assert diff[pos + 1:14].min() > 1e-6 * scale


@pytest.mark.parametrize("arch", ARCHS)
def test_full_forward_equals_prefill_and_decode(arch: str):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (2, 12))
    full = model(ids).logits

    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, 12):
        out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1), full) < 1e-5

    first = model(ids[:, :7], use_cache=True)
    second = model(ids[:, 7:], cache=first.cache, use_cache=True)
    assert rel_err(torch.cat((first.logits, second.logits), 1), full) < 1e-5


@pytest.mark.parametrize("arch", RECURRENT)
def test_packed_prefill_cache_continues_each_document(arch: str):
    model = tiny_model(arch)
    lengths = [4, 0, 6, 3]
    ids, cu = packed(lengths)
    out = model(ids, cu_seqlens=cu, use_cache=True)
    # one more token per document, decoded as a batch of N rows from the packed cache
    nxt = torch.randint(0, VOCAB, (len(lengths), 1))
    step = model(nxt, cache=out.cache, use_cache=True).logits[:, -1]
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        alone = model(torch.cat((ids[:, a:b], nxt[n:n + 1]), 1)).logits[:, -1]
        assert rel_err(step[n:n + 1], alone) < 1e-5, f"document {n}"


def test_shift_labels_drops_boundaries_and_ignored():
    labels = torch.tensor([[10, 11, 12, -100, 14, 15, 16]])
    cu = torch.tensor([0, 3, 3, 5, 7], dtype=torch.int32)
    # t=2 and t=4 precede a document start; the -100 at index 3 hides the target of t=2 anyway
    expected = torch.tensor([[11, 12, -100, 14, -100, 16, -100]])
    assert torch.equal(shift_labels(labels, cu), expected)
    assert torch.equal(shift_labels(labels), torch.tensor([[11, 12, -100, 14, 15, 16, -100]]))


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_counts_only_targets_inside_documents(arch: str):
    model = tiny_model(arch)
    lengths = [5, 0, 1, 8, 6]
    ids, cu = packed(lengths)
    labels = ids.clone()
    labels[0, [2, 12]] = -100
    out = model(ids, cu_seqlens=cu, labels=labels)
    assert isinstance(out, ModelOutput)

    loss_sum, count = torch.zeros(()), 0
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        if b == a:
            continue
        logits = model(ids[:, a:b]).logits[0]
        for t in range(a, b - 1):
            if labels[0, t + 1] != -100:
                loss_sum = loss_sum + F.cross_entropy(logits[t - a], labels[0, t + 1])
                count += 1
    assert out.num_valid.dtype == torch.long and out.num_valid.item() == count
    assert out.loss_sum.dtype == torch.float32
    assert rel_err(out.loss_sum, loss_sum) < 1e-5
    expected = loss_sum / count + model.config.aux_loss_coef * out.aux_loss
    assert rel_err(out.loss, expected) < 1e-5
    if arch == "mom":
        assert out.router_load.shape == (2, model.config.num_memories)
        assert out.aux_loss.item() > 0
    else:
        assert out.router_load is None and out.aux_loss.item() == 0

    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_the_same_gradients(arch: str):
    model = tiny_model(arch).train()
    ids, cu = packed([7, 0, 9])
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(ids, cu_seqlens=cu, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        assert rel_err(recomputed, plain) < 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_greedy_equals_repeated_full_forward(arch: str):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (2, 5))
    got = model.generate(ids, max_new_tokens=6, temperature=0)
    expected = ids
    for _ in range(6):
        nxt = model(expected).logits[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat((expected, nxt), 1)
    assert torch.equal(got, expected)
    # top-k 1 and a tiny nucleus are greedy too
    assert torch.equal(model.generate(ids, 6, temperature=1.0, top_k=1), expected)
    assert torch.equal(model.generate(ids, 6, temperature=1.0, top_p=1e-6), expected)


def allowed_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution by definition, in fp64, logits [B, V] -> probs [B, V]: softmax of
    logits / temperature restricted to the top_k largest logits (0: all), then to the smallest set of the
    most probable of those whose probability reaches top_p, renormalised."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(-1, descending=True)
    ranked = probs.gather(-1, order)
    if top_k:
        ranked[:, top_k:] = 0
    ranked = ranked / ranked.sum(-1, keepdim=True)
    # a token stays when the tokens ranked above it hold less than top_p
    above = ranked.cumsum(-1) - ranked
    ranked = torch.where(above < top_p, ranked, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, ranked / ranked.sum(-1, keepdim=True))


SAMPLING = [
    pytest.param(1.0, 5, 1.0, id="top-k-5"),
    pytest.param(1.0, 0, 0.6, id="top-p-0.6"),
    pytest.param(1.5, 20, 0.9, id="temperature-1.5-top-k-20-top-p-0.9"),
    pytest.param(0.5, 0, 0.8, id="temperature-0.5-top-p-0.8"),
]


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING)
def test_generate_samples_from_the_top_k_top_p_distribution(temperature, top_k, top_p):
    """Every sampled token lies in the top-k / top-p set of its own prefix's logits (full forward, no cache);
    and the first token, drawn for many rows with the same prompt, follows the definition's distribution."""
    model = tiny_model("gated_deltanet")
    num_rows, num_new = 2000, 3
    prompt = torch.randint(0, VOCAB, (1, 4))
    out = model.generate(prompt.expand(num_rows, -1), num_new, temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out[:, :4], prompt.expand(num_rows, -1))
    with torch.no_grad():
        logits = model(out[:, :-1]).logits  # [B, 4 + num_new - 1, V]
    for step in range(num_new):
        dist = allowed_distribution(logits[:, 3 + step], temperature, top_k, top_p)
        sampled = out[:, 4 + step]
        outside = dist.gather(1, sampled[:, None])[:, 0] == 0
        assert not outside.any(), f"step {step}: {int(outside.sum())} tokens outside the top-k / top-p set"
    # the first token: empirical frequencies within 5 standard errors of the definition's probabilities
    want = allowed_distribution(logits[:1, 3], temperature, top_k, top_p)[0]
    got = torch.bincount(out[:, 4], minlength=VOCAB).double() / num_rows
    bound = 5 * (want * (1 - want) / num_rows).sqrt() + 1e-9
    assert (want > 0).sum() >= 2, "the set should leave a choice"
    off = (got - want).abs() > bound
    assert not off.any(), f"first token: frequencies {got[off].tolist()}, by definition {want[off].tolist()}"


def test_generate_is_seeded_and_stops_at_eos():
    """The same generator seed gives the same samples; a row that emitted eos keeps emitting it."""
    model = tiny_model("gated_deltanet")
    ids = torch.randint(0, VOCAB, (2, 4))
    a = model.generate(ids, 8, temperature=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(ids, 8, temperature=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 12) and torch.equal(a[:, :4], ids)
    greedy = model.generate(ids, 8, temperature=0)
    # row 0 stops at once: its first new token is the eos id
    eos = greedy[0, 4].item()
    got = model.generate(ids, 8, temperature=0, eos_token_id=eos)
    assert torch.equal(got[0, 4:], torch.full((8,), eos))
    hit = (greedy[1, 4:] == eos).nonzero()
    stop = hit[0, 0].item() + 1 if len(hit) else 8
    assert torch.equal(got[1, 4:4 + stop], greedy[1, 4:4 + stop])
    assert bool((got[1, 4 + stop:] == eos).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_build_then_init_weights(arch: str):
    cfg = tiny_config(arch)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert abs(model.embed.weight.std().item() - cfg.init_std) < 0.1 * cfg.init_std
    assert bool((model.norm.weight == 1).all()) and bool((model.layers[0].attn_norm.weight == 1).all())
    ids = torch.randint(0, VOCAB, (1, 6))
    assert bool(torch.isfinite(model(ids).logits).all())


def test_untied_head_and_bad_inputs():
    cfg = tiny_config("gated_deltanet")
    cfg.tie_embeddings = False
    model = build_model(cfg)
    assert model.lm_head is not None and model.head_weight is model.lm_head.weight
    assert model.head_weight.data_ptr() != model.embed.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (2, 6))
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="packed"):
        model(ids, cu_seqlens=cu)
    with pytest.raises(ValueError, match="int32"):
        model(ids.reshape(1, 12), cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="cu_seqlens"):
        tiny_model("transformer")(ids.reshape(1, 12), cu_seqlens=cu, use_cache=True)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", RECURRENT)
def test_triton_backend_matches_torch_backend(arch: str):
    model = build_model(gpu_config(arch)).cuda()
    ids, cu = packed([70, 0, 1, 130, 55])
    ids, cu = ids.cuda(), cu.cuda()
    results = []
    for backend in ("torch", "triton"):
        for layer in model.layers:
            layer.mixer.kernel_backend = backend
        model.zero_grad()
        out = model(ids, cu_seqlens=cu, labels=ids)
        out.loss.backward()
        # training on CUDA uses the fused head + cross entropy, so there are no logits to compare: the loss
        # and every gradient are
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (loss_t, grads_t) = results
    assert rel_err(loss_t, loss) < 1e-4
    for g, g_t in zip(grads, grads_t):
        assert rel_err(g_t, g) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_has_no_host_sync(arch: str):
    model = build_model(gpu_config(arch)).cuda()
    ids, cu = packed([70, 0, 1, 130, 55])
    ids, cu = ids.cuda(), cu.cuda()


    def step() -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(ids, cu_seqlens=cu, labels=ids).loss
        loss.backward()
        return loss

    # warm up (triton compiles and caches its kernels) before checking
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(loss))
