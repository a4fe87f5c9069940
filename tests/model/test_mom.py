from pathlib import Path

import pytest
import torch

from mom_train.config import ModelConfig, load_config
from mom_train.model import build_model, count_parameters
from mom_train.model.gated_deltanet import GatedDeltaNet
from mom_train.model.mom import MoMAttention
from mom_train.model.routing import route

HIDDEN = 32
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: extra threads only add synchronisation, which is slow on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def make_cfg(num_memories: int = 4, topk: int = 2, shared: bool = True, head_dim: int = 8, **kw) -> ModelConfig:
    return ModelConfig(hidden_size=HIDDEN, num_heads=2, head_dim=head_dim, num_memories=num_memories, topk=topk,
                       shared_memory=shared, kernel_backend="torch", **kw)


def make_layer(cfg: ModelConfig, unused_memory: bool = True) -> MoMAttention:
    """A layer whose router favours memory 0 and, with unused_memory, never picks the last memory (the
    inputs from `make_input` carry a constant 1 in feature 0 that the router weights read)."""
    layer = MoMAttention(cfg)
    with torch.no_grad():
        layer.router.weight[0, 0] += 0.5
        if unused_memory:
            layer.router.weight[-1, 0] -= 30.0
    return layer


def make_input(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(batch, length, HIDDEN, generator=torch.Generator().manual_seed(seed))
    x[..., 0] = 1.0
    return x


def run(layer: MoMAttention, impl: str, x: torch.Tensor, cu_seqlens: torch.Tensor | None, probe: torch.Tensor):
    """Forward + backward of sum(y * probe) + aux_loss; returns (y, aux, grads by name, x grad)."""
    layer.impl = impl
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y, _, aux = layer(x, cu_seqlens)
    ((y * probe).sum() + aux["aux_loss"]).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return y.detach(), aux, grads, x.grad.clone()


MOM_CASES = [
    pytest.param(dict(num_memories=4, topk=2, shared=True, head_dim=8), id="E4k2-shared-d8"),
    pytest.param(dict(num_memories=4, topk=2, shared=False, head_dim=16), id="E4k2-noshared-d16"),
    pytest.param(dict(num_memories=3, topk=1, shared=True, head_dim=16), id="E3k1-shared-d16"),
    pytest.param(dict(num_memories=3, topk=1, shared=False, head_dim=8), id="E3k1-noshared-d8"),
]
# packed documents: empty ones (zero-length segments) and single-token ones included
BOUNDS = [0, 1, 14, 14, 15, 40, 40, 71]


@pytest.mark.parametrize("projection", ["dense", "grouped"])
@pytest.mark.parametrize("case", MOM_CASES)
def test_fast_matches_reference_packed(case, projection):
    cfg = make_cfg(**case, mom_projection=projection)
    layer = make_layer(cfg)
    x = make_input(1, BOUNDS[-1])
    cu_seqlens = torch.tensor(BOUNDS, dtype=torch.int32)
    probe = torch.randn(1, BOUNDS[-1], HIDDEN)
    y_ref, aux_ref, grads_ref, dx_ref = run(layer, "reference", x, cu_seqlens, probe)
    y, aux, grads, dx = run(layer, "fast", x, cu_seqlens, probe)
    # the scenario: uneven routing with one memory that receives nothing
    assert aux["router_load"][-1] == 0 and aux["router_load"][0] > 1.2 / cfg.num_memories
    assert rel_err(y, y_ref) < 1e-5
    torch.testing.assert_close(aux["aux_loss"], aux_ref["aux_loss"])
    torch.testing.assert_close(aux["router_load"], aux_ref["router_load"])
    assert rel_err(dx, dx_ref) < 1e-5
    for name, grad_ref in grads_ref.items():
        assert rel_err(grads[name], grad_ref) < 1e-4, name
    # a memory without tokens gets no gradient in its projections
    key_dim = cfg.num_heads * cfg.head_dim
    assert grads["memory_kv_proj"][cfg.num_memories - 1, :key_dim].abs().max() == 0
    assert grads["memory_kv_proj"][0, :key_dim].abs().max() > 0


def test_fast_matches_reference_padded_batch():
    layer = make_layer(make_cfg(), unused_memory=False)
    x = make_input(3, 19, seed=1)
    probe = torch.randn(3, 19, HIDDEN)
    y_ref, aux_ref, grads_ref, dx_ref = run(layer, "reference", x, None, probe)
    y, aux, grads, dx = run(layer, "fast", x, None, probe)
    assert rel_err(y, y_ref) < 1e-5
    torch.testing.assert_close(aux["aux_loss"], aux_ref["aux_loss"])
    assert rel_err(dx, dx_ref) < 1e-5
    for name, grad_ref in grads_ref.items():
        assert rel_err(grads[name], grad_ref) < 1e-4, name


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_no_leak_across_time_streams_or_documents(impl):
    cfg = make_cfg()
    layer = make_layer(cfg, unused_memory=False)
    layer.impl = impl
    bounds = [0, 30, 31, 60]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    x = make_input(1, 60, seed=2)
    t = 17
    x2 = x.clone()
    x2[0, t, 1:] += 3.0 * torch.randn(HIDDEN - 1)
    with torch.no_grad():
        y, y2 = layer(x, cu_seqlens)[0], layer(x2, cu_seqlens)[0]
    diff = (y - y2).abs().amax(-1)[0]  # [T]
    assert diff[:t].max() < 1e-6
    assert diff[t] > 1e-3
    # the other documents see nothing of it
    assert diff[30:].max() < 1e-6


def test_fast_path_is_sync_free_on_meta():
    # meta tensors carry no data: a host sync or data-dependent shape anywhere in forward or backward raises
    cfg = make_cfg()
    with torch.device("meta"):
        layer = MoMAttention(cfg)
        x = torch.empty(1, 50, HIDDEN, requires_grad=True)
        cu_seqlens = torch.empty(5, dtype=torch.int32)
        y, cache, aux = layer(x, cu_seqlens, use_cache=True)
        (y.sum() + aux["aux_loss"]).backward()
        assert cache.recurrent.shape == (4, 5, 2, 8, 8)
        assert all(c.shape == (4, 5, 16, 3) for c in cache.conv)
        assert layer.memory_kv_proj.grad.shape == layer.memory_kv_proj.shape
        # the reference path syncs (it reads cu_seqlens on the host), so the check can tell them apart
        layer.impl = "reference"
        with pytest.raises((NotImplementedError, RuntimeError)):
            layer(x, cu_seqlens)


def test_single_memory_equals_gated_deltanet():
    cfg = make_cfg(num_memories=1, topk=1, shared=False, head_dim=16)
    mom, gdn = MoMAttention(cfg), GatedDeltaNet(cfg)
    with torch.no_grad():
        mom.memory_kv_proj[0].copy_(torch.cat([gdn.k_proj.weight, gdn.v_proj.weight]))
        mom.memory_ba_proj[0].copy_(torch.cat([gdn.b_proj.weight, gdn.a_proj.weight]))
        for name in ("q_proj", "g_proj", "o_proj", "q_conv1d", "k_conv1d", "v_conv1d", "o_norm"):
            getattr(mom, name).load_state_dict(getattr(gdn, name).state_dict())
        mom.A_log.copy_(gdn.A_log)
        mom.dt_bias.copy_(gdn.dt_bias)
    x = make_input(1, 45, seed=3)
    cu_seqlens = torch.tensor([0, 20, 20, 21, 45], dtype=torch.int32)
    y_gdn = gdn(x, cu_seqlens)[0]
    for impl in ("fast", "reference"):
        mom.impl = impl
        y, _, aux = mom(x, cu_seqlens)
        assert rel_err(y, y_gdn) < 1e-5, impl
        torch.testing.assert_close(aux["aux_loss"], torch.tensor(1.0))


def decode_stepwise(layer, x: torch.Tensor, prefix: int):
    """Prefill x[:, :prefix] with a cache, then feed one token at a time; returns y [B, T, D]. Checks that
    memories not chosen by a token keep their states exactly."""
    y, cache, _ = layer(x[:, :prefix], use_cache=True)
    outputs = [y]
    for t in range(prefix, x.shape[1]):
        chosen = route(layer.router(x[:, t]), layer.topk).topk_idx  # [B, k]
        y, new_cache, _ = layer(x[:, t:t + 1], cache=cache, use_cache=True)
        for b in range(x.shape[0]):
            for e in range(layer.num_memories):
                if e not in chosen[b].tolist():
                    assert torch.equal(new_cache.recurrent[b, e], cache.recurrent[b, e])
                    for old, new in zip(cache.conv, new_cache.conv):
                        assert torch.equal(new[b, e], old[b, e])
        outputs.append(y)
        cache = new_cache
    return torch.cat(outputs, 1)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("case", MOM_CASES[:3])
def test_layer_prefill_and_decode_match_full_forward(impl, case):
    layer = make_layer(make_cfg(**case))
    layer.impl = impl
    x = make_input(2, 21, seed=4)
    with torch.no_grad():
        y_full, cache_full, _ = layer(x, use_cache=True)
        # memories nobody used stay at their initial (zero) state
        assert cache_full.recurrent[:, layer.num_memories - 1].abs().max() == 0
        assert all(c[:, layer.num_memories - 1].abs().max() == 0 for c in cache_full.conv)
        y_step = decode_stepwise(layer, x, prefix=5)
        y_a, cache_a, _ = layer(x[:, :9], use_cache=True)
        y_b, cache_b, _ = layer(x[:, 9:], cache=cache_a, use_cache=True)
    assert rel_err(y_step, y_full) < 1e-5
    assert rel_err(torch.cat([y_a, y_b], 1), y_full) < 1e-5
    assert rel_err(cache_b.recurrent, cache_full.recurrent) < 1e-5
    for c_b, c_full in zip(cache_b.conv, cache_full.conv):
        assert rel_err(c_b, c_full) < 1e-5


def test_packed_prefill_continues_per_document():
    # prefill packed documents (one empty), then decode each document's next token as a batch row
    layer = make_layer(make_cfg(), unused_memory=False)
    bounds = [0, 11, 11, 18]
    tails = make_input(3, 4, seed=6)
    docs = [make_input(1, 11, seed=7), make_input(1, 0, seed=7), make_input(1, 7, seed=8)]
    with torch.no_grad():
        for impl in ("fast", "reference"):
            layer.impl = impl
            _, cache, _ = layer(torch.cat(docs, 1), torch.tensor(bounds, dtype=torch.int32), use_cache=True)
            y_next, _, _ = layer(tails, cache=cache, use_cache=True)  # [3, 4, D]
            for n, doc in enumerate(docs):
                y_alone, _, _ = layer(torch.cat([doc, tails[n:n + 1]], 1))
                assert rel_err(y_next[n], y_alone[0, doc.shape[1]:]) < 1e-5, (impl, n)


def tiny_model_cfg(impl: str = "fast", **kw) -> ModelConfig:
    return ModelConfig(arch="mom", hidden_size=HIDDEN, num_layers=2, num_heads=2, head_dim=8, num_memories=4,
                       topk=2, hidden_ratio=2, vocab_size=64, kernel_backend="torch", mom_impl=impl, **kw)


def test_causal_lm_fast_matches_reference_and_decodes():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg())
    ids = torch.randint(0, 64, (1, 40))
    cu_seqlens = torch.tensor([0, 13, 13, 14, 40], dtype=torch.int32)
    out = model(ids, cu_seqlens=cu_seqlens, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for block in model.layers:
        block.mixer.impl = "reference"
    ref = model(ids, cu_seqlens=cu_seqlens, labels=ids)
    ref.loss.backward()
    assert rel_err(out.logits, ref.logits) < 1e-5
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert out.router_load.shape == (2, 4)
    for name, p in model.named_parameters():
        assert rel_err(grads[name], p.grad) < 1e-4, name
    # prefill + decode and two chunks equal the full forward (fast path)
    for block in model.layers:
        block.mixer.impl = "fast"
    batch = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        full = model(batch).logits
        step = model(batch[:, :6], use_cache=True)
        logits = [step.logits]
        for t in range(6, 17):
            step = model(batch[:, t:t + 1], cache=step.cache, use_cache=True)
            logits.append(step.logits)
        first = model(batch[:, :10], use_cache=True)
        second = model(batch[:, 10:], cache=first.cache, use_cache=True)
    assert rel_err(torch.cat(logits, 1), full) < 1e-5
    assert rel_err(torch.cat([first.logits, second.logits], 1), full) < 1e-5
    generated = model.generate(batch[:, :6], max_new_tokens=5, temperature=0)
    greedy = batch[:, :6]
    with torch.no_grad():
        for _ in range(5):
            greedy = torch.cat([greedy, model(greedy).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, greedy)


def test_tiny_mom_overfits_fixed_batch():
    """AdamW on one fixed packed batch drives the loss below a tenth of its start within 300 steps."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg())
    ids = torch.randint(0, 64, (1, 64))
    cu_seqlens = torch.tensor([0, 40, 64], dtype=torch.int32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(300):
        loss = model(ids, cu_seqlens=cu_seqlens, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
        # the aux loss (coef 0.01, >= topk * 0.01) bounds how far the total can fall; stop once clearly there
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item())


def mom_parameters_by_hand(hidden: int, hidden_ratio: int, heads: int = 4, head_dim: int = 256, memories: int = 4,
                           layers: int = 24, vocab: int = 32000) -> int:
    """Parameters of a paper MoM config from MOM_SPEC.md (expand_v 1, shared memory, conv 4, tied embedding).

    Per layer: q, g (output gate), o projections 3 x D x HK; k and v of the E memories and the shared one
    2 x (E + 1) x D x HK; their beta and decay projections 2 x (E + 1) x D x H; router D x E; q/k/v short
    convs 3 x HK x 4; A_log and dt_bias 2 x H; the output RMSNorm over one head (head_dim); two block norms
    2 x D; SwiGLU 3 x D x I with I = D * hidden_ratio * 2/3 rounded up to a multiple of 256. Plus the
    embedding (tied to the head) V x D and the final norm D.
    """
    key_dim = heads * head_dim
    streams = memories + 1
    # ceil(D * ratio * 2/3 / 256) * 256
    mlp = -(-hidden * hidden_ratio * 2 // (3 * 256)) * 256
    per_layer = (3 * hidden * key_dim + 2 * streams * hidden * key_dim + 2 * streams * hidden * heads
                 + hidden * memories + 3 * key_dim * 4 + 2 * heads + head_dim + 2 * hidden + 3 * hidden * mlp)
    return layers * per_layer + vocab * hidden + hidden


@pytest.mark.parametrize("name,hidden,hidden_ratio,millions", [("mom_340m", 1024, 3, 512.4),
                                                               ("mom_1.3b", 2048, 4, 1552.9)],
                         ids=["mom_340m", "mom_1.3b"])
def test_paper_configs_parameter_count(name, hidden, hidden_ratio, millions):
    """The paper configs' parameter counts equal the count derived from the spec (and the README's figure)."""
    total = mom_parameters_by_hand(hidden, hidden_ratio)
    counts = count_parameters(load_config(CONFIGS / f"{name}.yaml").model)
    assert counts["total"] == total
    assert round(total / 1e6, 1) == millions


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fast_matches_reference_on_gpu(backend):
    # real head size, packed documents with empty ones; fp32 so the two paths agree tightly
    cfg = ModelConfig(hidden_size=256, num_heads=2, head_dim=128, num_memories=4, topk=2, kernel_backend=backend)
    layer = MoMAttention(cfg).cuda()
    bounds = [0, 100, 100, 101, 300, 300, 517]
    x = torch.randn(1, bounds[-1], 256, device="cuda")
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    probe = torch.randn_like(x)
    y_ref, aux_ref, grads_ref, dx_ref = run(layer, "reference", x, cu_seqlens, probe)
    y, aux, grads, dx = run(layer, "fast", x, cu_seqlens, probe)
    assert rel_err(y, y_ref) < 1e-4
    torch.testing.assert_close(aux["aux_loss"], aux_ref["aux_loss"])
    assert rel_err(dx, dx_ref) < 1e-4
    for name, grad_ref in grads_ref.items():
        assert rel_err(grads[name], grad_ref) < 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_prefill_and_decode_on_gpu(backend):
    cfg = ModelConfig(hidden_size=256, num_heads=2, head_dim=128, num_memories=4, topk=2, kernel_backend=backend)
    layer = MoMAttention(cfg).cuda()
    x = torch.randn(3, 90, 256, device="cuda")
    with torch.no_grad():
        y_full, _, _ = layer(x)
        y_step = decode_stepwise(layer, x, prefix=70)
    assert rel_err(y_step, y_full) < 1e-4


def test_auto_projection_is_dense_off_hopper():
    layer = MoMAttention(make_cfg(mom_projection="auto"))
    assert layer._projection(torch.zeros(1, HIDDEN)) == "dense"
    assert MoMAttention(make_cfg(mom_projection="grouped"))._projection(torch.zeros(1, HIDDEN)) == "grouped"


def fill_free_cuda_memory_with_nan() -> None:
    """NaN-fill blocks that the caching allocator then hands out again: unwritten output rows show as NaN."""
    small = [torch.full((1 << 18,), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(32)]
    large = torch.full((1 << 26,), float("nan"), device="cuda", dtype=torch.bfloat16)
    del small, large


@pytest.mark.gpu
def test_grouped_projection_matches_dense_gpu():
    """Under bf16 autocast on CUDA the grouped k/v GEMM (torch's grouped kernel over each stream's rows) gives
    what the dense GEMM + row gather gives, on packed documents with empty and single-token ones and a
    memory without tokens; twice over NaN-filled free memory, so a row the kernel leaves unwritten shows.
    (fp32 fast vs reference on the GPU: test_fast_matches_reference_on_gpu; bf16 routing may pick other
    memories than fp32, so bf16 is compared within the fast path.)"""
    bounds = [0, 1, 14, 14, 15, 140, 140, 333]
    x = torch.randn(1, bounds[-1], 128, device="cuda")
    x[..., 0] = 1.0
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    probe = torch.randn(1, bounds[-1], 128, device="cuda")
    results = {}
    for projection in ("dense", "grouped", "grouped"):
        cfg = ModelConfig(hidden_size=128, num_heads=2, head_dim=64, num_memories=4, topk=2, shared_memory=True,
                          kernel_backend="auto", mom_projection=projection)
        torch.manual_seed(0)
        layer = make_layer(cfg).cuda()
        fill_free_cuda_memory_with_nan()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(layer, "fast", x, cu_seqlens, probe)
        assert layer._projection(x) == projection
        results.setdefault(projection, []).append(out)
    (y_d, aux_d, grads_d, dx_d), = results["dense"]
    assert aux_d["router_load"][-1] == 0, "the scenario needs a memory without tokens"
    for y, aux, grads, dx in results["grouped"]:
        assert rel_err(y.float(), y_d.float()) < 1e-2
        torch.testing.assert_close(aux["router_load"], aux_d["router_load"])
        assert rel_err(dx.float(), dx_d.float()) < 2e-2
        for name, grad_d in grads_d.items():
            assert torch.isfinite(grads[name]).all(), name
            assert rel_err(grads[name].float(), grad_d.float()) < 2e-2, name
    first, second = results["grouped"]
    assert torch.equal(first[0], second[0]) and torch.equal(first[3], second[3]), "depends on unwritten memory"


def test_grouped_linear_rejects_strided_offsets():
    from mom_train.model.mom import grouped_linear

    cu = torch.tensor([0, 3, 5, 5, 9, 12, 14], dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        grouped_linear(torch.randn(14, 8), torch.randn(3, 4, 8), cu[2::2])
