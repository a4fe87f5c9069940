import pytest
import torch

from mom_train.model.routing import build_stream_plan, load_balance_loss, route


def random_topk(num_tokens: int, num_memories: int, topk: int, generator: torch.Generator) -> torch.Tensor:
    """Distinct memory choices per token, [L, k] long."""
    scores = torch.rand(num_tokens, num_memories, generator=generator)
    return scores.topk(topk, -1).indices


def expected_layout(topk_idx: torch.Tensor, bounds: list[int], num_memories: int, shared: bool):
    """The buffer written out by hand: per stream, per document, the stream's tokens in time order."""
    num_streams = num_memories + int(shared)
    src, cu = [], [0]
    for stream in range(num_streams):
        for n in range(len(bounds) - 1):
            for t in range(bounds[n], bounds[n + 1]):
                if stream == num_memories or stream in topk_idx[t].tolist():
                    src.append(t * num_streams + stream)
            cu.append(len(src))
    return torch.tensor(src, dtype=torch.long), torch.tensor(cu, dtype=torch.int32)


LAYOUTS = [
    pytest.param([0, 9, 9, 10, 23, 23], id="empty-and-single-token-docs"),
    pytest.param([0, 17], id="one-doc"),
    pytest.param([0, 0, 1, 2, 3], id="leading-empty-single-tokens"),
    pytest.param([0, 12, 12], id="trailing-empty"),
]


@pytest.mark.parametrize("bounds", LAYOUTS)
@pytest.mark.parametrize("num_memories,topk", [(4, 2), (3, 1), (4, 4)], ids=["E4k2", "E3k1", "E4k4"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "no-shared"])
def test_stream_plan_matches_hand_layout(bounds, num_memories, topk, shared):
    generator = torch.Generator().manual_seed(len(bounds) * 10 + num_memories + topk)
    num_tokens = bounds[-1]
    topk_idx = random_topk(num_tokens, num_memories, topk, generator)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    plan = build_stream_plan(topk_idx, cu_seqlens, num_memories, shared)
    src, cu = expected_layout(topk_idx, bounds, num_memories, shared)
    num_docs = len(bounds) - 1
    assert plan.cu_seqlens.dtype == torch.int32
    assert plan.cu_seqlens.numel() == (num_memories + int(shared)) * num_docs + 1
    assert plan.src.numel() == num_tokens * (topk + int(shared))
    assert torch.equal(plan.cu_seqlens, cu)
    assert torch.equal(plan.src, src)
    # every routed slot points at the buffer row that holds it
    S = plan.num_streams
    token = torch.arange(num_tokens)[:, None]
    assert torch.equal(plan.src[plan.dest], token * S + topk_idx)


def test_stream_plan_keeps_time_order_under_skewed_routing():
    # almost every token goes to memory 2 first: its segment must still be in time order
    generator = torch.Generator().manual_seed(1)
    topk_idx = random_topk(200, 4, 2, generator)
    topk_idx[:, 0] = torch.where(topk_idx[:, 1] == 2, topk_idx[:, 0], torch.full_like(topk_idx[:, 0], 2))
    bounds = [0, 70, 70, 200]
    plan = build_stream_plan(topk_idx, torch.tensor(bounds, dtype=torch.int32), 4, True)
    token = plan.src // plan.num_streams
    for n in range(plan.cu_seqlens.numel() - 1):
        seg = token[plan.cu_seqlens[n]:plan.cu_seqlens[n + 1]]
        assert torch.all(seg[1:] > seg[:-1])


def test_routing_is_sync_free_on_meta():
    # meta tensors have no data: any host sync or data-dependent shape would raise here
    logits = torch.empty(40, 4, device="meta")
    routing = route(logits, 2)
    plan = build_stream_plan(routing.topk_idx, torch.empty(6, dtype=torch.int32, device="meta"), 4, True)
    assert plan.src.shape == (40 * 3,)
    assert plan.cu_seqlens.shape == (5 * 5 + 1,)
    assert plan.dest.shape == (40, 2)


def test_route_renormalises_and_passes_gradients():
    logits = torch.randn(30, 5, requires_grad=True)
    routing = route(logits, 3)
    probs = logits.softmax(-1)
    assert torch.equal(routing.topk_idx, probs.topk(3, -1).indices)
    torch.testing.assert_close(routing.topk_weight.sum(-1), torch.ones(30))
    torch.testing.assert_close(routing.topk_weight, probs.gather(1, routing.topk_idx)
                               / probs.gather(1, routing.topk_idx).sum(-1, keepdim=True))
    torch.testing.assert_close(routing.load.sum(), torch.tensor(1.0))
    (routing.topk_weight[:, 0].sum() + routing.aux_loss).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def cyclic_logits(num_tokens: int, num_memories: int, topk: int) -> torch.Tensor:
    """Token t prefers memories t, t+1, ..., t+k-1 (mod E), with the same profile shifted: balanced."""
    profile = torch.linspace(3.0, 0.0, num_memories)
    return torch.stack([profile.roll(t % num_memories) for t in range(num_tokens)])


