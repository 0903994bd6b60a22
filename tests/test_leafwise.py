"""leafwise: a per-leaf formula run on groups of leaves with multi-tensor kernels gives
exactly the per-leaf result (tree_map), batches where it should and only there."""

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loopkit as lk
import loopkit.optim.leafwise as leafwise_module
from loopkit import optim
from loopkit.optim.leafwise import leafwise
from loopkit.tree import tree_map
from tests.helpers import OpCounter


@pytest.fixture(autouse=True)
def _batch_on_the_cpu(monkeypatch):
    """leafwise batches accelerator tensors only (see its docstring); here it batches CPU
    tensors too, where torch's foreach ops are the single-tensor ops in a loop, so the
    batched path must give tree_map's values bitwise."""
    monkeypatch.setattr(leafwise_module, "FOREACH_DEVICES", frozenset({"cpu"}))


S = torch.tensor(0.3)  # a 0-dim tensor hyperparameter (injected, or a bias correction)
S64 = torch.tensor(0.3, dtype=torch.float64)

# Formulas as the transforms write them: operators with tensors, numbers and 0-dim tensors
# on either side, tensor methods, torch functions (batched or not), dtype casts.
FORMULAS = {
    "add_mul_number": lambda x, y: x + y * 0.5,
    "rsub_div": lambda x, y: 2.0 - x / y,
    "lerp_number": lambda x, y: torch.lerp(x, y, 0.1),
    "lerp_tensor": lambda x, y: torch.lerp(x, y, S.to(x.dtype)),
    "addcmul_abs_sqrt": lambda x, y: x.addcmul(y, y, value=0.2).abs().sqrt(),
    "maximum_times_scalar_tensor": lambda x, y: torch.maximum(x, y) * S.to(x.dtype),
    "scalar_tensor_times": lambda x, y: S.to(x.dtype) * x + y,
    "scalar_tensor_plus_over": lambda x, y: x / (y.abs().sqrt() / S.to(y.dtype) + 1e-8),
    "where": lambda x, y: torch.where(S > 0, x, y),
    "mul_sign_neg": lambda x, y: -(x.mul(y).sign()),
    "masked_fill": lambda x, y: x.masked_fill(y.lt(0), 0),
    "to_own_dtype": lambda x, y: (x + y).to(x.dtype),
    "div_sub": lambda x, y: x.div(y) - y,
    "torch_sqrt_neg": lambda x, y: torch.neg(torch.sqrt(x.abs())) + y,
    "reverse_ops": lambda x, y: 1.0 / (1 + x.abs()) + 3 * y,
    "clamp": lambda x, y: x.clamp(-0.5, 0.5) * y,
    # Scalars not cast to the leaves' dtype, on either side (torch's CPU mul of a bf16
    # tensor and a float32 0-dim tensor rounds differently in the two orders).
    "uncast_scalar_first": lambda x, y: S * x + S64 * y,
    "uncast_scalar_second": lambda x, y: x * S + y * S64,
    "uncast_add": lambda x, y: S + x + (y + S64),
    "comparisons": lambda x, y: x * (y != 0) + y * (x > 0) - (x <= y) * 2.0,
    "pow_abs_pos": lambda x, y: abs(x) ** 2 + (+y) ** 0.5,
    "number_first": lambda x, y: 3 * x + 0.5 + y,
}


FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def trees(draw):
    """Two dicts of tensors with the same keys: mixed shapes (0-dim too) and dtypes, the
    second tree's dtype drawn apart from the first's, in a random key order."""
    n = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tree, other = {}, {}
    for i in draw(st.permutations(range(n))):
        shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
        tree[f"p{i}"] = torch.randn(shape, generator=g).to(draw(st.sampled_from(FLOATS)))
        other[f"p{i}"] = torch.randn(shape, generator=g).to(draw(st.sampled_from(FLOATS)))
    return tree, other


def assert_bitwise(got: dict, want: dict):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k].nan_to_num(), want[k].nan_to_num()), k
        assert torch.equal(got[k].isnan(), want[k].isnan()), k


