"""Injected hyperparameters: equal to the plain optimizers, and changing them between
updates equals torch.optim's ``param_group[name] = value`` between ``step()`` calls."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk
from loopkit import optim
from tests.helpers import KWARGS, TORCH_OPTIMIZERS
from tests.test_optim import TOL, loopkit_run, params_and_grads


@st.composite
def muon_kwargs(draw) -> dict:
    return dict(
        lr=draw(st.floats(1e-4, 0.05)),
        weight_decay=draw(st.sampled_from([0.0, 0.1])),
        momentum=draw(st.floats(0.0, 0.99)),
        eps=draw(st.sampled_from([1e-7, 1e-5])),
        nesterov=draw(st.booleans()),
        adjust_lr_fn=draw(st.sampled_from([None, "original", "match_rms_adamw"])),
    )


ALL_KWARGS = KWARGS | {"muon": muon_kwargs()}
TORCH = TORCH_OPTIMIZERS | {"muon": torch.optim.Muon}


@st.composite
def matrices_and_grads(draw, dtype):
    """Muon's params: 2-D tensors."""
    seed = draw(st.integers(0, 2**16))
    shapes = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3))
    steps = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(seed)
    params = {f"w{i}": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(shapes)}
    grads = [
        {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
        for _ in range(steps)
    ]
    return params, grads


def draw_problem(data, name, dtype):
    kwargs = data.draw(ALL_KWARGS[name])
    params, grads = data.draw(
        matrices_and_grads(dtype) if name == "muon" else params_and_grads(dtype)
    )
    return kwargs, params, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(ALL_KWARGS))
@given(data=st.data())
def test_injected_equals_the_plain_optimizer(name, dtype, data):
    kwargs, params, grads = draw_problem(data, name, dtype)
    factory = getattr(optim, name)
    want, _ = loopkit_run(params, grads, factory(**kwargs))
    got, state = loopkit_run(params, grads, optim.inject_hyperparams(factory)(**kwargs))
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL[dtype])
    # every numeric argument is injected; the flags are not
    injected = optim.hyperparams(state)[0]
    assert "lr" in injected and not {"maximize", "amsgrad", "nesterov", "centered"} & set(injected)
    assert all(v.dtype == torch.float64 for v in injected.values())


def _changeable(name: str, first: dict, new: dict, injected: set) -> dict:
    """The injected values of a fresh draw ``new`` that torch lets change mid-run."""
    out = {k: v for k, v in new.items() if k in injected}
    if name == "rmsprop" and first["momentum"] == 0:
        out.pop("momentum")  # torch keeps no buffer then: raising momentum later is a KeyError
    if name == "adafactor" and new["eps"][0] is None:
        out.pop("eps", None)  # None (eps1 from the dtype) is structure, not a value
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(ALL_KWARGS))
@given(data=st.data())
def test_set_hyperparams_matches_torch_param_group_changes(name, dtype, data):
    """Random hyperparameters, changed to other random values at random steps, on both
    sides: ``set_hyperparams`` here, ``param_group[k] = v`` in torch."""
    kwargs, params, grads = draw_problem(data, name, dtype)
    tx = optim.inject_hyperparams(getattr(optim, name))(**kwargs)
    state = tx.init(params)
    injected = set(optim.hyperparams(state)[0])
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = TORCH[name](ps.values(), **kwargs)
    got = params
    for t, gs in enumerate(grads):
        if t > 0 and data.draw(st.booleans()):
            change = _changeable(name, kwargs, data.draw(ALL_KWARGS[name]), injected)
            change = {k: change[k] for k in data.draw(st.sets(st.sampled_from(sorted(change))))}
            state = optim.set_hyperparams(state, **change)
            opt.param_groups[0].update(change)
        updates, state = tx.update(gs, state, got)
        got = optim.apply_updates(got, updates)
        for k, p in ps.items():
            p.grad = gs[k].clone()
        opt.step()
    for k in ps:
        torch.testing.assert_close(got[k], ps[k].detach(), **TOL[dtype])