@pytest.mark.parametrize("num_memories,topk", [(4, 2), (3, 1), (4, 1), (5, 3)])
def test_aux_loss_is_topk_when_balanced_and_larger_otherwise(num_memories, topk):
    logits = cyclic_logits(4 * num_memories, num_memories, topk)
    routing = route(logits, topk)
    torch.testing.assert_close(routing.load, torch.full((num_memories,), 1.0 / num_memories))
    torch.testing.assert_close(routing.aux_loss, torch.tensor(float(topk)))
    # uniform probabilities with uniform routing, built directly
    probs = torch.full((num_memories, num_memories), 1.0 / num_memories)
    topk_idx = torch.stack([torch.arange(t, t + topk) % num_memories for t in range(num_memories)])
    aux, _ = load_balance_loss(probs, topk_idx)
    torch.testing.assert_close(aux, torch.tensor(float(topk)))
    # every token prefers the same memories: loss grows
    skewed = route(logits[:1].expand(4 * num_memories, -1), topk)
    assert skewed.aux_loss > topk + 0.1


def chosen_weights_fp64(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition in fp64: the k largest logits, weights = softmax over those k (the renormalised top-k
    probabilities). Returns (idx [L, k], weights [L, k])."""
    idx = logits.double().argsort(-1, descending=True)[:, :topk]
    chosen = logits.double().gather(1, idx)
    weights = (chosen - chosen.max(-1, keepdim=True).values).exp()
    return idx, weights / weights.sum(-1, keepdim=True)


def weights_grad_fp64(logits: torch.Tensor, topk: int, cotangent: torch.Tensor) -> torch.Tensor:
    """d <weights, cotangent> / d logits: w_j (c_j - sum_i c_i w_i) at each chosen logit, 0 elsewhere."""
    idx, weights = chosen_weights_fp64(logits, topk)
    c = cotangent.double()
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    return grad.scatter(1, idx, weights * (c - (c * weights).sum(-1, keepdim=True)))


def aux_loss_fp64(logits: torch.Tensor, topk: int) -> tuple[float, torch.Tensor]:
    """The balance loss A = E * sum_e f_e P_e (f_e: chosen slots of e per token, constant; P_e: mean
    probability of e) and its gradient dA/dl_te = E / L * p_te * (f_e - sum_m f_m p_tm)."""
    num_tokens, num_memories = logits.shape
    probs = logits.double().softmax(-1)
    idx, _ = chosen_weights_fp64(logits, topk)
    f = torch.zeros(num_memories, dtype=torch.float64).index_add_(
        0, idx.flatten(), torch.ones(idx.numel(), dtype=torch.float64)) / num_tokens
    loss = num_memories * float((f * probs.mean(0)).sum())
    grad = num_memories / num_tokens * probs * (f - (probs * f).sum(-1, keepdim=True))
    return loss, grad


def router_logits(kind: str, num_tokens: int, num_memories: int, generator: torch.Generator) -> torch.Tensor:
    """balanced: random per-token logits whose ranking cycles through the memories (every memory gets the
    same share of every choice); skewed: memory 0 strongly preferred, the last one avoided."""
    scores = torch.randn(num_tokens, num_memories, generator=generator)
    if kind == "balanced":
        ranked = scores.sort(-1, descending=True).values
        return torch.stack([row.roll(t % num_memories) for t, row in enumerate(ranked)])
    return scores + torch.linspace(3.0, -3.0, num_memories)


@pytest.mark.parametrize("kind", ["balanced", "skewed"])
@pytest.mark.parametrize("topk", [1, 2], ids=["top1", "top2"])
def test_router_gradients_match_fp64_definition(kind, topk):
    """route(): the top-k weights, the balance loss and the gradient of each w.r.t. the router logits equal
    the fp64 definitions above (the weights' gradient is 0 for top-1: they are all 1)."""
    num_tokens, num_memories = 64, 4
    generator = torch.Generator().manual_seed(topk * 10 + len(kind))
    logits = router_logits(kind, num_tokens, num_memories, generator)
    cotangent = torch.randn(num_tokens, topk, generator=generator)
    idx, weights = chosen_weights_fp64(logits, topk)
    aux_want, aux_grad_want = aux_loss_fp64(logits, topk)

    leaf = logits.clone().requires_grad_(True)
    routing = route(leaf, topk)
    assert torch.equal(routing.topk_idx, idx)
    load = torch.full((num_memories,), 1.0 / num_memories)
    assert torch.allclose(routing.load, load) == (kind == "balanced"), routing.load
    torch.testing.assert_close(routing.topk_weight.double(), weights, rtol=1e-6, atol=1e-7)
    assert abs(routing.aux_loss.item() - aux_want) <= 1e-6 * aux_want
    (weights_grad,) = torch.autograd.grad((routing.topk_weight * cotangent).sum(), leaf, retain_graph=True)
    torch.testing.assert_close(weights_grad.double(), weights_grad_fp64(logits, topk, cotangent),
                               rtol=1e-5, atol=1e-7, msg=lambda m: f"top-k weights' gradient: {m}")
    assert routing.aux_loss.requires_grad, "the balance loss carries no gradient to the router logits"
    (aux_grad,) = torch.autograd.grad(routing.aux_loss, leaf)
    torch.testing.assert_close(aux_grad.double(), aux_grad_want, rtol=1e-5, atol=1e-8,
                               msg=lambda m: f"balance loss gradient: {m}")
