"""The compiled step: same numbers as the eager step, one compilation, clear errors."""

import copy
import gc
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import loopkit as lk
from loopkit import optim
from tests.helpers import (
    KWARGS,
    assert_state_matches,
    build_mlp,
    imperative_run,
    loss_fn,
    make_batches,
    mlp_specs,
    run_steps,
)

pytestmark = pytest.mark.compile
# equal_nan: a maximizing optimizer with a large lr can diverge, in eager as compiled.
COMPILED = dict(rtol=1e-4, atol=1e-5, equal_nan=True)


# Each example is a cold compile (5-25 s here): few examples, and no shrinking.
@settings(max_examples=4, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    spec=mlp_specs(dropout=0.0),
    opt_name_kwargs=st.sampled_from(sorted(KWARGS)).flatmap(
        lambda name: KWARGS[name].map(lambda kw: (name, kw))
    ),
    clip_norm=st.sampled_from([None, 0.5]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_compiled_step_matches_the_imperative_loop(spec, opt_name_kwargs, clip_norm, seed, dtype):
    """No Dropout here: compiled code draws its masks with inductor's kernels, which it may
    reorder, so they differ from eager's (reproducibility from the state is tested below)."""
    name, kwargs = opt_name_kwargs
    model = build_mlp(spec, seed, dtype)
    batches = make_batches(spec, [8, 8, 8, 8], seed, dtype)
    opt = getattr(optim, name)(**kwargs)
    compiled = lk.train_step(model, loss_fn, opt, clip_norm=clip_norm, compile=True)
    state = before = lk.TrainState.create(model, opt, seed=seed)
    snapshot = lk.tree.tree_map(torch.clone, before)
    state, losses = run_steps(compiled, state, batches)
    ref, ref_losses = imperative_run(model, batches, name, kwargs, seed=seed, clip_norm=clip_norm)
    torch.testing.assert_close(losses, ref_losses, **COMPILED)
    assert_state_matches(state, ref, **COMPILED)
    # Pure: the input state is untouched.
    for got, want in zip(lk.tree.tree_leaves(before), lk.tree.tree_leaves(snapshot), strict=True):
        assert torch.equal(got, want)


def test_compiles_once_while_the_schedule_changes_the_lr():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3)
    )
    opt = optim.adamw(lr=optim.schedules.linear_warmup(1e-2, warmup_steps=5), weight_decay=0.1)
    counter = CompileCounterWithBackend("inductor")
    step = lk.train_step(model, loss_fn, opt, clip_norm=1.0, compile=True, backend=counter)
    state = lk.TrainState.create(model, opt, seed=0)
    batches = [(torch.randn(12, 5), torch.randint(0, 3, (12,))) for _ in range(8)]
    state, _ = step(state, batches[0])
    compiled = counter.frame_count
    assert compiled >= 1
    lrs = []
    for batch in batches[1:]:
        state, _ = step(state, batch)
        lrs.append(float(state.opt_state[-1].lr))
    assert counter.frame_count == compiled, "the step recompiled"
    assert len(set(lrs)) > 3  # the lr really changed between calls
    # A compiled step is reproducible from its state (Dropout masks included).
    s1, _ = step(state, batches[0])
    s2, _ = step(state, batches[0])
    assert all(
        torch.equal(x, y)
        for x, y in zip(lk.tree.tree_leaves(s1), lk.tree.tree_leaves(s2), strict=True)
    )
    assert counter.frame_count == compiled


def test_compiled_eval_step_matches_eager():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    state = lk.TrainState.create(model, optim.sgd(), seed=0)
    batch = (torch.randn(6, 4), torch.randint(0, 2, (6,)))
    want = lk.eval_step(model, loss_fn)(state, batch)
    got = lk.compile(lk.eval_step(model, loss_fn), backend="aot_eager")(state, batch)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **COMPILED)


def test_graph_break_is_reported_with_a_fix():
    """The error names what broke the graph, the fix, and where: the user's line, which
    torch puts at the end of a long message (a cut to its start once lost it)."""
    model = nn.Linear(3, 2)
    opt = optim.sgd(lr=0.1)

    def chatty_loss(net, batch):
        loss, aux = loss_fn(net, batch)
        if loss > 1.0:  # data-dependent control flow breaks the graph
            loss = loss * 2
        return loss, aux

    step = lk.train_step(model, chatty_loss, opt, compile=True, backend="eager")
    with pytest.raises(lk.CompileError, match=r"(?s)one graph.*fullgraph=False") as caught:
        step(lk.TrainState.create(model, opt), (torch.randn(4, 3), torch.randint(0, 2, (4,))))
    assert "in chatty_loss" in str(caught.value) and "if loss > 1.0" in str(caught.value)

    def printing_loss(net, batch):
        loss, aux = loss_fn(net, batch)
        print("loss is", loss.item())  # a host sync: breaks the graph
        return loss, aux

    step = lk.train_step(model, printing_loss, opt, compile=True, backend="eager")
    with pytest.raises(lk.CompileError, match=r"(?s)one graph.*item.*fullgraph=False"):
        step(lk.TrainState.create(model, opt), (torch.randn(4, 3), torch.randint(0, 2, (4,))))