@pytest.mark.parametrize("name", ["adamw", "sgd", "asgd", "adafactor"])
def test_scheduled_weight_decay_and_lr_match_torch(name):
    """Any injected hyperparameter may be a schedule: here weight_decay and the lr, set in
    torch's param group before each step."""
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    g = torch.Generator().manual_seed(2)
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
             for _ in range(6)]  # fmt: skip
    decay = optim.schedules.step_lr(0.1, step_size=2, gamma=0.0)  # 0.1, 0.1, then exactly 0
    lr = optim.schedules.linear(0.05, start_factor=1.0, end_factor=0.2, total_iters=4)
    tx = optim.inject_hyperparams(getattr(optim, name))(lr=lr, weight_decay=decay)
    got, state = loopkit_run(params, grads, tx)
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = TORCH[name](ps.values(), lr=0.05)
    for t, gs in enumerate(grads):
        step = torch.tensor(t)
        opt.param_groups[0].update(weight_decay=float(decay(step)), lr=float(lr(step)))
        for k, p in ps.items():
            p.grad = gs[k].clone()
        opt.step()
    for k in ps:
        torch.testing.assert_close(got[k], ps[k].detach(), **TOL[torch.float64])
    assert float(optim.hyperparams(state)[0]["weight_decay"]) == 0.0


def test_injected_lr_is_what_learning_rates_and_set_learning_rate_see():
    params = {"w": torch.zeros(2)}
    tx = optim.multi_transform(
        {"a": optim.inject_hyperparams(optim.sgd)(lr=0.5), "b": optim.adam(lr=0.1)},
        lambda n, p: "a",
    )
    state = tx.init(params)
    # the injected lr, not the copy in the inner chain's scale_by_learning_rate
    assert [float(x) for x in optim.learning_rates(state)] == [0.5, 0.1]
    state = optim.set_learning_rate(state, lambda lr: lr * 0.1)
    assert float(optim.hyperparams(state)[0]["lr"]) == pytest.approx(0.05)
    updates, state = tx.update({"w": torch.ones(2)}, state, params)
    torch.testing.assert_close(updates["w"], torch.full((2,), -0.05))
    static = optim.inject_hyperparams(optim.sgd, names=("weight_decay",))(lr=0.3)
    assert [float(x) for x in optim.learning_rates(static.init(params))] == [0.3]


def test_betas_are_a_float64_pair_and_take_a_beta1_schedule():
    cycle = optim.schedules.one_cycle_momentum(total_steps=10, base_momentum=0.85,
                                               max_momentum=0.95, pct_start=0.3)  # fmt: skip
    params = {"w": torch.randn(3, 2, dtype=torch.float64)}
    grads = [{"w": torch.randn(3, 2, dtype=torch.float64)} for _ in range(5)]
    want, _ = loopkit_run(params, grads, optim.adam(lr=1e-2, betas=(cycle, 0.99)))
    tx = optim.inject_hyperparams(optim.adam)(lr=1e-2, betas=(cycle, 0.99))
    got, state = loopkit_run(params, grads, tx)
    torch.testing.assert_close(got["w"], want["w"], **TOL[torch.float64])
    betas = optim.hyperparams(state)[0]["betas"]
    assert betas.shape == (2,) and float(betas[0]) == float(cycle(torch.tensor(4)))
    # set a number: beta2 sticks, beta1 comes back from its schedule at the next update
    state = optim.set_hyperparams(state, betas=(0.5, 0.9))
    _, state = tx.update(grads[0], state, got)
    assert optim.hyperparams(state)[0]["betas"].tolist() == [float(cycle(torch.tensor(5))), 0.9]