@settings(max_examples=150)
@given(pair=trees(), name=st.sampled_from(sorted(FORMULAS)))
def test_leafwise_equals_tree_map_bitwise(pair, name):
    tree, other = pair
    fn = FORMULAS[name]
    try:
        want = tree_map(fn, tree, other)
    except RuntimeError as e:  # e.g. lerp of float32 and float64: leafwise refuses too
        with pytest.raises(type(e)):
            leafwise(fn, tree, other)
        return
    assert_bitwise(leafwise(fn, tree, other), want)


def _params(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(3, i + 1, generator=g) for i in range(n)}


def _adamw_ops(n: int) -> collections.Counter:
    params = _params(n)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    opt = optim.adamw(lr=1e-3, weight_decay=1e-2)
    state = opt.init(params)
    with OpCounter() as ops:
        updates, _ = opt.update(grads, state, params)
        optim.apply_updates(params, updates)
    return ops.count


def test_an_eager_adamw_update_dispatches_the_same_ops_for_any_number_of_params():
    """The point of leafwise: AdamW + decoupled decay + lr + apply is a fixed number of
    multi-tensor ops (plus the scalar bias corrections), as torch.optim's foreach AdamW,
    not ~13 per param."""
    few, many = _adamw_ops(4), _adamw_ops(16)
    assert few == many
    # 12, and 2 clamps keeping a +-inf param's decay term finite (torch keeps such a param)
    assert sum(c for k, c in many.items() if k.startswith("_foreach")) == 14, many
    assert sum(many.values()) < 30, many


def test_cpu_leaves_take_the_per_leaf_path_by_default(monkeypatch):
    """Batching is for accelerators, as torch.optim's foreach default (on the CPU it was
    measured slower than the per-leaf ops)."""
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    devices = frozenset(_get_foreach_kernels_supported_devices())
    monkeypatch.setattr(leafwise_module, "FOREACH_DEVICES", devices)
    assert "cuda" in devices and "cpu" not in devices
    few, many = _adamw_ops(4), _adamw_ops(16)
    assert not any(k.startswith("_foreach") for k in many)
    assert many["lerp"] == 16 and few["lerp"] == 4


def test_clipping_batches_too_and_computes_torchs_norm():
    from loopkit.optim.transforms import clip_by_global_norm_with_norm

    counts = []
    for n in (4, 8):
        params = _params(n)
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        with OpCounter() as ops:
            clipped, norm = clip_by_global_norm_with_norm(grads, 0.5)
        counts.append(ops.count)
        assert ops.count["_foreach_norm"] == 1 and ops.count["_foreach_mul"] == 1
        want = torch.nn.utils.get_total_norm(list(grads.values()), foreach=False)
        assert torch.equal(norm, want)
        for k, g in grads.items():
            assert torch.equal(clipped[k], g * torch.clamp(0.5 / (want + 1e-6), max=1.0))
    assert counts[0] == counts[1]


@settings(max_examples=400)
@given(pair=trees(), norm_type=st.sampled_from([1.0, 2.0, 3.0, float("inf")]))
def test_global_norm_is_torchs_total_norm_bitwise(pair, norm_type):
    """Grouped by device and dtype in torch's order, as get_total_norm groups them."""
    from loopkit.optim.transforms import global_norm

    grads = pair[0]
    want = torch.nn.utils.get_total_norm(list(grads.values()), norm_type)
    assert torch.equal(global_norm(grads, norm_type), want)


def test_forward_mode_ad_goes_through_the_per_leaf_code():
    """torch 2.13's forward-AD rule for _foreach_norm is broken: under forward AD the clip
    runs per leaf and gives the per-leaf tangent."""
    import torch.autograd.forward_ad as fwAD

    from loopkit.optim.transforms import clip_by_global_norm_with_norm

    grads = _params(3)
    tangents = {k: torch.randn_like(v) for k, v in grads.items()}
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(v, tangents[k]) for k, v in grads.items()}
        clipped, norm = clip_by_global_norm_with_norm(duals, 0.5)
        got = {k: fwAD.unpack_dual(v).tangent for k, v in clipped.items()}
    norms = [torch.linalg.vector_norm(g) for g in grads.values()]
    total = torch.linalg.vector_norm(torch.stack(norms))
    assert torch.equal(fwAD.unpack_dual(norm).primal, total)
    for k in grads:
        assert got[k] is not None and got[k].shape == grads[k].shape


