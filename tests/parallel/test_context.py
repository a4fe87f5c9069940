"""Context parallelism for the gated delta rule and the short conv before it: N ranks (gloo, CPU) must
equal one process.

Each chain is a packed sequence of documents cut at arbitrary rows over the ranks (documents straddling one or
several boundaries, cuts on a document boundary, empty and one-token documents, a rank holding no rows of a
chain). Every rank computes its rows' output and the gradients of its rows' inputs for a weighted sum of all
outputs; those must match the single-process computation over each whole chain (chunked delta rule; the
conv definition, with the halo each rank receives as its first segment's initial state).
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mom_train.kernels import gated_delta_rule
from mom_train.kernels.short_conv import naive_short_conv
from mom_train.kernels.cp import context_parallel_conv_states, context_parallel_gated_delta_rule
from mom_train.parallel.context import local_segments, shard_packed_sequence

from tests.ranks import free_port
H, K, V = 2, 8, 6
# short conv: channels and width (a halo of 3 rows crosses ranks holding fewer rows than that)
CH, W = 5, 4
CONV_WEIGHT = torch.randn(CH, W, generator=torch.Generator().manual_seed(1))
# chain -> (document lengths, cut rows between ranks); the cuts split the chain's rows over the ranks
CHAINS = {
    2: [([30, 1, 0, 45, 20], [40]),  # the cut inside the 45-row document
        ([12, 50], [12])],  # the cut on a document boundary
    3: [([100, 7], [25, 70]),  # one document over all three ranks
        ([5, 0, 33, 1], [5, 5]),  # the middle rank holds no rows of this chain
        ([9, 9, 9], [13, 20]),
        ([40, 10], [20, 22]),  # the middle rank holds 2 rows of a document: less than the conv halo
        ([30, 10], [15, 15])],  # the middle rank holds no rows of a document that crosses it
}


def _inputs(total: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(1, total, H, K, generator=gen),
        k=F.normalize(torch.randn(1, total, H, K, generator=gen), dim=-1),
        v=torch.randn(1, total, H, V, generator=gen),
        # slow decay and small beta: a state (and the transition M) survives a whole rank's rows
        g=F.logsigmoid(torch.randn(1, total, H, generator=gen) + 5),
        beta=0.3 * torch.rand(1, total, H, generator=gen),
        weight=torch.randn(1, total, H, V, generator=gen),
        x=torch.randn(1, total, CH, generator=gen),
        x_weight=torch.randn(1, total, CH, generator=gen),
    )


def _chain_rows(chains, rank: int):
    """Per chain: global boundaries, this rank's [start, end) and its local segments."""
    out = []
    for lengths, cuts in chains:
        cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
        bounds = [0] + cuts + [cu[-1]]
        start, end = bounds[rank], bounds[rank + 1]
        local, _, continues_out = local_segments(cu, start, end)
        out.append((cu, start, end, local, continues_out))
    return out


GRADS = ("q", "k", "v", "g", "beta", "x")


def _reference(chains, seed: int):
    """Single process: each chain alone; returns per chain (o, conv output, grads of q, k, v, g, beta, x)."""
    results = []
    for c, (lengths, _) in enumerate(chains):
        x = {n: t.requires_grad_(n in GRADS) for n, t in _inputs(sum(lengths), seed + c).items()}
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        o, _ = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cu_seqlens=cu, backend="torch")
        y, _ = naive_short_conv(x["x"], CONV_WEIGHT, cu)
        ((o * x["weight"]).sum() + (y * x["x_weight"]).sum()).backward()
        results.append([o.detach(), y.detach()] + [x[n].grad for n in GRADS])
    return results


