"""Ensembles: member k of a vmapped step equals a separate run of the plain step."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import loopkit as lk
from loopkit import ensemble, optim
from tests.helpers import KWARGS, MLPSpec, build_mlp, loss_fn, make_batches, mlp_specs

FP32 = dict(rtol=1e-5, atol=1e-6)
FP64 = dict(rtol=1e-10, atol=1e-12)
COMPILED = dict(rtol=1e-4, atol=1e-5)


def separate_run(model, opt, seed, batches):
    """The reference: the plain eager step on one model."""
    step = lk.train_step(model, loss_fn, opt)
    state = lk.TrainState.create(model, opt, seed=seed)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return state, torch.stack(losses)


def exact_twin(model, opt, seed, batches, ref):
    """In fp32, what a member is compared with: the same run as ``ref`` (``separate_run(
    model, opt, seed, batches)``) in float64, from the same initial params and data, cast
    to ``ref``'s dtypes. The example counts only where ``ref`` is within half of fp32's
    tolerance of it: then the plain step is accurate there, and a member whose batched
    kernels (vmap) round no worse is within fp32's tolerance of it. Elsewhere some element
    is rounding noise (a gradient that cancels to near zero, which the sign-like
    Adam/RMSprop steps turn into O(lr) moves), and the float64 examples check the member
    against the plain step."""
    double = copy.deepcopy(model).double()
    batches = [tuple(z.double() if z.is_floating_point() else z for z in b) for b in batches]
    exact, _ = separate_run(double, opt, seed, batches)
    exact = lk.tree.tree_map(lambda x, like: x.to(like.dtype), exact, ref)
    half = {key: value / 2 for key, value in FP32.items()}
    pairs = zip(lk.tree.tree_leaves(ref), lk.tree.tree_leaves(exact), strict=True)
    assume(all(torch.allclose(a, b, **half) for a, b in pairs if a.is_floating_point()))
    return exact


def assert_member_equals(member, state, tol):
    for field in ("params", "buffers"):
        got, want = getattr(member, field), getattr(state, field)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(
                got[name], want[name], **tol, msg=lambda m, n=name, f=field: f"{f} {n}: {m}"
            )
    got, want = lk.tree.tree_leaves(member.opt_state), lk.tree.tree_leaves(state.opt_state)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(member.step, state.step)


@given(
    spec=mlp_specs(),
    opt_name_kwargs=st.sampled_from(sorted(KWARGS)).flatmap(
        lambda name: KWARGS[name].map(lambda kw: (name, kw))
    ),
    lr_factors=st.lists(st.sampled_from([0.1, 0.5, 1.0, 2.0]), min_size=1, max_size=4),
    shared_batch=st.booleans(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_member_equals_a_separate_run(spec, opt_name_kwargs, lr_factors, shared_batch, seed, dtype):
    """Each member has its own initialisation (seed), its own lr (an lr sweep), its own
    Dropout masks (from its own rng) and, without shared_batch, its own data."""
    # BatchNorm's backward gives gradients that are sums cancelling to near zero, so the
    # 1-ulp differences between batched (vmap) and unbatched kernels become 1e-5..1e-4
    # relative in such an element after a few sign-like Adam/RMSprop steps. Hypothesis found
    # it first over 2-4 units, later over 16-19 (Adam betas=(0, 0.5): member vs plain step
    # 3.2e-6 abs in fp32, 5e-16 in float64, plain step vs torch's loop 1.2e-7). So fp32
    # runs models without BatchNorm, and float64 covers BatchNorm models (to 1e-10). Other
    # models cancel too (widths (2, 19, 14), ELU: a gradient element of -8e-7 whose fp32
    # rounding, 1e-2 of it, RMSprop's first step makes 3e-4 of the move; the ensemble's
    # member and the plain step were then 1.1e-5 and 1.3e-5 from float64, on opposite
    # sides): so fp32 members are compared with the exact run
    # where the plain step is accurate (exact_twin).
    assume(dtype == torch.float64 or not spec.batchnorm)
    name, kwargs = opt_name_kwargs
    k = len(lr_factors)
    seeds = [seed + i for i in range(k)]
    models = [build_mlp(spec, s, dtype) for s in seeds]
    opts = [getattr(optim, name)(**{**kwargs, "lr": kwargs["lr"] * f}) for f in lr_factors]
    data = [make_batches(spec, [8, 8, 8], s if not shared_batch else seed, dtype) for s in seeds]
    state = ensemble.stack(
        [lk.TrainState.create(m, o, seed=s) for m, o, s in zip(models, opts, seeds, strict=True)]
    )
    step = lk.ensemble_step(lk.train_step(models[0], loss_fn, opts[0]), shared_batch=shared_batch)
    losses = []
    for t in range(3):
        batch = (
            data[0][t]
            if shared_batch
            else tuple(torch.stack(z) for z in zip(*[d[t] for d in data], strict=True))
        )
        state, metrics = step(state, batch)
        assert metrics["loss"].shape == (k,) and metrics["acc"].shape == (k,)
        losses.append(metrics["loss"])
    tol = FP32 if dtype == torch.float32 else FP64
    for i, member in enumerate(ensemble.unstack(state)):
        ref, ref_losses = separate_run(models[i], opts[i], seeds[i], data[i])
        # equal_nan: fp32 rounds Adafactor's eps[0] ** 2 = 1e-60 to 0, so a zero gradient
        # (Dropout) gives NaN, as in torch; exact_twin then rejects the example
        torch.testing.assert_close(torch.stack(losses)[:, i], ref_losses, **tol, equal_nan=True)
        if dtype == torch.float32:
            ref = exact_twin(models[i], opts[i], seeds[i], data[i], ref)
        assert_member_equals(member, ref, tol)
        assert torch.equal(member.rng["cpu"], ref.rng["cpu"])  # Dropout drew the same masks


def test_create_and_set_hyperparams_equal_stacking_separate_states():
    def make():
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))

    opt = optim.sgd(lr=0.1, momentum=0.9)
    state = ensemble.set_hyperparams(ensemble.create(make, opt, seeds=[1, 2]), lr=[0.1, 0.01])
    want = []
    for seed, lr in [(1, 0.1), (2, 0.01)]:
        torch.manual_seed(seed)
        want.append(lk.TrainState.create(make(), optim.sgd(lr=lr, momentum=0.9), seed=seed))
    want = ensemble.stack(want)
    for a, b in zip(lk.tree.tree_leaves(state), lk.tree.tree_leaves(want), strict=True):
        assert torch.equal(a, b)
    assert ensemble.size(state) == 2
    torch.testing.assert_close(
        ensemble.hyperparams(state)["lr"][0], torch.tensor([0.1, 0.01], dtype=torch.float64)
    )


def test_stack_unstack_round_trip():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = optim.adamw(lr=1e-3)
    states = [lk.TrainState.create(build, opt, seed=s) for s, build in [(0, model), (1, model)]]
    back = ensemble.unstack(ensemble.stack(states))
    for a, b in zip(back, states, strict=True):
        for x, y in zip(lk.tree.tree_leaves(a), lk.tree.tree_leaves(b), strict=True):
            assert torch.equal(x, y)


def test_eval_step_per_member():
    def make():
        return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    opt = optim.sgd(lr=0.1)
    state = ensemble.create(make, opt, seeds=[0, 1, 2])
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    state, _ = lk.ensemble_step(lk.train_step(make(), loss_fn, opt))(state, batch)
    got = lk.ensemble_step(lk.eval_step(make(), loss_fn))(state, batch)
    for i, member in enumerate(ensemble.unstack(state)):
        want = lk.eval_step(make(), loss_fn)(member, batch)
        for key in want:
            torch.testing.assert_close(got[key][i], want[key], **FP32)


def test_fit_and_checkpoint_work_on_an_ensemble_state(tmp_path):
    def make():
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))

    opt = optim.adam(lr=1e-2)
    state = ensemble.set_hyperparams(
        ensemble.create(make, opt, seeds=[0, 1, 2]), lr=[1e-2, 3e-3, 1e-3]
    )
    step = lk.ensemble_step(lk.train_step(make(), loss_fn, opt))
    evaluate = lk.ensemble_step(lk.eval_step(make(), loss_fn))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = lk.data.Batches(x, y, batch_size=16, shuffle=True, seed=0)
    val = lk.data.Batches(x, y, batch_size=32)
    hooks = [lk.hooks.Validate(evaluate, val), lk.hooks.Checkpoint(tmp_path, keep_last=1)]
    first = lk.fit(step, state, data, epochs=2, hooks=hooks)
    ckpt = lk.checkpoint.latest(tmp_path)
    resumed = lk.checkpoint.load(ckpt, like=state)
    for a, b in zip(lk.tree.tree_leaves(resumed), lk.tree.tree_leaves(first), strict=True):
        assert torch.equal(a, b)
    meta = lk.checkpoint.read(ckpt)["metadata"]
    assert len(meta["logs"]["val/loss"]) == 3 and len(meta["logs"]["train/loss"]) == 3

    # Two more epochs from the checkpoint == four epochs straight (Dropout included).
    class FromEpoch:
        def __init__(self, start):
            self.start = start

        def __iter__(self):
            return iter(data)

        def __len__(self):
            return len(data)

        def set_epoch(self, epoch):
            data.set_epoch(epoch + self.start)

    continued = lk.fit(step, resumed, FromEpoch(2), epochs=2)
    straight = lk.fit(step, state, data, epochs=4)
    for a, b in zip(lk.tree.tree_leaves(continued), lk.tree.tree_leaves(straight), strict=True):
        assert torch.equal(a, b)
    # The members really differ (own init, own lr).
    m0, m1, _ = ensemble.unstack(straight)
    assert not torch.equal(m0.params["0.weight"], m1.params["0.weight"])


# --- compiled ------------------------------------------------------------------------------


@pytest.mark.compile
@settings(max_examples=2, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    opt_name_kwargs=st.sampled_from(["adamw", "sgd", "rmsprop"]).flatmap(
        lambda name: KWARGS[name].map(lambda kw: (name, kw))
    ),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_member_equals_a_separate_run(dtype, opt_name_kwargs, seed):
    """Per-member lrs and one compilation for all steps; BatchNorm in float64 only.

    In fp32, cancelling gradient sums make some configurations ill-conditioned (hypothesis
    found centered RMSprop with momentum 0.9 and maximize, with BatchNorm; and RMSprop with
    alpha=0.999, whose first steps are sign-like, without). There the plain fp32 step is
    itself 6e-4 relative off its float64 twin while the compiled member is closer, so, as
    in the eager ensemble test, fp32 members are compared with the float64 twin where the
    plain step is accurate (:func:`exact_twin`). In float64 all agree to 1e-13.
    """
    name, kwargs = opt_name_kwargs
    spec = MLPSpec(5, (12,), 3, "tanh", batchnorm=dtype == torch.float64, dropout=0.0)
    seeds = [seed, seed + 1, seed + 2]
    factors = [1.0, 0.5, 2.0]
    models = [build_mlp(spec, s, dtype) for s in seeds]
    opts = [getattr(optim, name)(**{**kwargs, "lr": kwargs["lr"] * f}) for f in factors]
    batches = make_batches(spec, [8] * 4, seed, dtype)
    tol = FP64 if dtype == torch.float64 else COMPILED
    state = ensemble.stack(
        [lk.TrainState.create(m, o, seed=s) for m, o, s in zip(models, opts, seeds, strict=True)]
    )
    counter = CompileCounterWithBackend("inductor")
    step = lk.ensemble_step(
        lk.train_step(models[0], loss_fn, opts[0]), compile=True, backend=counter
    )
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    assert counter.frame_count == 1, "the ensemble step recompiled"
    for i, member in enumerate(ensemble.unstack(state)):
        ref, ref_losses = separate_run(models[i], opts[i], seeds[i], batches)
        if dtype == torch.float32:
            ref = exact_twin(models[i], opts[i], seeds[i], batches, ref)
        torch.testing.assert_close(torch.stack(losses)[:, i], ref_losses, **tol)
        assert_member_equals(member, ref, tol)


@pytest.mark.compile
def test_compiled_ensemble_dropout_is_reproducible_and_differs_between_members():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2))
    opt = optim.sgd(lr=0.1)
    one = lk.TrainState.create(model, opt, seed=0)
    state = ensemble.stack([one, one, one])  # identical members: only the masks differ
    step = lk.ensemble_step(lk.train_step(model, loss_fn, opt), compile=True)
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    a, _ = step(state, batch)
    b, _ = step(state, batch)
    for x, y in zip(lk.tree.tree_leaves(a), lk.tree.tree_leaves(b), strict=True):
        assert torch.equal(x, y)
    w = a.params["0.weight"]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert not torch.equal(a.rng["cpu"][0], state.rng["cpu"][0])  # member 0's stream advanced


# --- errors --------------------------------------------------------------------------------


def test_stacking_different_structures_is_rejected():
    opt = optim.sgd(lr=0.1)
    a = lk.TrainState.create(nn.Linear(3, 2), opt)
    b = lk.TrainState.create(nn.Sequential(nn.Linear(3, 2)), opt)
    with pytest.raises(ValueError, match=r"state 1 differs in structure.*same model"):
        ensemble.stack([a, b])
    c = lk.TrainState.create(nn.Linear(4, 2), opt)
    with pytest.raises(ValueError, match=r"weight.*float32\[2, 3\].*float32\[2, 4\]"):
        ensemble.stack([a, c])
    moved = a.replace(step=a.step + 1)
    with pytest.raises(ValueError, match="different steps"):
        ensemble.stack([a, moved])
    with pytest.raises(ValueError, match="already an ensemble"):
        ensemble.stack([ensemble.stack([a, a])])


def test_member_count_mismatches_are_rejected():
    model = nn.Linear(3, 2)
    opt = optim.sgd(lr=0.1)
    state = ensemble.create(lambda: nn.Linear(3, 2), opt, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"one value per member: a leading dimension of 2, got"):
        ensemble.set_hyperparams(state, lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="sweep 'weight_decay'.*optim.inject_hyperparams"):
        ensemble.set_hyperparams(state, weight_decay=[0.1, 0.2])
    step = lk.ensemble_step(lk.train_step(model, loss_fn, opt), shared_batch=False)
    with pytest.raises(ValueError, match=r"leading member dimension of 2, got shape \[5, 3\]"):
        step(state, (torch.randn(5, 3), torch.randint(0, 2, (5,))))
    with pytest.raises(ValueError, match="single-model TrainState"):
        step(lk.TrainState.create(model, opt), (torch.randn(2, 5, 3), torch.zeros(2, 5)))
    plain = lk.train_step(model, loss_fn, opt)  # the other way round
    batch = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    for run in (plain, lk.eval_step(model, loss_fn)):
        with pytest.raises(ValueError, match=r"an ensemble state\. Run it with lk.ensemble_step"):
            run(state, batch)


def test_other_random_ops_in_an_eager_ensemble_are_rejected():
    model = nn.Linear(3, 2)
    opt = optim.sgd(lr=0.1)

    def noisy_loss(net, batch):
        x, y = batch
        return F.cross_entropy(net(x + torch.randn_like(x)), y)

    state = ensemble.create(lambda: nn.Linear(3, 2), opt, seeds=[0, 1])
    step = lk.ensemble_step(lk.train_step(model, noisy_loss, opt))
    with pytest.raises(lk.StepError, match="only Dropout draws from each member"):
        step(state, (torch.randn(4, 3), torch.randint(0, 2, (4,))))


def test_ensemble_step_needs_a_loopkit_step():
    with pytest.raises(TypeError, match="lk.train_step or lk.eval_step"):
        lk.ensemble_step(lambda s, b: (s, {}))


@given(
    kwargs=st.lists(
        st.fixed_dictionaries(
            dict(
                lr=st.floats(1e-4, 0.05),
                betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
                weight_decay=st.sampled_from([0.0, 1e-2, 0.1]),
                eps=st.sampled_from([1e-8, 1e-3]),
            )
        ),
        min_size=1,
        max_size=3,
    ),
    seed=st.integers(0, 2**16),
)
def test_sweep_of_injected_hyperparams_equals_separate_runs(kwargs, seed):
    """Per-member lr, betas, weight decay and eps through optim.inject_hyperparams; member k
    equals a separate run of plain optim.adamw with member k's numbers."""
    spec = MLPSpec(4, (10,), 3, "tanh", batchnorm=False, dropout=0.2)
    k = len(kwargs)
    seeds = [seed + i for i in range(k)]
    models = [build_mlp(spec, s) for s in seeds]
    injected = optim.inject_hyperparams(optim.adamw)(**kwargs[0])
    state = ensemble.stack(
        [lk.TrainState.create(m, injected, seed=s) for m, s in zip(models, seeds, strict=True)]
    )
    state = ensemble.set_hyperparams(
        state,
        **{name: [kw[name] for kw in kwargs] for name in ("lr", "betas", "weight_decay", "eps")},
    )
    torch.testing.assert_close(
        ensemble.hyperparams(state)["betas"][0],
        torch.tensor([kw["betas"] for kw in kwargs], dtype=torch.float64),
    )
    step = lk.ensemble_step(lk.train_step(models[0], loss_fn, injected))
    batches = make_batches(spec, [8, 8, 8], seed)
    for batch in batches:
        state, _ = step(state, batch)
    for i, member in enumerate(ensemble.unstack(state)):
        ref, _ = separate_run(models[i], optim.adamw(**kwargs[i]), seeds[i], batches)
        for name in ref.params:
            torch.testing.assert_close(member.params[name], ref.params[name], **FP32)