def test_leafwise_falls_back_to_tree_map_where_batching_does_not_apply():
    params = _params(3)
    fn = FORMULAS["lerp_tensor"]
    other = {k: torch.randn_like(v) for k, v in params.items()}
    want = tree_map(fn, params, other)

    # Under a torch.func transform (vmap'd ensembles, differentiated updates): per leaf.
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    stacked_other = {k: torch.stack([v, v]) for k, v in other.items()}
    got = torch.func.vmap(lambda a, b: leafwise(fn, a, b))(stacked, stacked_other)
    for k in want:
        torch.testing.assert_close(got[k][1], want[k], rtol=0, atol=0)

    # Leaves that require grad: per leaf, and the gradient flows.
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    with OpCounter() as ops:
        out = leafwise(fn, leaves, other)
    assert not any(k.startswith("_foreach") for k in ops.count)
    sum(v.sum() for v in out.values()).backward()
    for v in leaves.values():
        torch.testing.assert_close(v.grad, torch.full_like(v, 1 - 0.3), rtol=0, atol=0)

    # A tensor lr that requires grad (hypergradients) reaches the result per leaf.
    lr = torch.tensor(0.1, requires_grad=True)
    out = leafwise(lambda g: g * -lr, params)
    sum(v.sum() for v in out.values()).backward()
    torch.testing.assert_close(lr.grad, -sum(v.sum() for v in params.values()))

    # Other trees, and dicts that do not line up, go to tree_map unchanged.
    assert torch.equal(leafwise(torch.neg, (params["layer0.weight"],))[0], -params["layer0.weight"])
    with pytest.raises(ValueError):
        leafwise(torch.add, params, {"other": torch.ones(1)})


def test_compiled_update_is_the_per_leaf_code():
    """Inside torch.compile leafwise is tree_map: the traced graph has no foreach ops."""
    from torch._dynamo.testing import CompileCounterWithBackend

    params = _params(3)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    opt = optim.adamw(lr=1e-3)
    state = opt.init(params)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    counter = CompileCounterWithBackend(backend)
    got, _ = torch.compile(opt.update, backend=counter, fullgraph=True)(grads, state, params)
    want, _ = opt.update(grads, state, params)
    assert counter.frame_count == 1
    assert not any("_foreach" in str(n.target) for g in graphs for n in g.graph.nodes)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_a_formula_that_reads_attributes_is_refused_with_the_fix():
    params = _params(2)
    with pytest.raises(AttributeError, match="tree_map instead"):
        leafwise(lambda x: x * x.shape[0], params)
    with pytest.raises(TypeError, match="not a value per leaf"):
        leafwise(lambda x: 1.0, params)
    with pytest.raises(TypeError, match="tree_map instead"):
        leafwise(lambda x: x / x.numel(), params)
    with pytest.raises(TypeError, match="cannot branch"):
        leafwise(lambda x: x * 2 if (x > 0).any() else x, params)


def test_eager_step_with_batched_update_matches_the_per_leaf_step(monkeypatch):
    """A whole eager train step (clipping, AdamW's chain) with multi-tensor kernels equals
    the same step with batching switched off, bitwise on the CPU."""
    import loopkit.optim.transforms as transforms

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = optim.adamw(lr=1e-2, weight_decay=0.1, fused=False)  # the chain, not the kernel

    def loss_fn(net, batch):
        return torch.nn.functional.cross_entropy(net(batch[0]), batch[1])

    step = lk.train_step(model, loss_fn, opt, clip_norm=0.5)
    batch = (torch.randn(6, 5), torch.randint(0, 3, (6,)))
    a = b = lk.TrainState.create(model, opt)
    for _ in range(3):
        a, _ = step(a, batch)
    monkeypatch.setattr(leafwise_module, "_batchable", lambda tree, rests: False)
    monkeypatch.setattr(transforms, "batches", lambda tensors: False)
    with OpCounter() as ops:
        b, _ = step(b, batch)
    assert not any(k.startswith("_foreach") for k in ops.count)
    for _ in range(2):
        b, _ = step(b, batch)
    for x, y in zip(lk.tree.tree_leaves(a), lk.tree.tree_leaves(b), strict=True):
        assert torch.equal(x, y)