def _worker(rank: int, world: int, port: int, seed: int, out_dir: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        chains = CHAINS[world]
        rows = _chain_rows(chains, rank)
        # this rank's buffer: each chain's rows one after another, with their local segments
        parts, cu_local, first, last, flags = [], [0], [], [], []
        for c, (_, start, end, local, continues_out) in enumerate(rows):
            full = _inputs(sum(chains[c][0]), seed + c)
            parts.append({n: t[:, start:end] for n, t in full.items()})
            first.append(len(cu_local) - 1)
            cu_local += [cu_local[-1] + b for b in local[1:]]
            last.append(len(cu_local) - 2)
            flags.append(continues_out)
        x = {n: torch.cat([p[n] for p in parts], 1).requires_grad_(n in GRADS) for n in parts[0]}
        cu, first, last, flags = (torch.tensor(cu_local, dtype=torch.int32), torch.tensor(first),
                                  torch.tensor(last), torch.tensor(flags))
        o = context_parallel_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cu, first, last, flags,
                                              dist.group.WORLD, backend="torch")
        # q, k, v convs take their halos in one gather: x twice, as two inputs, must give the same halo twice
        halo, again = context_parallel_conv_states((x["x"][0], x["x"][0]), cu, first, last, flags, W,
                                                   dist.group.WORLD)
        assert torch.equal(halo, again)
        conv_state = torch.zeros(cu.shape[0] - 1, CH, W - 1).index_copy(0, first, halo)
        y, _ = naive_short_conv(x["x"], CONV_WEIGHT, cu, initial_state=conv_state)
        ((o * x["weight"]).sum() + (y * x["x_weight"]).sum()).backward()
        local = [o.detach(), y.detach()] + [x[n].grad for n in GRADS]
        # split back per chain: [(chain, start, end, tensors)]
        out, offset = [], 0
        for c, (_, start, end, _, _) in enumerate(rows):
            n = end - start
            out.append((c, start, end, [t[:, offset:offset + n].clone() for t in local]))
            offset += n
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process(world: int, tmp_path):
    seed = 10 * world
    mp.spawn(_worker, args=(world, free_port(), seed, str(tmp_path)), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    reference = _reference(CHAINS[world], seed)
    names = ("o", "conv", "dq", "dk", "dv", "dg", "dbeta", "dx")
    covered = {c: 0 for c in range(len(CHAINS[world]))}
    for pieces in got:
        for c, start, end, tensors in pieces:
            covered[c] += end - start
            for name, mine, ref in zip(names, tensors, reference[c]):
                ref = ref[:, start:end]
                err = ((mine - ref).norm() / ref.norm().clamp_min(1e-12)).item() if ref.numel() else 0.0
                assert err < 1e-5, f"chain {c} rows [{start}, {end}) {name}: rel err {err:.2e}"
    assert covered == {c: sum(lengths) for c, (lengths, _) in enumerate(CHAINS[world])}


def test_shard_packed_sequence():
    cu = [0, 30, 31, 31, 76, 96]  # 96 rows over 3 ranks of 32
    first = shard_packed_sequence(cu, 3, 0)
    assert (first.start, first.end) == (0, 32)
    assert first.cu_seqlens.tolist() == [0, 30, 31, 31, 32]
    assert (first.continues_in, first.continues_out) == (False, True)
    middle = shard_packed_sequence(torch.tensor(cu), 3, 1)
    assert middle.cu_seqlens.tolist() == [0, 32]
    assert (middle.continues_in, middle.continues_out) == (True, True)
    last = shard_packed_sequence(cu, 3, 2)
    assert last.cu_seqlens.tolist() == [0, 12, 32]
    assert (last.continues_in, last.continues_out) == (True, False)
    # a cut on a document boundary passes nothing on
    assert shard_packed_sequence([0, 48, 96], 2, 0).continues_out is False
    assert shard_packed_sequence([0, 48, 96], 2, 1).continues_in is False


def test_shard_packed_sequence_errors():
    with pytest.raises(ValueError, match="parallel.cp"):
        shard_packed_sequence([0, 10, 25], 2, 0)
    with pytest.raises(ValueError, match="never decrease"):
        shard_packed_sequence([0, 20, 10, 30], 3, 0)
    with pytest.raises(ValueError, match="outside"):
        shard_packed_sequence([0, 30], 3, 3)


def test_one_rank_is_the_plain_kernel():
    x = _inputs(40, 0)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    o = context_parallel_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cu, torch.tensor([0]),
                                          torch.tensor([1]), False, None, backend="torch")
    ref, _ = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cu_seqlens=cu, backend="torch")
    assert torch.equal(o, ref)