def test_errors_name_the_fix():
    params = {"w": torch.zeros(2)}
    state = optim.inject_hyperparams(optim.adamw)(lr=1e-3).init(params)
    with pytest.raises(ValueError, match=r"no injected hyperparameter named \['momentum'\]; "
                       r"available: \['betas', 'eps', 'lr', 'weight_decay'\]"):  # fmt: skip
        optim.set_hyperparams(state, momentum=0.9)
    with pytest.raises(ValueError, match="no injected hyperparameters.*inject_hyperparams"):
        optim.set_hyperparams(optim.adamw().init(params), lr=0.1)
    with pytest.raises(TypeError, match="cannot inject amsgrad=False.*structure of adam"):
        optim.inject_hyperparams(optim.adam, names=("lr", "amsgrad"))()
    with pytest.raises(ValueError, match="sgd has no argument 'beta' to inject"):
        optim.inject_hyperparams(optim.sgd, names=("beta",))()
    # the initial values get torch's checks
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        optim.inject_hyperparams(optim.adam)(betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        optim.inject_hyperparams(optim.rmsprop)(lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        optim.inject_hyperparams(optim.sgd)(nesterov=True)


def test_values_set_later_are_used_unchecked_as_torch_uses_a_param_groups():
    """torch checks hyperparameters when the optimizer is built; a value set later in a
    param group (here a negative lr: gradient ascent) is used as it is. So with injected
    values, which the optimizer is rebuilt from at every update."""
    params = {"w": torch.tensor([1.0, -2.0])}
    tx = optim.inject_hyperparams(optim.adam)(lr=0.1)
    state = optim.set_learning_rate(tx.init(params), -0.1)
    got, _ = optim.apply_gradients(tx, {"w": torch.tensor([0.5, 0.5])}, state, params)
    ref = params["w"].clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.1)
    opt.param_groups[0]["lr"] = -0.1
    ref.grad = torch.tensor([0.5, 0.5])
    opt.step()
    torch.testing.assert_close(got["w"], ref.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.compile
def test_changing_lr_weight_decay_and_betas_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = optim.inject_hyperparams(optim.adamw)(lr=1e-2, weight_decay=0.01)

    def loss_fn(net, batch):
        return torch.nn.functional.cross_entropy(net(batch[0]), batch[1]), {}

    counter = CompileCounterWithBackend("inductor")
    compiled = lk.train_step(model, loss_fn, opt, compile=True, backend=counter)
    eager = lk.train_step(model, loss_fn, opt)
    a = b = lk.TrainState.create(model, opt)
    changes = [{}, dict(lr=1e-3), dict(weight_decay=0.0), dict(betas=(0.8, 0.95)),
               dict(lr=0.05, weight_decay=0.1, betas=(0.0, 0.5), eps=1e-3)]  # fmt: skip
    for i, change in enumerate(changes):
        if change:
            a = a.replace(opt_state=optim.set_hyperparams(a.opt_state, **change))
            b = b.replace(opt_state=optim.set_hyperparams(b.opt_state, **change))
        batch = (torch.randn(8, 5), torch.randint(0, 3, (8,)))
        a, _ = eager(a, batch)
        b, _ = compiled(b, batch)
        if i == 0:  # (a cold inductor cache may count 2 frames for the first compile)
            compiled_frames = counter.frame_count
            assert compiled_frames >= 1
    assert counter.frame_count == compiled_frames, "changing a hyperparameter recompiled"
    for k in a.params:
        torch.testing.assert_close(b.params[k], a.params[k], rtol=1e-4, atol=1e-5)
    assert float(optim.hyperparams(b.opt_state)[0]["lr"]) == 0.05


@pytest.mark.parametrize("name", sorted(ALL_KWARGS))
def test_vmap_over_a_stack_of_injected_states(name):
    """K members, each with its own lr and weight_decay (and momentum / betas where the
    optimizer has them) as a batched tensor in the state: vmap of update equals K updates."""
    from torch.utils._pytree import tree_map

    k_members, dtype = 3, torch.float64
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=g, dtype=dtype)}
    if name != "muon":
        params["b"] = torch.randn(3, generator=g, dtype=dtype)
    tx = optim.inject_hyperparams(getattr(optim, name))()
    names = set(optim.hyperparams(tx.init(params))[0])
    states = []
    for i in range(k_members):
        values = dict(lr=0.01 * (i + 1), weight_decay=0.05 * i, momentum=0.3 * i,
                      betas=(0.5 + 0.2 * i, 0.9 + 0.03 * i))  # fmt: skip
        states.append(optim.set_hyperparams(tx.init(params), **{
            k: v for k, v in values.items() if k in names
        }))  # fmt: skip
    members = [params] * k_members
    batched_state = tree_map(lambda *xs: torch.stack(xs), *states)
    batched_params = tree_map(lambda *xs: torch.stack(xs), *members)
    update = torch.func.vmap(tx.update)
    for _ in range(2):
        grads = [{k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
                 for _ in range(k_members)]  # fmt: skip
        batched_grads = tree_map(lambda *xs: torch.stack(xs), *grads)
        updates, batched_state = update(batched_grads, batched_state, batched_params)
        batched_params = optim.apply_updates(batched_params, updates)
        for i in range(k_members):
            u, states[i] = tx.update(grads[i], states[i], members[i])
            members[i] = optim.apply_updates(members[i], u)
    for i in range(k_members):
        state_i = tree_map(lambda x, i=i: x[i], batched_state)
        for got, want in zip(lk.tree.tree_leaves(state_i), lk.tree.tree_leaves(states[i]),
                             strict=True):  # fmt: skip
            torch.testing.assert_close(got, want, **TOL[dtype])
        # Muon orthogonalises in bfloat16, and batched bf16 matmuls round differently from
        # single ones: its steps agree to bf16 precision (its float64 state above exactly).
        tol = dict(rtol=0, atol=0.1 * 0.01 * k_members) if name == "muon" else TOL[dtype]
        for k in params:
            torch.testing.assert_close(batched_params[k][i], members[i][k], **tol)


@pytest.mark.parametrize("name", ["adamw", "sgd", "asgd"])
@pytest.mark.parametrize("how", ["set_hyperparams", "set_learning_rate"])
def test_a_one_element_tensor_value_is_set_as_torch_reads_it(name, how):
    """``param_group["lr"] = torch.tensor([0.02])`` steps in torch (which reads the value
    as a scalar); setting a ``[1]``-shaped tensor here does the same, betas included."""
    params = {
        "w": torch.randn(3, 2, dtype=torch.float64),
        "t": torch.tensor(1.5, dtype=torch.float64),
    }
    g = torch.Generator().manual_seed(0)
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
             for _ in range(3)]  # fmt: skip
    lr = torch.tensor([0.02], dtype=torch.float64)
    betas = (torch.tensor([0.8], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64))
    if how == "set_learning_rate":  # the lr of a plain optimizer's state
        tx = getattr(optim, name)(lr=0.1)
    else:
        tx = optim.inject_hyperparams(getattr(optim, name))(lr=0.1)
    state = tx.init(params)
    if how == "set_learning_rate":
        state = optim.set_learning_rate(state, lr)
    elif name == "adamw":
        state = optim.set_hyperparams(state, lr=lr, betas=betas)
    else:
        state = optim.set_hyperparams(state, lr=lr)
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = TORCH_OPTIMIZERS[name](ps.values(), lr=0.1)
    opt.param_groups[0]["lr"] = lr
    if name == "adamw" and how == "set_hyperparams":
        opt.param_groups[0]["betas"] = betas
    got = params
    for gs in grads:
        got, state = optim.apply_gradients(tx, gs, state, got)
        for k, p in ps.items():
            p.grad = gs[k].clone()
        opt.step()
    for k, p in ps.items():
        assert got[k].shape == p.shape
        torch.testing.assert_close(got[k], p.detach(), **TOL[torch.float64])
    assert all(lr.shape == () for lr in optim.learning_rates(state))
    if how == "set_hyperparams":
        assert all(v.shape == (2,) if k == "betas" else v.shape == ()
                   for k, v in optim.hyperparams(state)[0].items())  # fmt: skip
