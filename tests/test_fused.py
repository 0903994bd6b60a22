"""Eager Adam, AdamW, SGD and Adagrad through torch's fused kernels (loopkit.optim.fused): bitwise
torch.optim's ``fused=True``, to rounding the chain (and torch.optim's default, which
test_step checks through the train step), pure, and the chain wherever the kernel does not
apply. RMSprop through torch.optim's own ops batched with ``_foreach_*`` calls: bitwise
torch.optim.RMSprop's default."""

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loopkit as lk
from loopkit import optim
from loopkit.optim import schedules
from loopkit.optim.transforms import (
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByRmsState,
    TraceState,
)
from loopkit.tree import tree_leaves, tree_map, tree_structure
from tests.helpers import OpCounter, adagrad_kwargs, adam_kwargs, rmsprop_kwargs, sgd_kwargs

FP32 = dict(rtol=1e-5, atol=1e-6)
FP64 = dict(rtol=1e-10, atol=1e-12)
# the kernels, and the op only RMSprop's batched path runs (its chain runs no foreach op)
KERNELS = {"_fused_adam_", "_fused_adamw_", "_fused_sgd_", "_fused_adagrad_", "_foreach_addcdiv_"}
TORCH = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}
KWARGS = {"adam": adam_kwargs, "adamw": adam_kwargs, "sgd": sgd_kwargs, "adagrad": adagrad_kwargs}


def _params(dtype=torch.float32, seed=0, widths=(5, 7, 3)) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        out[f"{i}.weight"] = torch.randn(b, a, generator=g, dtype=dtype)
        out[f"{i}.bias"] = torch.randn(b, generator=g, dtype=dtype)
    return out