def test_a_cumulative_batchnorm_is_named_with_its_fix():
    """BatchNorm(momentum=None) reads num_batches_tracked as a number, which vmap cannot."""

    def make():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None), nn.Linear(8, 4))

    opt = optim.sgd(lr=0.1)
    step = lk.ensemble_step(lk.train_step(make(), lambda n, b: F.cross_entropy(n(b[0]), b[1]), opt))
    state = lk.ensemble.create(make, opt, seeds=[0, 1])
    with pytest.raises(lk.StepError, match=r"BatchNorm \['1'\] has momentum=None.*numeric"):
        step(state, (torch.randn(5, 6), torch.randint(0, 4, (5,))))


class TransposedDropout(nn.Module):
    """Dropout on a transposed (non-contiguous) activation: eager draws its mask in the
    activation's memory order (empty_like), so a member must too."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(6, 8), nn.Linear(8, 3), nn.Dropout(0.4)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x)).t()).t())


@pytest.mark.parametrize("shared_batch", [True, False])
def test_members_draw_dropout_on_a_transposed_activation_as_a_separate_run(shared_batch):
    opt = optim.sgd(lr=0.1)
    seeds = [3, 4]
    torch.manual_seed(0)
    models = [TransposedDropout() for _ in seeds]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
               for _ in range(2)]  # fmt: skip
    states = [lk.TrainState.create(m, opt, seed=s) for m, s in zip(models, seeds, strict=True)]
    state = ensemble.stack(states)
    step = lk.ensemble_step(lk.train_step(models[0], loss_fn, opt), shared_batch=shared_batch)
    for batch in batches:
        state, _ = step(state, batch if shared_batch else tuple(torch.stack([t, t]) for t in batch))
    for member, model, seed in zip(ensemble.unstack(state), models, seeds, strict=True):
        assert_member_equals(member, separate_run(model, opt, seed, batches)[0], FP32)


def test_a_swept_value_must_have_the_shape_of_what_it_replaces():
    """With 2 members, ``betas=[0.9, 0.5]`` once broadcast as one (beta1, beta2) pair for
    both members (the held value is ``[2, 2]``); the same for Rprop's ``etas``. A value of
    the wrong shape is an error naming the hyperparameter and the shape it needs."""
    make = lambda: nn.Linear(3, 2)  # noqa: E731
    state = ensemble.create(make, optim.inject_hyperparams(optim.adam)(lr=1e-2), seeds=[0, 1])
    with pytest.raises(ValueError, match=r"betas needs shape \[2, 2\]: one value of shape \[2\]"):
        ensemble.set_hyperparams(state, betas=[0.9, 0.5])
    with pytest.raises(ValueError, match=r"weight_decay needs shape \[2\]"):
        ensemble.set_hyperparams(state, weight_decay=[[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError, match=r"lr needs shape \[2\]"):
        ensemble.set_hyperparams(state, lr=[[0.1, 0.2], [0.3, 0.4]])
    rprop = ensemble.create(make, optim.inject_hyperparams(optim.rprop)(lr=1e-2), seeds=[0, 1])
    with pytest.raises(ValueError, match=r"etas needs shape \[2, 2\]"):
        ensemble.set_hyperparams(rprop, etas=[0.4, 1.3])
    swept = ensemble.set_hyperparams(state, betas=[(0.9, 0.99), (0.5, 0.9)])
    betas = ensemble.hyperparams(swept)["betas"][0]
    assert betas.tolist() == [[0.9, 0.99], [0.5, 0.9]]


def test_an_lr_sweep_a_schedule_overrides_is_warned_of():
    opt = optim.adam(lr=optim.schedules.linear_warmup(1e-3, warmup_steps=5))
    state = ensemble.set_hyperparams(ensemble.create(lambda: nn.Linear(3, 2), opt, seeds=[0, 1]),
                                     lr=[0.1, 0.01])  # fmt: skip
    step = lk.ensemble_step(lk.train_step(nn.Linear(3, 2), lambda n, b: n(b).pow(2).mean(), opt))
    with pytest.warns(UserWarning, match="schedule.*sweep did nothing"):
        step(state, torch.randn(4, 3))
    plain = optim.adam(lr=1e-3)  # a number lr takes the sweep: no warning
    state = ensemble.set_hyperparams(ensemble.create(lambda: nn.Linear(3, 2), plain, seeds=[0, 1]),
                                     lr=[0.1, 0.01])  # fmt: skip
    step = lk.ensemble_step(lk.train_step(nn.Linear(3, 2), lambda n, b: n(b).pow(2).mean(), plain))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(state, torch.randn(4, 3))


def test_a_sweep_of_an_injected_schedule_is_warned_of():
    """As for the lr: an injected weight decay that is a schedule recomputes the swept
    values at the next update (as a torch scheduler overwrites ``param_group``), so the
    sweep did nothing: warned, naming it. An injected number takes the sweep."""
    decay = optim.schedules.step_lr(0.1, step_size=10)
    loss = lambda n, b: n(b).pow(2).mean()  # noqa: E731
    for wd, warns in ((decay, True), (0.1, False)):
        opt = optim.inject_hyperparams(optim.adamw)(lr=0.1, weight_decay=wd)
        state = ensemble.create(lambda: nn.Linear(3, 2), opt, seeds=[0, 1])
        state = ensemble.set_hyperparams(state, weight_decay=[0.0, 0.5])
        step = lk.ensemble_step(lk.train_step(nn.Linear(3, 2), loss, opt))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state, _ = step(state, torch.randn(4, 3))
        said = [str(w.message) for w in caught if "sweep did nothing" in str(w.message)]
        assert bool(said) == warns and all("weight_decay" in m for m in said)
        held = ensemble.hyperparams(state)["weight_decay"][0]
        assert held.tolist() == ([0.1, 0.1] if warns else [0.0, 0.5])


def test_an_ensemble_trains_sparse_embeddings_and_refuses_gradient_hooks():
    """As a train step: ``sparse=True`` embeddings train as with ``sparse=False`` (the same
    gradient, dense), and a gradient hook on a Parameter, which would never run, is an
    error naming it."""

    def make(sparse):
        return lambda: nn.Sequential(
            nn.Embedding(10, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 3)
        )

    opt = optim.adam(lr=0.01)
    batch = (torch.randint(0, 10, (6, 3)), torch.randint(0, 3, (6,)))
    sparse_model, dense_model = make(True)(), make(False)()
    got = ensemble.create(make(True), opt, seeds=[0, 1])
    want = ensemble.create(make(False), opt, seeds=[0, 1])
    sparse_step = lk.ensemble_step(lk.train_step(sparse_model, loss_fn, opt))
    dense_step = lk.ensemble_step(lk.train_step(dense_model, loss_fn, opt))
    for _ in range(3):
        got, _ = sparse_step(got, batch)
        want, _ = dense_step(want, batch)
    for a, b in zip(lk.tree.tree_leaves(got), lk.tree.tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sparse_model[0].sparse  # restored after each call

    handle = sparse_model[2].weight.register_hook(lambda g: g * 0)
    hooked_step = lk.ensemble_step(lk.train_step(sparse_model, loss_fn, opt))
    with pytest.raises(lk.StepError, match=r"ensemble train step.*'2.weight'.*never run"):
        hooked_step(got, batch)
    handle.remove()
    hooked_step(got, batch)
