"""MAML's meta-gradient (examples/maml_sinusoid.py) against plain autograd."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

from loopkit import optim
from tests.test_examples import load_example

maml = load_example("maml_sinusoid")


def unrolled_meta_grad(model, params, tasks, inner_lr, steps, first_order=False):
    """The oracle: the inner loop written imperatively, with create_graph=True, and the
    meta-gradient from torch.autograd.grad (``first_order``: the inner grads detached)."""
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    total = 0.0
    xs, ys, xq, yq = tasks
    for t in range(len(xs)):
        fast = leaves
        for _ in range(steps):
            loss = F.mse_loss(functional_call(model, fast, (xs[t],)), ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            if first_order:
                grads = [g.detach() for g in grads]
            fast = {k: p - inner_lr * g for (k, p), g in zip(fast.items(), grads, strict=True)}
        total = total + F.mse_loss(functional_call(model, fast, (xq[t],)), yq[t])
    meta = torch.autograd.grad(total / len(xs), list(leaves.values()))
    return dict(zip(leaves, meta, strict=True))


@given(
    n_tasks=st.integers(1, 4),
    k_shot=st.integers(1, 6),
    steps=st.integers(1, 3),
    inner_lr=st.sampled_from([0.01, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_meta_gradient_equals_unrolled_autograd(n_tasks, k_shot, steps, inner_lr, seed):
    torch.manual_seed(seed)
    model = maml.make_model().double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    tasks = [
        t.double() for t in maml.sample_tasks(n_tasks, k_shot, torch.Generator().manual_seed(seed))
    ]
    inner = optim.sgd(lr=inner_lr)
    got = torch.func.grad(lambda p: maml.meta_loss(model, p, tasks, inner, steps))(params)
    want = unrolled_meta_grad(model, params, tasks, inner_lr, steps)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    # Second order: the meta-gradient is not the first-order approximation's.
    first = unrolled_meta_grad(model, params, tasks, inner_lr, steps, first_order=True)
    assert any((got[k] - first[k]).abs().max() > 1e-8 for k in want)