def _grads(params, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tree_map(lambda v: torch.randn(v.shape, generator=g, dtype=v.dtype), params)


def _run(tx, params, steps: int, seed: int = 0):
    """``steps`` updates by ``apply_gradients`` with seeded random grads: the params, the
    state, and the ops the last update dispatched."""
    state = tx.init(params)
    for i in range(steps):
        with OpCounter() as ops:
            params, state = optim.apply_gradients(tx, _grads(params, seed + i), state, params)
    return params, state, ops.count


def _fused(ops) -> bool:
    return any(k in KERNELS for k in ops)


def _adam(state) -> ScaleByAdamState:
    return next(s for s in state if isinstance(s, ScaleByAdamState))


def _assert_close_trees(a, b, tol):
    assert tree_structure(a) == tree_structure(b)
    for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.device == y.device
        torch.testing.assert_close(x, y, **tol)


# The per-param state of Adam, SGD and Adagrad, named as torch.optim names it.
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum")


def _moments(state) -> dict:
    """The per-param state tensors of an Adam, SGD or Adagrad chain's state, by name."""
    out = {}
    for s in state:
        if isinstance(s, (ScaleByAdamState, TraceState, ScaleByAdagradState)):
            out.update({f: getattr(s, f) for f in MOMENTS if isinstance(getattr(s, f, ()), dict)})
    return out


@settings(max_examples=80, deadline=None)
@given(
    name_kwargs=st.sampled_from(sorted(TORCH)).flatmap(
        lambda n: KWARGS[n]().map(lambda kw: (n, kw))
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_matches_torch_fused_bitwise_and_the_chain_to_rounding(name_kwargs, dtype, steps, seed):
    """After a few updates the params and the optimizer's per-param state are bitwise
    torch.optim's with ``fused=True`` (the same kernel given the same numbers), and the
    chain's to the float32 / float64 standard, with a state of the chain's structure."""
    name, kwargs = name_kwargs
    params = _params(dtype, seed)
    got, state, ops = _run(getattr(optim, name)(**kwargs), params, steps, seed)
    assert _fused(ops)

    ref = {k: v.clone() for k, v in params.items()}
    opt = TORCH[name](list(ref.values()), fused=True, **kwargs)
    for i in range(steps):
        for p, g in zip(ref.values(), _grads(params, seed + i).values(), strict=True):
            p.grad = g
        opt.step()
    moments = _moments(state)
    assert moments or name == "sgd"
    for k, p in ref.items():
        assert torch.equal(got[k], p), k
        for field, values in moments.items():
            assert torch.equal(values[k], opt.state[p][field]), (k, field)

    _assert_like_the_chain(getattr(optim, name)(**kwargs, fused=False), params, steps, seed,
                           (got, state))  # fmt: skip


def _assert_like_the_chain(chain, params, steps: int, seed: int, result) -> None:
    """``result`` (params, state) equals ``chain``'s over the same updates, to the float32 /
    float64 standard, in a state of the same structure; counts and flags exactly."""
    got, state = result
    chain_params, chain_state, chain_ops = _run(chain, params, steps, seed)
    assert not _fused(chain_ops)
    tol = FP32 if next(iter(params.values())).dtype == torch.float32 else FP64
    _assert_close_trees(got, chain_params, tol)
    _assert_close_trees(state, chain_state, tol)
    for a, b in zip(tree_leaves(state), tree_leaves(chain_state), strict=True):
        if not a.is_floating_point():  # step counts, the momentum's initialized flag
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "tx",
    [
        optim.adamw(lr=0.1, amsgrad=True),
        optim.adam(lr=0.1, weight_decay=0.1, maximize=True),
        optim.adagrad(lr=0.1, weight_decay=0.1, initial_accumulator_value=0.5),
        optim.rmsprop(lr=0.1, weight_decay=0.1, momentum=0.9, centered=True, maximize=True),
    ],
)
def test_inputs_are_not_modified(tx):
    params = _params()
    state = optim.apply_gradients(tx, _grads(params, 0), tx.init(params), params)[1]
    grads = _grads(params, 1)
    before = copy.deepcopy((params, grads, state))
    with OpCounter() as ops:
        new_params, new_state = optim.apply_gradients(tx, grads, state, params)
    assert _fused(ops.count)
    for a, b in zip(tree_leaves((params, grads, state)), tree_leaves(before), strict=True):
        assert torch.equal(a, b)
    old = {t.data_ptr() for t in tree_leaves((params, grads, state))}
    assert not any(t.data_ptr() in old for t in tree_leaves(new_params))


def test_schedules_mixed_dtypes_and_nested_params():
    """An lr schedule (the lr in the state follows it), params of two dtypes (one kernel
    call per dtype, as torch groups them) in a nested dict: the chain's values."""
    params = {
        "enc": _params(torch.float32, 1),
        "head": {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.zeros(4)},
    }
    lr = schedules.cosine_annealing(0.1, T_max=5)
    tx, chain = (optim.adamw(lr=lr, weight_decay=0.1, fused=f) for f in (None, False))
    got, state, ops = _run(tx, params, 4)
    assert ops["_fused_adamw_"] == 2
    want, want_state, _ = _run(chain, params, 4)
    for a, b in zip(tree_leaves((got, state)), tree_leaves((want, want_state)), strict=True):
        tol = FP64 if a.dtype == torch.float64 else FP32
        torch.testing.assert_close(a, b, **tol)
    assert optim.learning_rates(state) == optim.learning_rates(want_state)


def _falls_back(tx, params, grads=None, state=None):
    """``apply_gradients`` runs the chain (no fused kernel) and gives exactly its result."""
    grads = _grads(params, 0) if grads is None else grads
    state = tx.init(params) if state is None else state
    with OpCounter() as ops:
        got = optim.apply_gradients(tx, grads, state, params)
    assert not _fused(ops.count)
    updates, want_state = tx.update(grads, state, params)
    want = optim.apply_updates(params, updates)
    for a, b in zip(tree_leaves(got), tree_leaves((want, want_state)), strict=True):
        assert torch.equal(a, b)
    return got


CASES = [
    "fused_false", "bfloat16", "transposed", "strided_grad", "beta1_schedule", "injected",
    "moment_dtype", "param_requires_grad", "moment_key_order", "zero_grad",
    "negated_grad", "step_2**24", "sgd_fused_false", "sgd_momentum_schedule",
    "adagrad_fused_false", "adagrad_step_2**24", "adagrad_injected_lr_decay",
    "rmsprop_foreach_false", "rmsprop_injected_alpha", "rmsprop_transposed",
    "rmsprop_param_requires_grad",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_the_chain_runs_where_the_kernel_does_not_apply(case):
    """Each case gives exactly the chain's result, without the kernel (it would compute
    garbage, lose precision, crash or break autograd there)."""
    params = _params()
    grads = _grads(params, 0)
    tx = optim.adam(lr=0.01, weight_decay=0.1)
    state = tx.init(params)
    adam = state[1]  # after the L2 decay's ()
    if case == "fused_false":
        tx = optim.adam(lr=0.01, fused=False)
        state = tx.init(params)
    elif case == "bfloat16":  # the kernel computes bf16 in float32: only with fused=True
        params = tree_map(lambda v: v.to(torch.bfloat16), params)
        grads = tree_map(lambda v: v.to(torch.bfloat16), grads)
        state = tx.init(params)
    elif case == "transposed":  # the CPU kernel would walk it in memory order
        params["0.weight"] = params["0.weight"].t().contiguous().t()
    elif case == "strided_grad":
        grads["0.weight"] = grads["0.weight"].t().contiguous().t()
    elif case == "beta1_schedule":
        tx = optim.adam(lr=0.01, betas=(lambda t: 0.9 - 0.0 * t, 0.999))
    elif case == "injected":  # every hyperparameter a tensor
        tx = optim.inject_hyperparams(optim.adamw)(lr=0.01)
        state = tx.init(params)
    elif case == "moment_dtype":  # a float64 moment (the chain promotes)
        sq = {**adam.exp_avg_sq, "0.bias": adam.exp_avg_sq["0.bias"].double()}
        state = _with_adam(state, adam._replace(exp_avg_sq=sq))
    elif case == "param_requires_grad":
        params["1.bias"] = params["1.bias"].clone().requires_grad_()
    elif case == "moment_key_order":
        state = _with_adam(state, adam._replace(exp_avg=dict(reversed(adam.exp_avg.items()))))
    elif case == "zero_grad":  # a ZeroTensor, as some backward formulas return
        grads["0.bias"] = torch._efficientzerotensor(grads["0.bias"].shape)
    elif case == "negated_grad":  # a lazy negation (neg bit)
        grads["0.bias"] = torch._neg_view(grads["0.bias"])
    elif case == "step_2**24":  # the kernel's float32 step count would round
        state = _with_adam(state, adam._replace(count=torch.tensor(2**24 - 1)))
    elif case == "sgd_fused_false":
        tx = optim.sgd(lr=0.01, momentum=0.9, fused=False)
        state = tx.init(params)
    elif case == "sgd_momentum_schedule":  # OneCycleLR-style cycled momentum
        tx = optim.sgd(lr=0.01, momentum=lambda t: 0.9 - 0.0 * t)
        state = tx.init(params)
    elif case == "adagrad_fused_false":
        tx = optim.adagrad(lr=0.01, fused=False)
        state = tx.init(params)
    elif case == "adagrad_step_2**24":
        tx = optim.adagrad(lr=0.01, weight_decay=0.1)
        state = tx.init(params)
        state = (state[0], state[1]._replace(count=torch.tensor(2**24 - 1)), state[2])
    elif case == "adagrad_injected_lr_decay":  # the kernel takes lr_decay as a number
        tx = optim.inject_hyperparams(optim.adagrad, names=("lr", "lr_decay"))(lr_decay=0.1)
        state = tx.init(params)
    elif case.startswith("rmsprop"):
        tx = optim.rmsprop(lr=0.01, momentum=0.9, centered=True, foreach=None)
        if case == "rmsprop_foreach_false":
            tx = optim.rmsprop(lr=0.01, momentum=0.9, centered=True, foreach=False)
        elif case == "rmsprop_injected_alpha":  # the batched ops take alpha as a number
            tx = optim.inject_hyperparams(optim.rmsprop, names=("lr", "alpha"))(momentum=0.9)
        elif case == "rmsprop_transposed":
            params["0.weight"] = params["0.weight"].t().contiguous().t()
        elif case == "rmsprop_param_requires_grad":
            params["1.bias"] = params["1.bias"].clone().requires_grad_()
        state = tx.init(params)
    _falls_back(tx, params, grads, state)


def _with_adam(state, adam):
    return (state[0], adam, *state[2:])


def test_the_kernel_runs_up_to_the_last_exact_step_count_and_for_channels_last():
    params = _params()
    params["conv"] = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    tx = optim.adam(lr=0.01, weight_decay=0.1, amsgrad=1, maximize=1)  # truthy, not bool
    state = tx.init(params)
    adam = state[2]._replace(count=torch.tensor(2**24 - 2))
    state = (*state[:2], adam, state[3])
    grads = tree_map(torch.randn_like, params)
    with OpCounter() as ops:
        got, got_state = optim.apply_gradients(tx, grads, state, params)
    assert ops.count["_fused_adam_"] == 1
    assert got["conv"].is_contiguous(memory_format=torch.channels_last)
    chain = optim.adam(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True, fused=False)
    updates, want_state = chain.update(grads, state, params)
    want = optim.apply_updates(params, updates)
    _assert_close_trees((got, got_state), (want, want_state), FP32)
    assert int(_adam(got_state).count) == 2**24 - 1


def test_injected_lr_alone_keeps_the_kernel():
    """``inject_hyperparams(adamw, names=("lr",))`` builds AdamW with a tensor lr and
    numeric betas: the kernel runs, reading the injected (and changed) lr."""
    params = _params()
    tx = optim.inject_hyperparams(optim.adamw, names=("lr",))(lr=0.01, weight_decay=0.1)
    chain = optim.inject_hyperparams(optim.adamw, names=("lr",))(
        lr=0.01, weight_decay=0.1, fused=False
    )
    state = optim.set_hyperparams(tx.init(params), lr=0.002)
    grads = _grads(params, 0)
    with OpCounter() as ops:
        got = optim.apply_gradients(tx, grads, state, params)
    assert ops.count["_fused_adamw_"] == 1
    want = optim.apply_gradients(chain, grads, state, params)
    _assert_close_trees(got, want, FP32)
    assert optim.learning_rates(got[1]) == [0.002]


def test_the_transform_stays_an_init_update_pair():
    """The kernel is registered for the update function itself: a transform still unpacks
    as ``init, update``, and one whose update is replaced or wrapped (even with
    ``functools.wraps``, which copies a function's attributes) does not keep it."""
    params = _params()
    init, update = tx = optim.adamw(lr=0.1)
    grads = _grads(params, 0)
    with OpCounter() as ops:
        optim.apply_gradients(tx, grads, init(params), params)
    assert _fused(ops.count)

    def frozen(g, s, p=None):
        return tree_map(torch.zeros_like, g), s

    @functools.wraps(update)
    def logged(g, s, p=None):  # a wrapper that changes what the update does
        return frozen(g, s, p)

    class ModuleUpdate(nn.Module):  # an object whose own .apply means something else
        def forward(self, g, s, p=None):
            return frozen(g, s, p)

    for other in (frozen, logged, ModuleUpdate()):
        got, _ = optim.apply_gradients(tx._replace(update=other), grads, init(params), params)
        for k in params:
            assert torch.equal(got[k], params[k])


@pytest.mark.parametrize("name", ["adamw", "adagrad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_true_fuses_low_precision(name, dtype):
    """Bitwise torch's ``fused=True``, and the float32 chain's values to the dtype's
    rounding (an lr of 0.3 moves each param by about that much per step, so a skipped
    update, as torch's CPU SGD kernel does for these dtypes, would show)."""
    params = tree_map(lambda v: v.to(dtype), _params())
    got, _, ops = _run(getattr(optim, name)(lr=0.3, fused=True), params, 2)
    assert _fused(ops)
    ref = {k: v.clone() for k, v in params.items()}
    opt = TORCH[name](list(ref.values()), lr=0.3, fused=True)
    for i in range(2):
        for p, g in zip(ref.values(), _grads(params, i).values(), strict=True):
            p.grad = g
        opt.step()
    for k in ref:
        assert torch.equal(got[k], ref[k])
    # the chain in float32, from the same low-precision params and grads
    chain = getattr(optim, name)(lr=0.3, fused=False)
    wide = tree_map(lambda v: v.float(), params)
    state = chain.init(wide)
    for i in range(2):
        grads = tree_map(lambda v: v.float(), _grads(params, i))
        wide, state = optim.apply_gradients(chain, grads, state, wide)
    for k in ref:
        torch.testing.assert_close(got[k].float(), wide[k], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_on_low_precision_cpu_params_runs_the_chain_even_when_asked(dtype):
    """torch 2.13's CPU ``_fused_sgd_`` skips the param update of 16-element blocks of
    bf16/fp16 tensors: ``sgd(fused=True)`` must not use it there."""
    params = {"w": torch.ones(64, dtype=dtype), "b": torch.ones(3, 17, dtype=dtype)}
    grads = tree_map(torch.ones_like, params)
    tx = optim.sgd(lr=0.5, momentum=0.9, fused=True)
    got = _falls_back(tx, params, grads)
    assert torch.equal(got[0]["w"], torch.full((64,), 0.5, dtype=dtype))


def test_the_chain_runs_under_autograd_vmap_and_compile():
    """Hypergradients through the update (the kernel has no derivative), a vmapped
    ensemble of updates, and a compiled step (inductor fuses the chain itself)."""
    params = _params(torch.float64)
    grads = _grads(params, 0)
    tx = optim.adam(lr=0.01)
    state = tx.init(params)

    # autograd: grads that require grad (a differentiated inner step, as in MAML)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    scaled = {k: g * scale for k, g in grads.items()}
    new, _ = _falls_back(tx, params, scaled, state)
    (hyper,) = torch.autograd.grad(sum(v.sum() for v in new.values()), scale)
    assert torch.isfinite(hyper) and hyper != 0

    # vmap over a batch of states
    stacked = tree_map(lambda v: torch.stack([v, 2 * v]), params)
    stacked_grads = tree_map(lambda v: torch.stack([v, -v]), grads)
    states = torch.func.vmap(tx.init)(stacked)
    out, _ = torch.func.vmap(lambda p, g, s: optim.apply_gradients(tx, g, s, p))(
        stacked, stacked_grads, states
    )
    first, _ = optim.apply_gradients(optim.adam(lr=0.01, fused=False), grads, state, params)
    for k in params:
        torch.testing.assert_close(out[k][0], first[k], **FP64)

    # compile: the graph holds the chain's ops, not the kernel
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda g, s, p: optim.apply_gradients(tx, g, s, p), backend=backend)
    got, _ = compiled(grads, state, params)
    code = "".join(gm.code for gm in graphs)
    assert graphs and "fused_adam" not in code
    for k in params:
        torch.testing.assert_close(got[k], first[k], **FP64)


def test_train_step_uses_the_kernel_and_keeps_its_checks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    tx = optim.adamw(lr=0.01)

    def loss_fn(net, batch):
        return net(batch).pow(2).mean()

    step = lk.train_step(model, loss_fn, tx)
    state = lk.TrainState.create(model, tx)
    with OpCounter() as ops:
        state, _ = step(state, torch.randn(3, 4))
    assert ops.count["_fused_adamw_"] == 1

    params = dict(state.params)
    grads = _grads(params, 0)
    del grads["0.bias"]
    with pytest.raises(ValueError, match="0.bias"):
        optim.apply_gradients(tx, grads, state.opt_state, params)
    with pytest.raises(ValueError, match="state of length"):
        optim.apply_gradients(tx, _grads(params, 0), state.opt_state[:2], params)
    with pytest.raises(TypeError, match="fused must be"):
        optim.adamw(fused="yes")
    with pytest.raises(TypeError, match="foreach must be"):
        optim.rmsprop(foreach="yes")


def test_a_changed_learning_rate_is_used():
    """``set_learning_rate`` (ReduceLROnPlateau's hook) changes the lr the kernel reads."""
    params = _params()
    tx, chain = (optim.adamw(lr=0.01, fused=f) for f in (None, False))
    state = optim.set_learning_rate(tx.init(params), 0.003)
    grads = _grads(params, 0)
    got, got_state = optim.apply_gradients(tx, grads, state, params)
    want, want_state = optim.apply_gradients(chain, grads, state, params)
    _assert_close_trees((got, got_state), (want, want_state), FP32)
    assert optim.learning_rates(got_state) == [0.003]
    unchanged, _ = optim.apply_gradients(tx, grads, tx.init(params), params)
    assert not torch.equal(got["0.weight"], unchanged["0.weight"])


def _rms_state(state) -> dict:
    """RMSprop's per-param state tensors in a chain's state, named as torch.optim names
    them (square_avg; grad_avg if centered; momentum_buffer with momentum)."""
    out = {}
    for s in state:
        if isinstance(s, tuple) and not isinstance(s, (ScaleByRmsState, TraceState)):
            out.update(_rms_state(s))
        elif isinstance(s, ScaleByRmsState):
            out["square_avg"] = s.square_avg
            if s.grad_avg != ():
                out["grad_avg"] = s.grad_avg
        elif isinstance(s, TraceState):
            out["momentum_buffer"] = s.momentum_buffer
    return out


def _torch_rmsprop(params, kwargs, steps, seed):
    ref = {k: v.clone() for k, v in params.items()}
    opt = torch.optim.RMSprop(list(ref.values()), **kwargs)  # its default: single-tensor
    for i in range(steps):
        for p, g in zip(ref.values(), _grads(params, seed + i).values(), strict=True):
            p.grad = g
        opt.step()
    return ref, opt


@settings(max_examples=60, deadline=None)
@given(
    kwargs=rmsprop_kwargs(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_rmsprop_matches_torch_bitwise_and_the_chain_to_rounding(kwargs, dtype, steps, seed):
    """Eager RMSprop runs torch.optim.RMSprop's single-tensor ops, batched: after a few
    updates the params and per-param state are bitwise torch's default (centered, momentum,
    weight decay and maximize included), and the chain's to the float32 / float64
    standard, in a state of the chain's structure."""
    params = _params(dtype, seed)
    got, state, ops = _run(optim.rmsprop(**kwargs), params, steps, seed)
    assert ops["_foreach_addcdiv_"] == 1
    ref, opt = _torch_rmsprop(params, kwargs, steps, seed)
    moments = _rms_state(state)
    want = {"square_avg", "grad_avg", "momentum_buffer"}
    want -= {"grad_avg"} if not kwargs["centered"] else set()
    want -= {"momentum_buffer"} if not kwargs["momentum"] else set()
    assert set(moments) == want
    for k, p in ref.items():
        assert torch.equal(got[k], p), k
        for field, values in moments.items():
            assert torch.equal(values[k], opt.state[p][field]), (k, field)

    _assert_like_the_chain(optim.rmsprop(**kwargs, foreach=False), params, steps, seed,
                           (got, state))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum, centered", [(0.0, False), (0.9, True)])
def test_rmsprop_low_precision_matches_torch_bitwise(dtype, momentum, centered):
    """float16 and bfloat16 params take the same ops as torch's (whose CPU
    ``_foreach_mul_`` by a number rounds differently from ``mul_`` in these dtypes)."""
    kwargs = dict(lr=0.05, alpha=0.9, weight_decay=0.1, momentum=momentum, centered=centered)
    params = tree_map(lambda v: v.to(dtype), _params(widths=(17, 33, 5)))
    got, state, ops = _run(optim.rmsprop(**kwargs), params, 3)
    assert ops["_foreach_addcdiv_"] == 1
    ref, opt = _torch_rmsprop(params, kwargs, 3, 0)
    moments = _rms_state(state)
    for k, p in ref.items():
        assert torch.equal(got[k], p), k
        for field, values in moments.items():
            assert torch.equal(values[k], opt.state[p][field]), (k, field)
