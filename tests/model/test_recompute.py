import torch

from mom_train.model.recompute import recompute_in_backward


def test_rebuilt_tensor_gives_same_gradients_and_is_not_kept():
    x = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(7, 3, requires_grad=True)
    calls = []

    def rebuild():
        calls.append(1)
        return x.detach().sin()

    y = x.sin()
    with recompute_in_backward(y, rebuild):
        out = y @ w  # mm saves y (rebuilt) and w (kept)
    assert not calls
    out.square().sum().backward()
    assert len(calls) == 1
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (ref_x.sin() @ ref_w).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=0, atol=0)


def test_a_wrong_rebuild_changes_the_gradient():
    # the hook really substitutes the rebuilt tensor: a different recipe gives a different weight gradient
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(6, 2, requires_grad=True)
    y = x.cos()
    with recompute_in_backward(y, lambda: torch.zeros_like(y)):
        (y @ w).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_no_grad_block_is_a_no_op():
    """Entered under no_grad, the block installs nothing: a graph built inside it (grad re-enabled) keeps the
    real tensor, so a wrong recipe is never called and the gradient is exact; no contiguity check either."""
    x = torch.randn(4, 3, requires_grad=True)
    y = x.sin()
    calls = []

    def wrong_rebuild():
        calls.append(1)
        return torch.zeros_like(y)

    with torch.no_grad(), recompute_in_backward(y, wrong_rebuild):
        with torch.enable_grad():
            out = (y * y).sum()
    out.backward()
    assert not calls
    torch.testing.assert_close(x.grad, 2 * x.detach().sin() * x.detach().cos())
    with torch.no_grad(), recompute_in_backward(y.t(), wrong_rebuild):
        pass


def test_views_of_the_tensor_are_rebuilt_too():
    # a linear on a 3-D input saves a 2-D view of it: that view must be rebuilt as well
    lin = torch.nn.Linear(4, 3)
    h = torch.randn(2, 5, 4, requires_grad=True)
    y = h.tanh()
    calls = []
    with recompute_in_backward(y, lambda: (calls.append(1), h.detach().tanh())[1]):
        out = lin(y)
    out.square().sum().backward()
    assert calls == [1]
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(lin.state_dict())
    ref_h = h.detach().clone().requires_grad_()
    ref(ref_h.tanh()).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=0, atol=0)


def test_the_rebuilt_tensor_is_freed_after_forward():
    # nothing may keep the tensor alive once forward is done: only the recipe stays with the graph
    import gc
    import weakref

    x = torch.randn(64, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    y = x.exp()
    ref = weakref.ref(y)
    with recompute_in_backward(y, lambda: x.detach().exp()):
        out = y @ w
    del y
    gc.collect()
    assert ref() is None
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.detach().exp().t() @ torch.ones(64, 64))
