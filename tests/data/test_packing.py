import torch

from mom_train.data.packing import IGNORE_INDEX, Packer


def _docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g, dtype=torch.int32) for n in lengths]


def test_cu_seqlens_follow_documents_and_cut_docs_continue():
    docs = _docs([5, 3, 11, 1, 30, 2])
    packer = Packer(8)
    for d in docs:
        packer.add(d)
    batches = []
    while packer.ready():
        batches.append(packer.pop())
    tail = packer.flush()
    batches.append(tail)
    stream = torch.cat([b[0][0] for b in batches])
    # every token appears once, in order, followed by the padding of the final flush
    total = sum(d.numel() for d in docs)
    assert torch.equal(stream[:total], torch.cat(docs).long())
    assert (stream[total:] == 0).all()
    # segment starts: every document start plus every batch start, in batch-local offsets
    doc_starts = set(torch.tensor([0] + [d.numel() for d in docs]).cumsum(0)[:-1].tolist())
    for i, (ids, labels, cu) in enumerate(batches):
        assert ids.shape == (1, 8) and labels.shape == (1, 8) and cu.dtype == torch.int32
        assert cu[0] == 0 and cu[-1] == 8 and (cu[1:] > cu[:-1]).all()
        expect = sorted({s - 8 * i for s in doc_starts if 8 * i <= s < 8 * (i + 1)} | {0})
        if i == len(batches) - 1:
            expect = sorted(set(expect) | {total - 8 * i})
        assert cu[:-1].tolist() == expect
    # text labels equal the inputs; padding is ignored
    assert torch.equal(batches[0][1], batches[0][0])
    assert (tail[1][0, total - 8 * (len(batches) - 1):] == IGNORE_INDEX).all()


def test_overlong_document_is_split_not_dropped():
    (doc,) = _docs([50])
    packer = Packer(16)
    packer.add(doc)
    out = [packer.pop() for _ in range(3)]
    assert torch.equal(torch.cat([o[0][0] for o in out]), doc[:48].long())
    assert all(o[2].tolist() == [0, 16] for o in out)
    assert packer.num_pending == 2


def test_labels_of_documents_are_kept_and_state_round_trips():
    docs = _docs([6, 6])
    labels = [torch.full((6,), IGNORE_INDEX), docs[1].long().clone()]
    packer = Packer(4)
    for d, lab in zip(docs, labels):
        packer.add(d, lab)
    first = packer.pop()
    assert torch.equal(first[1][0], labels[0][:4])
    resumed = Packer(4)
    resumed.load_state_dict(packer.state_dict())
    for _ in range(2):
        a, b = packer.pop(), resumed.pop()
        assert all(torch.equal(x, y) for x, y in zip(a, b))
