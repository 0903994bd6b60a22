"""The step on a CUDA device: parity with torch's own loop there, and the CUDA-graph path
(``mode="reduce-overhead"``): recorded once with the state static, same numbers as eager,
Dropout masks that follow the state's generator, metrics that survive the next replay, a
new state (a resumed one) that trains on.

These run only where CUDA is (``benchmarks/gpu.sh`` runs them first, and
``benchmarks/RESULTS.md`` records the run). ``LOOPKIT_TEST_DEVICE=cpu`` runs them on the
CPU, where inductor skips CUDA graphs: a check of the tests themselves, not of CUDA."""

import contextlib
import os
from itertools import pairwise

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.utils import counters

import loopkit as lk
from loopkit import optim
from tests.helpers import (
    KWARGS,
    OpCounter,
    assert_state_matches,
    build_mlp,
    imperative_run,
    loss_fn,
    make_batches,
    mlp_specs,
    run_steps,
)
from tests.test_compile import COMPILED, STEP_OPTIONS, assert_compiled_matches_eager

DEVICE = torch.device(os.environ.get("LOOPKIT_TEST_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(
    CUDA and not torch.cuda.is_available(), reason="needs a CUDA device (or LOOPKIT_TEST_DEVICE)"
)
# Eager on the same device as torch's loop: float32 to the 1e-5 standard. A maximizing
# optimizer with a large lr can diverge, in torch's loop as in ours: NaN matches NaN.
EAGER = dict(rtol=1e-5, atol=1e-6, equal_nan=True)


def to(device, tree):
    return lk.tree.tree_map(lambda t: t.to(device), tree)


def batches(n: int, size: int = 12, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        to(DEVICE, (torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)))
        for _ in range(n)
    ]