def test_user_errors_under_compile_are_reported_as_in_eager():
    model = nn.Linear(3, 2)
    opt = optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt)
    step = lk.train_step(model, loss_fn, opt, compile=True, backend="eager")
    with pytest.raises(lk.StepError, match=r"train step 0 .*float32\[4, 7\]"):
        step(state, (torch.randn(4, 7), torch.randint(0, 2, (4,))))
    bad_loss = lk.train_step(model, lambda net, b: net(b[0]), opt, compile=True, backend="eager")
    with pytest.raises(lk.LossError, match="scalar loss"):
        bad_loss(state, (torch.randn(4, 3), None))


def test_weight_decay_and_momentum_of_matrix_weights_compile_correctly():
    """Regression: torch 2.13's inductor drops ``alpha`` in ``mm(...).add(x, alpha=a)``,
    which once made compiled weight decay wrong on every Linear weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = optim.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    eager = lk.train_step(model, loss_fn, opt)
    compiled = lk.train_step(model, loss_fn, opt, compile=True)
    a = b = lk.TrainState.create(model, opt)
    for _ in range(3):
        batch = (torch.randn(8, 5), torch.randint(0, 3, (8,)))
        a, _ = eager(a, batch)
        b, _ = compiled(b, batch)
    for k in a.params:
        torch.testing.assert_close(b.params[k], a.params[k], **COMPILED)


def test_one_cycle_with_momentum_cycling_compiles_once():
    """A compiled step driven through a whole OneCycle schedule (lr and momentum cycling)
    compiles once, and its lr trajectory is torch's OneCycleLR's."""
    from loopkit.optim import schedules

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    total = 12
    cycle = dict(total_steps=total, pct_start=0.3)
    opt = optim.sgd(
        lr=schedules.one_cycle_lr(0.1, **cycle),
        momentum=schedules.one_cycle_momentum(**cycle),  # 0.85 <-> 0.95, torch's defaults
    )
    counter = CompileCounterWithBackend("inductor")
    step = lk.train_step(model, loss_fn, opt, compile=True, backend=counter)
    state = lk.TrainState.create(model, opt)
    torch_opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1, momentum=0.9)
    torch_sched = torch.optim.lr_scheduler.OneCycleLR(torch_opt, max_lr=0.1, **cycle)
    for _ in range(total):
        want_lr = torch_sched.get_last_lr()[0]
        state, _ = step(state, (torch.randn(6, 4), torch.randint(0, 2, (6,))))
        assert float(optim.learning_rates(state.opt_state)[0]) == pytest.approx(want_lr, rel=1e-12)
        torch_opt.step()
        torch_sched.step()
    assert counter.frame_count == 1


def _mlp(*middle: nn.Module) -> nn.Module:
    """No bias before a BatchNorm: its true gradient is 0, and Adam would turn the rounding
    noise there into O(lr) steps (see helpers.build_mlp)."""
    torch.manual_seed(0)
    bn = any(isinstance(m, nn.BatchNorm1d) for m in middle)
    return nn.Sequential(nn.Linear(6, 16, bias=not bn), *middle, nn.Tanh(), nn.Linear(16, 3))


# Mixed precision: inductor fuses the bf16/fp16 ops and may keep intermediates in float32
# where eager rounds them, so compiled and eager agree to the low precision's resolution
# (bf16 has 8 significant bits: 2**-8 ~ 4e-3), not to float32's.
MIXED = dict(rtol=1e-2, atol=1e-3)
STEP_OPTIONS = {
    # name: (model, optimizer, train_step options, compile options, tolerance)
    "clip": (_mlp, lambda: optim.adamw(lr=1e-2), dict(clip_norm=0.5), {}, COMPILED),
    "accumulate": (
        _mlp,
        lambda: optim.accumulate(optim.adamw(lr=1e-2), 2),
        {},
        {},
        COMPILED,
    ),
    "batchnorm": (
        lambda: _mlp(nn.BatchNorm1d(16)),
        lambda: optim.adamw(lr=1e-2),
        {},
        {},
        COMPILED,
    ),  # fmt: skip
    # On CPU inductor keeps Dropout's bernoulli_ as an eager kernel, called in the
    # forward's order, so the compiled masks are eager's (on CUDA they are inductor's own).
    "dropout": (
        lambda: _mlp(nn.Dropout(0.3)),
        lambda: optim.adamw(lr=1e-2),
        {},
        {},
        COMPILED,
    ),  # fmt: skip
    "donate": (
        lambda: _mlp(nn.BatchNorm1d(16)),
        lambda: optim.adamw(lr=1e-2),
        dict(clip_norm=0.5),
        dict(donate=True),
        COMPILED,
    ),
    # On CPU inductor skips CUDA graphs; this runs the static-state, donated path.
    "reduce-overhead": (
        _mlp,
        lambda: optim.sgd(lr=0.05, momentum=0.9),
        {},
        dict(mode="reduce-overhead"),
        COMPILED,
    ),
    "bf16": (
        _mlp,
        lambda: optim.sgd(lr=0.05, momentum=0.9),
        dict(precision="bf16"),
        {},
        MIXED,
    ),  # fmt: skip
    "fp16": (
        _mlp,
        lambda: lk.precision.dynamic_loss_scale(
            optim.sgd(lr=0.05, momentum=0.9), init_scale=2.0**20, growth_interval=2
        ),
        dict(precision="fp16"),
        {},
        MIXED,
    ),
}


@pytest.mark.parametrize("name", sorted(STEP_OPTIONS))
def test_every_step_option_compiles_once_and_matches_eager(name):
    """For each option: the compiled step equals the eager one (itself proven equal to
    torch's imperative loop in test_step / test_wrappers / test_precision) over several
    steps, and compiles exactly one graph."""
    from torch._dynamo.utils import counters

    make_model, make_opt, step_kw, compile_kw, tol = STEP_OPTIONS[name]
    model, opt = make_model(), make_opt()
    eager = lk.train_step(model, loss_fn, opt, **step_kw)
    compiled = lk.train_step(model, loss_fn, opt, compile=True, **step_kw, **compile_kw)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g))
               for _ in range(4)]  # fmt: skip
    graphs = counters["stats"]["unique_graphs"]
    donated = bool(compile_kw.get("donate") or compile_kw.get("mode"))
    assert_compiled_matches_eager(eager, compiled, model, opt, batches, tol, donated)
    assert counters["stats"]["unique_graphs"] - graphs == 1, "the step recompiled"


def assert_compiled_matches_eager(eager, compiled, model, opt, batches, tol, donated):
    """Run both steps from the same state over ``batches``: equal metrics at each step,
    equal final states, and (``donated``) the compiled step's new state held in its input
    state's tensors."""
    a = lk.TrainState.create(model, opt, seed=0)
    b = lk.TrainState.create(model, opt, seed=0)
    for batch in batches:
        a, ma = eager(a, batch)
        given = b
        b, mb = compiled(b, batch)
        for k in ma:
            torch.testing.assert_close(mb[k], ma[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
        if donated:
            assert all(
                x is y
                for x, y in zip(lk.tree.tree_leaves(b), lk.tree.tree_leaves(given), strict=True)
                if x.dtype != torch.uint8  # the rng states are new tensors
            )
    for x, y in zip(lk.tree.tree_leaves(b), lk.tree.tree_leaves(a), strict=True):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("name", ["adam", "adamw", "nadam", "radam", "adamax"])
def test_compiled_bias_corrections_are_computed_once_per_step_not_per_element(name):
    """Regression: inductor inlined ``1 - b ** t`` into every param's element loop, where the
    C++ compiler (with -fmath-errno) cannot hoist ``pow``: a quarter of the compiled MLP
    step. The element loop of the update must hold no pow/exp/log of the step count."""
    from torch._inductor.utils import run_and_get_code

    opt = getattr(optim, name)(lr=1e-3)
    params = {"w": torch.randn(4096)}
    grads = {"w": torch.randn(4096)}

    def update(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    compiled = torch.compile(update, fullgraph=True, backend="inductor")
    _, (code, *_) = run_and_get_code(compiled, grads, opt.init(params), params)
    kernels = code.split('extern "C"')[1:]
    loops = [k for k in kernels if "4096L" in k]
    assert loops, "expected a kernel looping over the param's 4096 elements"
    for kernel in loops:
        body = kernel.split("4096L", 1)[1]
        for fn in ("std::pow", "std::exp", "std::log"):
            assert fn not in body, f"{fn} of the step count recomputed per element:\n{kernel}"


class _Scaled(nn.Module):
    """A model with a 0-dim parameter: in float64 on CPU, it and its optimizer moments are
    float64 scalars like the lr."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.body(x) / self.temperature


@pytest.mark.parametrize("donate", [False, True])
def test_float64_scalars_in_the_state_compile_in_one_pass_and_take_new_values(donate):
    """Regression: Dynamo turns each float64 0-dim CPU input (the lr, injected
    hyperparameters, a 0-dim float64 param and its moments) into a symbolic float and then
    restarts the whole analysis to specialize it away: seconds of every cold compile.
    The compiled step must trace once, never recompile when those values change, and equal
    the eager step (donated: in the caller's own tensors)."""
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    torch.manual_seed(0)
    model = _Scaled().double()
    opt = optim.inject_hyperparams(optim.adamw)(lr=1e-2, weight_decay=0.1)
    counter = CompileCounterWithBackend("aot_eager")
    eager = lk.train_step(model, loss_fn, opt)
    compiled = lk.train_step(model, loss_fn, opt, compile=True, backend=counter, donate=donate)
    a = lk.TrainState.create(model, opt, seed=0)
    b = lk.TrainState.create(model, opt, seed=0)
    g = torch.Generator().manual_seed(1)
    clear_compilation_metrics()
    for lr in [1e-2, 3e-3, 5e-2]:
        a = a.replace(opt_state=optim.set_learning_rate(a.opt_state, lr))
        b = b.replace(opt_state=optim.set_learning_rate(b.opt_state, lr))
        batch = (torch.randn(10, 6, generator=g, dtype=torch.float64),
                 torch.randint(0, 3, (10,), generator=g))  # fmt: skip
        given = lk.tree.tree_leaves(b)
        a, ma = eager(a, batch)
        b, mb = compiled(b, batch)
        torch.testing.assert_close(mb["loss"], ma["loss"], rtol=1e-12, atol=1e-12)
        if donate:  # the new values are in the caller's own tensors, lr included
            for x, y in zip(given, lk.tree.tree_leaves(a), strict=True):
                if x.dtype != torch.uint8:  # the rng states are new tensors
                    torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    for x, y in zip(lk.tree.tree_leaves(b), lk.tree.tree_leaves(a), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert float(lk.optim.learning_rates(b.opt_state)[0]) == 5e-2
    restarts = [m.restart_reasons for m in get_compilation_metrics() if m.restart_reasons]
    assert not restarts, f"Dynamo restarted its analysis: {restarts}"
    assert counter.frame_count == 1, "the step recompiled"


class _Pair(NamedTuple):
    first: Any
    second: Any


_leaves = st.sampled_from(
    [
        lambda: torch.tensor(0.25, dtype=torch.float64),  # lifted
        lambda: torch.tensor(3),
        lambda: torch.tensor(0.5),
        lambda: torch.ones(2, dtype=torch.float64),
        lambda: torch.ones(1, dtype=torch.float64),
        lambda: 1.5,
        lambda: None,
    ]
).map(lambda make: make())
_trees = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from("abc"), children, max_size=3),
        st.tuples(children, children).map(lambda t: _Pair(*t)),
        st.tuples(children, children).map(lambda t: _Batch(*t)),
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(first=_trees, second=_trees)
def test_lifted_arguments_lower_back_to_the_same_tensors(first, second):
    """A lifter wraps exactly the float64 0-dim CPU tensors of the arguments it first
    sees, and only such tensors ever; lowering gives back the same structure and values in
    the same storage, also for a call whose arguments have another structure than the
    remembered one (its paths stale: it searches again)."""
    from loopkit import scalars

    shared = scalars.Lifter()
    for args in [(first,), (second,), (first,)]:
        for lifter in (scalars.Lifter(), shared):
            lifted = lifter(args)
            want, spec = lk.tree.tree_flatten(args)
            marks = [
                isinstance(x, scalars.Lifted)
                for x in lk.tree.tree_leaves(
                    lifted, is_leaf=lambda x: isinstance(x, scalars.Lifted)
                )
            ]
            scalar = [scalars.is_float64_scalar(x) for x in want]
            assert not any(m and not s for m, s in zip(marks, scalar, strict=True))
            if lifter is not shared:
                assert marks == scalar
            got, got_spec = lk.tree.tree_flatten(scalars.lower(lifted, lifter.paths))
            assert got_spec == spec
            for g, w in zip(got, want, strict=True):
                if isinstance(w, torch.Tensor):
                    assert g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w)
                    assert g.data_ptr() == w.data_ptr()
                else:
                    assert g is w


class _Batch(tuple):
    """A tuple subclass with its own constructor: lifting must leave it as it is."""

    def __new__(cls, x, y):
        return super().__new__(cls, (x, y))


@pytest.mark.parametrize("fullgraph", [True, False])
def test_donated_step_names_where_the_optimizer_changed_its_state_structure(fullgraph):
    """donate=True writes the new state into the old one, so the two must line up: an
    optimizer whose state grows a key gets an error naming the place, and the state it was
    given is untouched (with graph breaks allowed too, where the check runs compiled after
    the params were computed: nothing is written before the whole structure is checked)."""

    def grow(params):
        return {"n": torch.zeros(())}

    def grow_update(g, s, p=None):
        return g, {"n": s["n"] + 1, "extra": torch.zeros(())}

    tx = optim.chain(optim.sgd(lr=0.1), optim.Transform(grow, grow_update))
    model = nn.Linear(3, 1)
    step = lk.train_step(model, lambda net, b: net(b).pow(2).mean(), tx, compile=True,
                         backend="eager", donate=True, fullgraph=fullgraph)  # fmt: skip
    state = lk.TrainState.create(model, tx)
    before = copy.deepcopy(state)
    with pytest.raises(lk.StepError, match=r"at opt_state\[1\] it got \{n: float32\[\], extra"):
        step(state, torch.ones(2, 3))
    for a, b in zip(lk.tree.tree_leaves(state), lk.tree.tree_leaves(before), strict=True):
        assert torch.equal(a, b)


class _FloatState(NamedTuple):
    n: torch.Tensor
    beta: float


def test_donated_step_keeps_equal_non_tensor_state_leaves():
    """A state holding a Python float the update rebuilds each step (equal, not the same
    object) donates like any other: the tensors are written, the float is left alone."""

    def init(params):
        return _FloatState(torch.zeros(()), 0.5)

    def update(g, s, p=None):
        return {k: -s.beta * v for k, v in g.items()}, _FloatState(s.n + 1, s.beta * 1.0)

    tx = optim.Transform(init, update)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    loss = lambda net, b: net(b).pow(2).mean()  # noqa: E731
    eager = lk.train_step(model, loss, tx)
    donated = lk.train_step(model, loss, tx, compile=True, backend="eager", donate=True)
    batches = [torch.randn(2, 3) for _ in range(2)]
    got, _ = run_steps(donated, lk.TrainState.create(model, tx), batches)
    want, _ = run_steps(eager, lk.TrainState.create(model, tx), batches)
    torch.testing.assert_close(got.params, want.params, **COMPILED)
    assert int(got.opt_state.n) == 2 and got.opt_state.beta == 0.5


@pytest.mark.parametrize("factory", [optim.sgd, optim.adam])
def test_optimizers_built_inside_the_trace_survive_garbage_collection_while_compiling(factory):
    """Regression (CI, intermittent): inject_hyperparams rebuilds its optimizer inside the
    compiled step, and building one registered its fused apply in a weak-keyed registry
    while Dynamo traced. Dynamo then guarded on the registry's keys, and a key collected
    between tracing and guard building failed the compile with an IndexError. Here dead
    registry entries are left for the collector, which runs inside the backend."""

    def collecting_backend(gm, example_inputs):
        gc.collect()
        return gm.forward

    def loss(net, batch):
        x, y = batch
        return nn.functional.mse_loss(net(x), y)

    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    opt = optim.inject_hyperparams(factory)(lr=0.1)
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    eager = lk.train_step(model, loss, opt)
    compiled = lk.train_step(model, loss, opt, compile=True, backend=collecting_backend)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(8):
            cycle: list = [factory()]  # its update function dies only with the cycle
            cycle.append(cycle)
        del cycle
        state, _ = run_steps(compiled, lk.TrainState.create(model, opt), [batch] * 2)
    finally:
        if was_enabled:
            gc.enable()
    want, _ = run_steps(eager, lk.TrainState.create(model, opt), [batch] * 2)
    torch.testing.assert_close(state.params, want.params, rtol=1e-12, atol=1e-12)


def test_donated_step_reads_a_replaced_lr_and_hypergradients_reach_the_lr():
    """Regressions: with donate=True, an injected lr whose ``.data`` was replaced was read
    (and written) at its old storage; without donation, an lr that starts requiring grad
    after the first call lost its gradient to a cached view. A tuple-subclass batch with
    its own ``__new__`` passes through untouched."""

    def loss(net, batch):
        x, y = batch
        return nn.functional.mse_loss(net(x), y)

    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    opt = optim.inject_hyperparams(optim.sgd)(lr=0.1)
    batch = _Batch(torch.ones(4, 3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))
    donated = lk.train_step(model, loss, opt, compile=True, backend="aot_eager", donate=True)
    state, _ = donated(lk.TrainState.create(model, opt), batch)
    state.opt_state.hyperparams["lr"].data = torch.tensor(0.0, dtype=torch.float64)
    before = state.params["weight"].clone()
    state, _ = donated(state, batch)
    torch.testing.assert_close(state.params["weight"], before, rtol=0, atol=0)

    pure = lk.train_step(model, loss, opt, compile=True, backend="aot_eager")
    eager = lk.train_step(model, loss, opt)
    grads = []
    for step in (pure, eager):
        state = lk.TrainState.create(model, opt)
        step(state, batch)  # the first call, before the lr requires grad
        lr = state.opt_state.hyperparams["lr"].requires_grad_()
        new, _ = step(state, batch)
        (g,) = torch.autograd.grad(new.params["weight"].sum(), [lr])
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    assert grads[1] != 0


def test_donation_refuses_float64_scalars_it_cannot_write_back():
    """A float64 0-dim CPU tensor in a container lifting does not enter (an OrderedDict
    here): torch.compile would drop the donated step's in-place write to it, silently.
    The step says so instead; without donation it trains as eager."""
    from collections import OrderedDict

    def scaled_sgd() -> optim.Transform:
        def init(params):
            return OrderedDict(lr=torch.tensor(0.1, dtype=torch.float64))

        def update(g, state, params=None):
            lr = state["lr"]
            return {k: -lr.to(v.dtype) * v for k, v in g.items()}, OrderedDict(lr=lr * 0.5)

        return optim.Transform(init, update)

    torch.manual_seed(0)
    model, opt = nn.Linear(3, 2), scaled_sgd()
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    donated = lk.train_step(model, loss_fn, opt, compile=True, backend="aot_eager", donate=True)
    with pytest.raises(lk.StepError, match="OrderedDict|containers other than"):
        donated(lk.TrainState.create(model, opt), batch)
    pure = lk.train_step(model, loss_fn, opt, compile=True, backend="aot_eager")
    eager = lk.train_step(model, loss_fn, opt)
    a = b = lk.TrainState.create(model, opt)
    for _ in range(2):
        a, _ = eager(a, batch)
        b, _ = pure(b, batch)
    for x, y in zip(lk.tree.tree_leaves(b), lk.tree.tree_leaves(a), strict=True):
        torch.testing.assert_close(x, y, **COMPILED)
    assert float(b.opt_state["lr"]) == 0.025


@pytest.mark.parametrize("kind", ["plain", "requires_grad", "inference"])
def test_donated_step_reads_float64_scalars_of_the_batch_without_writing_them(kind):
    """Regression: a donated step lifted a float64 0-dim tensor of the *batch* (a loss
    target scale here) like one of the state, and copied it back after the call: a batch tensor
    requiring grad or made in inference mode then raised, after the state had advanced.
    Only the state is written: the batch's tensor keeps its version, and the steps equal
    eager."""

    def loss(net, batch):
        x, y, w = batch
        return nn.functional.mse_loss(net(x), w * y)

    def weight(value: float) -> torch.Tensor:
        if kind == "inference":
            with torch.inference_mode():
                return torch.tensor(value, dtype=torch.float64)
        return torch.tensor(value, dtype=torch.float64, requires_grad=kind == "requires_grad")

    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    opt = optim.inject_hyperparams(optim.adam)(lr=0.1)  # a lifted lr in the state too
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, generator=g, dtype=torch.float64),
                torch.randn(4, 1, generator=g, dtype=torch.float64), weight(w))
               for w in (2.0, 0.5, 3.0)]  # fmt: skip
    version = lambda w: None if w.is_inference() else w._version  # noqa: E731
    versions = [version(b[2]) for b in batches]
    donated = lk.train_step(model, loss, opt, compile=True, backend="aot_eager", donate=True)
    eager = lk.train_step(model, loss, opt)
    got, got_losses = run_steps(donated, lk.TrainState.create(model, opt), batches)
    want, want_losses = run_steps(eager, lk.TrainState.create(model, opt), batches)
    torch.testing.assert_close(got.params, want.params, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.opt_state, want.opt_state, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_losses.detach(), want_losses.detach(), rtol=1e-12, atol=1e-12)
    assert [version(b[2]) for b in batches] == versions
    assert [float(b[2]) for b in batches] == [2.0, 0.5, 3.0]


def _keep_previous_params() -> optim.Transform:
    """A state holding the params the update started from (as lookahead or
    Barzilai-Borwein keep them): the new state *is* input tensors, at other places."""
    return optim.Transform(
        lambda params: {k: v.clone() for k, v in params.items()},
        lambda g, state, params=None: (g, dict(params)),
    )


def _shift_history() -> optim.Transform:
    """``prev2 <- prev1 <- g``: the new state holds an input tensor one place over."""

    def init(params):
        return tuple({k: torch.zeros_like(v) for k, v in params.items()} for _ in range(2))

    return optim.Transform(init, lambda g, state, params=None: (g, (dict(g), state[0])))


@pytest.mark.parametrize("keep", [_keep_previous_params, _shift_history])
def test_donated_step_writes_a_state_that_holds_input_tensors_elsewhere(keep):
    """Regression: donation copied new into old pair by pair, so a new leaf that is an old
    tensor being overwritten (the previous params, a history shifted by one) was read
    after its overwrite. Donated equals eager, state and params."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    tx = optim.chain(keep(), optim.sgd(lr=0.5))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(3)]  # fmt: skip
    donated = lk.train_step(model, loss_fn, tx, compile=True, backend="aot_eager", donate=True)
    got, _ = run_steps(donated, lk.TrainState.create(model, tx), batches)
    want, _ = run_steps(lk.train_step(model, loss_fn, tx), lk.TrainState.create(model, tx),
                        batches)  # fmt: skip
    torch.testing.assert_close(got.params, want.params, **COMPILED)
    torch.testing.assert_close(got.opt_state, want.opt_state, **COMPILED)


class _Logged(nn.Module):
    """A float64 0-dim param (lifted, as the lr), logged as a metric, and a graph break."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.t = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        out = self.lin(x) / self.t
        torch._dynamo.graph_break()
        return out


def test_donated_step_compiles_once_for_fresh_states():
    """Regression: the donated step called id() on its input tensors inside the compiled
    code, so Dynamo guarded on each state tensor's identity: every new state (a fresh run,
    a resumed checkpoint) recompiled, and the ninth hit the recompile limit. Fresh states
    share one compilation, each equal to the eager step and written into its own
    tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 3))
    tx = optim.adam(lr=0.05)
    counter = CompileCounterWithBackend("aot_eager")
    donated = lk.train_step(model, loss_fn, tx, compile=True, backend=counter, donate=True)
    eager = lk.train_step(model, loss_fn, tx)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(2)]  # fmt: skip
    for seed in range(4):
        fresh = lk.TrainState.create(model, tx, seed=seed)  # new tensors, and new values:
        fresh = fresh.replace(params={k: v + 0.1 * seed for k, v in fresh.params.items()})
        want, want_losses = run_steps(eager, fresh, batches)
        mine = lk.tree.tree_map(torch.clone, fresh)
        got, losses = run_steps(donated, mine, batches)
        torch.testing.assert_close(losses, want_losses, **COMPILED)
        for a, b in zip(lk.tree.tree_leaves(got), lk.tree.tree_leaves(want), strict=True):
            torch.testing.assert_close(a, b, **COMPILED)
        parts = (got.params, got.buffers, got.opt_state, got.step)
        given = (mine.params, mine.buffers, mine.opt_state, mine.step)
        assert all(
            a is b
            for a, b in zip(lk.tree.tree_leaves(parts), lk.tree.tree_leaves(given), strict=True)
        ), "the donated step did not write into the state it was given"
    assert counter.frame_count == 1, "a fresh state recompiled the donated step"


def test_donated_step_with_graph_breaks_updates_float64_scalars_and_logs_old_values():
    """Regressions: with fullgraph=False and a graph break, torch 2.13 dropped the donated
    writes of the state's float64 0-dim CPU tensors (a 0-dim param and its moments, the lr
    a schedule sets); and a metric that is a param came back with the value after the
    update. Donated equals eager: params, moments, lr and metrics."""

    def logged(net, batch):
        x, y = batch
        return nn.functional.cross_entropy(net(x), y), {"t": net.params["t"]}

    torch.manual_seed(0)
    model = _Logged().double()
    tx = optim.adam(lr=optim.schedules.linear_warmup(0.05, warmup_steps=3, start_factor=0.2))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]  # fmt: skip
    donated = lk.train_step(model, logged, tx, compile=True, backend="aot_eager",
                            donate=True, fullgraph=False)  # fmt: skip
    eager = lk.train_step(model, logged, tx)
    states = [lk.TrainState.create(model, tx) for _ in range(2)]
    for batch in batches:
        for i, step in enumerate((donated, eager)):
            states[i], metrics = step(states[i], batch)
            if i == 0:
                got_t = metrics["t"]
        torch.testing.assert_close(got_t, metrics["t"], rtol=1e-12, atol=1e-12)
        assert optim.learning_rates(states[0].opt_state) == optim.learning_rates(
            states[1].opt_state
        )
    got, want = ((s.params, s.buffers, s.opt_state, s.step) for s in states)
    for a, b in zip(lk.tree.tree_leaves(got), lk.tree.tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(states[0].params["t"]) != 1.5


def test_two_steps_with_graph_breaks_keep_their_own_compiled_frames():
    """With fullgraph=False the frames after a graph break (the objective, the rest of the
    step) are code that every step built by train_step shares: with only the input guards,
    the second step reused the first's graph (its metrics lost 'extra', or a KeyError for a
    metric it never had). Each step now runs its own loss_fn, as eager."""

    def loss_a(net, batch):
        torch._dynamo.graph_break()
        return loss_fn(net, batch)

    def loss_b(net, batch):
        torch._dynamo.graph_break()
        loss, metrics = loss_fn(net, batch)
        return 3 * loss, {**metrics, "extra": loss.detach() * 0 + 7}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = optim.sgd(lr=0.1)
    batch = (torch.randn(6, 4), torch.randint(0, 2, (6,)))
    state = lk.TrainState.create(model, opt)
    for make in (loss_a, loss_b):
        compiled = lk.train_step(model, make, opt, compile=True, fullgraph=False,
                                 backend="aot_eager")  # fmt: skip
        got, metrics = compiled(state, batch)
        want, want_metrics = lk.train_step(model, make, opt)(state, batch)
        assert set(metrics) == set(want_metrics)
        for k in want_metrics:
            torch.testing.assert_close(metrics[k], want_metrics[k], **COMPILED)
        for a, b in zip(lk.tree.tree_leaves(got), lk.tree.tree_leaves(want), strict=True):
            torch.testing.assert_close(a, b, **COMPILED)


@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_donated_step_names_a_state_leaf_that_changed_dtype_or_shape(change):
    """A copy into the input's tensor would cast (int64 <- float: truncated) or broadcast
    silently: the step names the leaf instead, and the state is untouched."""

    def init(params):
        return {"n": torch.tensor(0) if change == "dtype" else torch.zeros(2)}

    def update(g, s, p=None):
        return g, {"n": s["n"] + 0.5 if change == "dtype" else s["n"].sum()}

    tx = optim.chain(optim.Transform(init, update), optim.sgd(lr=0.1))
    model = nn.Linear(3, 1)
    step = lk.train_step(model, lambda net, b: net(b).pow(2).mean(), tx, compile=True,
                         backend="eager", donate=True)  # fmt: skip
    state = lk.TrainState.create(model, tx)
    before = copy.deepcopy(state)
    got, expected = ("float32[]", "int64[]") if change == "dtype" else ("float32[]", "float32[2]")
    with pytest.raises(lk.StepError) as error:
        step(state, torch.ones(2, 3))
    assert f"at opt_state[0]['n'] it got {got}, expected {expected}" in str(error.value)
    for a, b in zip(lk.tree.tree_leaves(state), lk.tree.tree_leaves(before), strict=True):
        assert torch.equal(a, b)


def test_a_python_number_in_the_batch_that_recompiles_is_named_at_the_recompile_limit():
    """A Python float in the batch (mixup's lam) compiles in as a constant: each new value
    recompiles, and at Dynamo's limit the step raised a StepError blaming the data. It
    names the usual causes and the fix instead, state untouched."""

    def mixup(net, batch):
        x, y, lam = batch
        return lam * nn.functional.cross_entropy(net(x), y)

    torch.manual_seed(0)
    model, tx = nn.Linear(5, 3), optim.sgd(lr=0.1)
    step = lk.train_step(model, mixup, tx, compile=True, backend="eager", donate=True)
    state = lk.TrainState.create(model, tx)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with torch._dynamo.config.patch(recompile_limit=2):
        state, _ = step(state, (x, y, 0.25))
        state, _ = step(state, (x, y, 0.5))
        before = copy.deepcopy(state)
        with pytest.raises(lk.CompileError, match=r"Python number in the batch.*torch.tensor"):
            step(state, (x, y, 0.75))
    for a, b in zip(lk.tree.tree_leaves(state), lk.tree.tree_leaves(before), strict=True):
        assert torch.equal(a, b)


def test_donated_step_refuses_a_batch_that_requires_grad_by_name():
    """Undonated, a batch being learned (dataset distillation) trains through the step; a
    donated step cannot be part of its graph, and says so (it blamed a graph break)."""
    torch.manual_seed(0)
    model, tx = nn.Linear(5, 3), optim.sgd(lr=0.1)
    x, y = torch.randn(8, 5, requires_grad=True), torch.randint(0, 3, (8,))
    step = lk.train_step(model, loss_fn, tx, compile=True, backend="aot_eager", donate=True)
    state = lk.TrainState.create(model, tx)
    before = copy.deepcopy(state)
    with pytest.raises(lk.StepError, match="batch holding tensors that require grad"):
        step(state, (x, y))
    for a, b in zip(lk.tree.tree_leaves(state), lk.tree.tree_leaves(before), strict=True):
        assert torch.equal(a, b)
    step(state, (x.detach(), y))  # detached, it trains


def test_a_mode_with_another_backend_is_ignored_with_a_warning():
    """mode= configures inductor; with another backend torch rejected it beside the guard
    filter's option. The step builds, warns, and equals eager."""
    torch.manual_seed(0)
    model, tx = nn.Linear(5, 3), optim.sgd(lr=0.1)
    with pytest.warns(UserWarning, match="configures inductor"):
        step = lk.train_step(model, loss_fn, tx, compile=True, backend="aot_eager",
                             mode="max-autotune-no-cudagraphs")  # fmt: skip
    batch = (torch.randn(8, 5), torch.randint(0, 3, (8,)))
    got, _ = step(lk.TrainState.create(model, tx), batch)
    want, _ = lk.train_step(model, loss_fn, tx)(lk.TrainState.create(model, tx), batch)
    torch.testing.assert_close(got.params, want.params, **COMPILED)


@pytest.mark.parametrize("donate", [False, True])
def test_a_compiled_forward_that_writes_its_params_leaves_an_undonated_input_intact(donate):
    """Embedding(max_norm) renormalises its weight in place: the compiled graph writes it
    back into its input, which the step gives as a copy-on-write view unless donated (a
    donated state is the step's to write)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, max_norm=1.0), nn.Flatten(), nn.Linear(18, 4))
    opt = optim.sgd(lr=0.5, momentum=0.9)

    def loss(net, batch):
        return F.cross_entropy(net(batch[0]), batch[1])

    eager = lk.train_step(model, loss, opt)
    compiled = lk.train_step(model, loss, opt, compile=True, donate=donate)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 10, (5, 3), generator=g), torch.randint(0, 4, (5,), generator=g))
               for _ in range(3)]  # fmt: skip
    a = b = lk.TrainState.create(model, opt)
    for batch in batches:
        before = lk.tree.tree_map(torch.clone, b)
        a, _ = eager(a, batch)
        given_state = b
        b, _ = compiled(b, batch)
        if not donate:
            for x, y in zip(
                lk.tree.tree_leaves(given_state), lk.tree.tree_leaves(before), strict=True
            ):
                assert torch.equal(x, y)
    for x, y in zip(lk.tree.tree_leaves(b), lk.tree.tree_leaves(a), strict=True):
        torch.testing.assert_close(x, y, **COMPILED)


def test_activation_checkpointing_under_compile_is_named_with_its_fix():
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(checkpoint(self.a, x, use_reentrant=False))

    model, opt = Block(), optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt, compile=True)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(lk.CompileError, match="checkpointing.*without compile=True"):
        step(lk.TrainState.create(model, opt), batch)
    # torch leaves saved-tensor hooks disabled after such a failed trace; the step undoes it
    eager = lk.train_step(model, loss_fn, opt)
    eager(lk.TrainState.create(model, opt), batch)


def test_a_cumulative_batchnorm_under_compile_is_named_with_its_fix():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None), nn.Linear(8, 2))
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt, compile=True)
    with pytest.raises(lk.CompileError, match=r"BatchNorm \['1'\] has momentum=None.*numeric"):
        step(lk.TrainState.create(model, opt), (torch.randn(5, 6), torch.randint(0, 2, (5,))))


def test_a_backend_failure_names_the_fullgraph_given_and_old_weight_norm_with_its_fix():
    """The old-style weight_norm hook fails in the backend (not a graph break): the error
    names the fullgraph the step was compiled with, the module and the parametrizations
    fix, and does not suggest fullgraph=False."""
    with pytest.warns(FutureWarning, match="weight_norm"):
        wn = torch.nn.utils.weight_norm(nn.Linear(3, 4))
    model, opt = nn.Sequential(wn, nn.Tanh(), nn.Linear(4, 2)), optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt, compile=True, fullgraph=False, backend="aot_eager")
    with pytest.raises(lk.CompileError) as info:
        step(lk.TrainState.create(model, opt), (torch.randn(4, 3), torch.randint(0, 2, (4,))))
    message = str(info.value)
    assert message.startswith("torch.compile could not compile the train step (fullgraph=False)")
    assert "\\['0'\\]" not in message and "['0'] use the old torch.nn.utils.weight_norm" in message
    assert "parametrizations.weight_norm" in message and "compile with fullgraph" not in message


def test_a_sparse_embedding_compiles_with_its_dense_gradient():
    """Dynamo cannot trace a sparse gradient: the compiled step, as the eager one, runs the
    embedding with sparse=False (the same gradient, dense)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    opt = optim.adam(lr=0.1)
    state = lk.TrainState.create(model, opt)
    batch = (torch.randint(0, 10, (8, 3)), torch.randint(0, 2, (8,)))
    want, _ = lk.train_step(model, loss_fn, opt)(state, batch)
    got, _ = lk.train_step(model, loss_fn, opt, compile=True, backend="eager")(state, batch)
    for k in want.params:
        torch.testing.assert_close(got.params[k], want.params[k], **COMPILED)
    assert model[0].sparse