def mlp(*middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    bn = any(isinstance(m, nn.BatchNorm1d) for m in middle)
    return nn.Sequential(nn.Linear(6, 16, bias=not bn), *middle, nn.Tanh(), nn.Linear(16, 3)).to(
        DEVICE
    )


class _Graphs:
    """What inductor's CUDA-graph trees did while the block ran: graphs recorded (their
    non-static inputs summed) and graphs skipped."""

    def __enter__(self):
        self.start = dict(counters["inductor"])
        return self

    def __exit__(self, *exc):
        self.skips = counters["inductor"]["cudagraph_skips"] - self.start.get("cudagraph_skips", 0)
        key = "cudagraph_recorded_non_static_inputs"
        self.non_static_inputs = counters["inductor"][key] - self.start.get(key, 0)


# ---------------------------------------------------------------------- eager parity


@settings(max_examples=20, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    spec=mlp_specs(),
    opt_name_kwargs=st.sampled_from(sorted(KWARGS)).flatmap(
        lambda name: KWARGS[name].map(lambda kw: (name, kw))
    ),
    clip_norm=st.sampled_from([None, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_eager_step_on_the_device_matches_the_imperative_loop(spec, opt_name_kwargs, clip_norm,
                                                              seed):  # fmt: skip
    """Dropout included: ``TrainState.create(seed=...)`` seeds the device's generator as
    ``torch.manual_seed(seed)`` does, so the masks are torch's."""
    name, kwargs = opt_name_kwargs
    model = build_mlp(spec, seed).to(DEVICE)
    data = to(DEVICE, make_batches(spec, [8, 9, 8], seed))
    opt = getattr(optim, name)(**kwargs)
    step = lk.train_step(model, loss_fn, opt, clip_norm=clip_norm)
    state = lk.TrainState.create(model, opt, seed=seed)
    assert state.step.device == model[0].weight.device
    state, losses = run_steps(step, state, data)
    ref, ref_losses = imperative_run(model, data, name, kwargs, seed=seed, clip_norm=clip_norm)
    torch.testing.assert_close(losses, ref_losses, **EAGER)
    assert_state_matches(state, ref, **EAGER)


@contextlib.contextmanager
def _syncs_raise():
    """On CUDA, a host sync inside the block raises (sync debug mode); elsewhere nothing."""
    if CUDA:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")


FUSED = {
    "adam": dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True),
    "adamw": dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True),
    "sgd": dict(lr=3e-2, momentum=0.9, weight_decay=0.1, nesterov=True),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_eager_fused_update_on_the_device_is_torchs_fused_update(name):
    """The eager Adam/AdamW/SGD update runs torch's fused kernel on the device: bitwise
    ``torch.optim``'s ``fused=True`` given the lr the kernel reads (on CUDA a float32 tensor
    on the device, on the CPU a double), with no host sync (CUDA's sync debug mode raises
    on one). float64 params on CUDA, whose kernel would read a float32 lr, run the chain."""
    g = torch.Generator().manual_seed(0)
    params = {f"w{i}": torch.randn(5, i + 1, generator=g).to(DEVICE) for i in range(4)}
    grads = [{k: torch.randn(v.shape, generator=g).to(DEVICE) for k, v in params.items()}
             for _ in range(3)]  # fmt: skip
    kwargs = dict(FUSED[name])
    tx = getattr(optim, name)(**kwargs)
    state, got = tx.init(params), params
    for grad in grads:
        with _syncs_raise(), OpCounter() as ops:
            got, state = optim.apply_gradients(tx, grad, state, got)
        assert ops.count[f"_fused_{name}_"] == 1

    lr = torch.tensor(kwargs.pop("lr"), device=DEVICE) if CUDA else kwargs.pop("lr")
    ref = {k: v.clone() for k, v in params.items()}
    torch_opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    opt = torch_opt(list(ref.values()), lr=lr, fused=True, **kwargs)
    for grad in grads:
        for p, gr in zip(ref.values(), grad.values(), strict=True):
            p.grad = gr
        opt.step()
    for k in params:
        assert torch.equal(got[k], ref[k]), k

    doubles = {k: v.double() for k, v in params.items()}
    with OpCounter() as ops:
        optim.apply_gradients(tx, {k: v.double() for k, v in grads[0].items()},
                              tx.init(doubles), doubles)  # fmt: skip
    assert bool(ops.count[f"_fused_{name}_"]) == (not CUDA)


@pytest.mark.parametrize(
    "name, kwargs, marker",
    [
        ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1), "_fused_adagrad_"),
        ("RMSprop", dict(lr=0.01, weight_decay=0.1, momentum=0.9, centered=True),
         "_foreach_addcdiv_"),
    ],
)  # fmt: skip
def test_eager_adagrad_and_rmsprop_batch_on_the_cpu_only(name, kwargs, marker):
    """torch 2.13 has no CUDA Adagrad kernel (and a later torch's is not checked against
    torch.optim here), and RMSprop's batched ops read the lr as a number: on CUDA the chain
    runs, with no host sync; on the CPU the kernel or the batched ops."""
    g = torch.Generator().manual_seed(0)
    params = {f"w{i}": torch.randn(5, i + 1, generator=g).to(DEVICE) for i in range(3)}
    grads = {k: torch.randn(v.shape, generator=g).to(DEVICE) for k, v in params.items()}
    tx = getattr(optim, name.lower())(**kwargs)
    state = tx.init(params)
    with _syncs_raise(), OpCounter() as ops:
        got, _ = optim.apply_gradients(tx, grads, state, params)
    assert bool(ops.count[marker]) == (not CUDA)
    ref = {k: v.clone() for k, v in params.items()}
    opt = getattr(torch.optim, name)(list(ref.values()), **kwargs)
    for p, gr in zip(ref.values(), grads.values(), strict=True):
        p.grad = gr
    opt.step()
    for k in params:
        torch.testing.assert_close(got[k], ref[k], **EAGER)


# ------------------------------------------------------------------------ CUDA graphs


@pytest.mark.compile
@pytest.mark.parametrize("name", sorted(set(STEP_OPTIONS) - {"dropout"}))
def test_every_step_option_runs_in_one_cuda_graph_and_matches_eager(name):
    """Each option of test_compile's table, with CUDA graphs: the compiled step equals the
    eager one on the device, compiles one graph, records one CUDA graph whose only
    non-static inputs are the batch's two tensors (the state is updated where it lives), and
    writes the new state into the input state's tensors. Dropout: see the test below."""
    make_model, make_opt, step_kw, compile_kw, tol = STEP_OPTIONS[name]
    model, opt = make_model().to(DEVICE), make_opt()
    compile_kw = {**compile_kw, "mode": "reduce-overhead"}
    eager = lk.train_step(model, loss_fn, opt, **step_kw)
    compiled = lk.train_step(model, loss_fn, opt, compile=True, **step_kw, **compile_kw)
    graphs = counters["stats"]["unique_graphs"]
    with _Graphs() as cuda_graphs:
        assert_compiled_matches_eager(eager, compiled, model, opt, batches(5), tol, True)
    assert counters["stats"]["unique_graphs"] - graphs == 1, "the step recompiled"
    if CUDA:
        assert cuda_graphs.skips == 0, "inductor skipped CUDA graphs (see TORCH_LOGS=perf_hints)"
        assert cuda_graphs.non_static_inputs == 2, "the state is copied into the graph"


def test_the_compiled_step_matches_the_imperative_loop_on_the_device():
    """The CUDA-graph step against torch's AdamW loop itself (not only loopkit's eager step)
    over BatchNorm and gradient clipping."""
    model = mlp(nn.BatchNorm1d(16))
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    opt = optim.adamw(**kwargs)
    step = lk.train_step(model, loss_fn, opt, clip_norm=0.5, compile=True, mode="reduce-overhead")
    state = lk.TrainState.create(model, opt, seed=0)
    data = batches(6)
    state, losses = run_steps(step, state, data)
    ref, ref_losses = imperative_run(model, data, "adamw", kwargs, seed=0, clip_norm=0.5)
    torch.testing.assert_close(losses, ref_losses, **COMPILED)
    assert_state_matches(state, ref, **COMPILED)


def _mask_fingerprint(net, batch):
    """A loss over a model ending in Dropout whose metric identifies the mask drawn (a
    weighted count of the kept units: different masks give different fingerprints; the
    integer sums stay exact in float32)."""
    x, y = batch
    h = net(x)
    kept = (h != 0).to(torch.float32)
    weights = torch.arange(1, kept.numel() + 1, device=kept.device, dtype=torch.float32)
    loss = nn.functional.cross_entropy(h[:, :3], y)
    return loss, {"mask": (kept.flatten() * weights).sum(), "kept": kept.mean()}


def test_cuda_graph_dropout_masks_follow_the_state_rng():
    """A replayed graph must draw new masks each step (not the recorded ones), the same
    masks again from the same state, and advance the state's generator."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Dropout(0.5)).to(DEVICE)
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, _mask_fingerprint, opt, compile=True, mode="reduce-overhead")
    state = lk.TrainState.create(model, opt, seed=0)
    batch = batches(1, size=32)[0]
    masks, rngs = [], []
    for _ in range(5):
        rngs.append(state.rng)
        before = lk.tree.tree_map(torch.clone, state)  # donated: the step overwrites state
        state, metrics = step(state, batch)
        masks.append(float(metrics["mask"]))
        assert 0.35 < float(metrics["kept"]) < 0.65
    assert len(set(masks)) == len(masks), f"a mask repeated across steps: {masks}"
    assert all(
        not torch.equal(r1[k], r2[k]) for r1, r2 in pairwise(rngs) for k in r1 if k != "cpu"
    ), "the step did not advance the device generator"
    # The last step again, from a copy of its input state: the same mask and the same state.
    again, metrics = step(before, batch)
    assert float(metrics["mask"]) == masks[-1]
    for x, y in zip(lk.tree.tree_leaves(again), lk.tree.tree_leaves(state), strict=True):
        assert torch.equal(x, y)


def test_cuda_graph_metrics_survive_the_next_replay():
    """Outputs of a CUDA graph live in memory the next replay overwrites: the step copies
    its metrics out, so metrics kept from step 1 still hold step 1's values."""
    model = mlp()
    opt = optim.adamw(lr=1e-2)
    eager = lk.train_step(model, loss_fn, opt)
    compiled = lk.train_step(model, loss_fn, opt, compile=True, mode="reduce-overhead")
    a = lk.TrainState.create(model, opt)
    b = lk.TrainState.create(model, opt)
    want, got = [], []
    for batch in batches(5):
        a, ma = eager(a, batch)
        b, mb = compiled(b, batch)
        want.append(ma)
        got.append(mb)
    for w, g in zip(want, got, strict=True):
        for k in w:
            torch.testing.assert_close(g[k], w[k], **COMPILED)


def test_cuda_graph_step_takes_a_new_state_and_resumes_exactly(tmp_path):
    """A state the graph was not recorded with (a second run, a restored checkpoint) has
    other addresses: the step must train it correctly, and a run interrupted and resumed
    through fit's checkpoints must equal one never interrupted, Dropout included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.2), nn.Tanh(), nn.Linear(32, 3)).to(DEVICE)
    opt = optim.adamw(lr=1e-2)
    step = lk.train_step(model, loss_fn, opt, compile=True, mode="reduce-overhead")
    data = batches(4, seed=1)

    def run(directory, max_steps, resume=None):
        state = lk.TrainState.create(model, opt, seed=3)
        hooks = [lk.hooks.Checkpoint(directory, every=1)]
        return lk.fit(step, state, data, max_steps=max_steps, hooks=hooks, resume=resume)

    straight = run(tmp_path / "straight", 8)
    run(tmp_path / "resumed", 4)
    resumed = run(tmp_path / "resumed", 8, resume="latest")
    assert int(resumed.step) == 8
    for x, y in zip(lk.tree.tree_leaves(resumed), lk.tree.tree_leaves(straight), strict=True):
        assert x.device == y.device
        assert torch.equal(x, y)


def test_cuda_graph_eval_step_matches_eager():
    model = mlp(nn.BatchNorm1d(16))
    opt = optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt)
    state, _ = lk.train_step(model, loss_fn, opt)(state, batches(1)[0])  # running stats
    eager = lk.eval_step(model, loss_fn)
    compiled = lk.eval_step(model, loss_fn, compile=True, mode="reduce-overhead")
    kept = []
    for batch in batches(4, seed=2):
        want, got = eager(state, batch), compiled(state, batch)
        kept.append((want, got))
    for want, got in kept:
        for k in want:
            torch.testing.assert_close(got[k], want[k], **COMPILED)


def test_bench_variants_train_alike_on_the_device(tmp_path):
    """The GPU comparison's variants (imperative compiled, loopkit with CUDA graphs) train
    the same AdamW from the same weights: their first losses agree."""
    from loopkit import bench

    variants = ["imperative_eager", "imperative_compiled", "loopkit_eager", "loopkit_compiled"]
    result = bench.run(bench.TINY, variants, device=str(DEVICE), rounds=1, steps=2,
                       compile_time_models=(), log=lambda _: None)  # fmt: skip
    for case in bench.TINY:
        rows = {r["variant"]: r for r in result["rows"] if r["case"] == case.label}
        for v in variants:
            torch.testing.assert_close(
                torch.tensor(rows[v]["losses"]),
                torch.tensor(rows["imperative_eager"]["losses"]),
                **COMPILED,
                msg=lambda m, v=v, c=case.label: f"{c} {v}: {m}",
            )
