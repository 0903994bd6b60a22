"""The speed comparison: loopkit's step against the imperative loop, in one process.

``python -m loopkit bench`` (or ``benchmarks/compare.py``) trains three models -- an MLP,
a small CNN and a small transformer LM written with einops -- with the same AdamW, the
same synthetic batch and the same initial weights, in each of these ways:

- ``imperative_eager``: the ordinary loop, ``zero_grad / forward / backward /
  torch.optim.AdamW.step()`` (the reference: every ratio is to it);
- ``imperative_compiled``: the same with ``torch.compile(model)`` and a compiled
  ``optimizer.step()`` (PyTorch's recipe for compiling the optimizer);
- ``torchopt_eager`` / ``torchopt_compiled``: torchopt's functional AdamW in the same
  functional step (``grad_and_value`` over ``functional_call``), eager and under
  ``torch.compile`` (skipped when torchopt is not installed);
- ``loopkit_eager`` / ``loopkit_compiled``: ``loopkit.train_step``, eager and compiled
  (with ``donate=True``; on CUDA also with CUDA graphs, ``mode="reduce-overhead"``).

The variants are timed in interleaved rounds, so each sees the same machine load. For
each it reports steps/s (median over rounds, and the spread as the interquartile range
in percent of the median), the ratio to ``imperative_eager``, the time of the first call
(compilation included), the peak memory of one step (the state before it plus the most
it allocates during it), and the achieved FLOP/s (the model's matmul/conv FLOPs per
step, attention's included, counted by ``torch.utils.flop_counter``, times steps/s) next
to this machine's large-matmul rate measured in the same run. ``compile_times`` measures
the cold and warm compile of ``loopkit_compiled`` in fresh processes: the first with an
empty inductor cache, the second reusing it (``TORCHINDUCTOR_CACHE_DIR``).

Results: :func:`run` returns a dict (written as JSON by :func:`write_report`, with a
markdown table and a PNG plot). Nothing here asserts a speed.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = (
    "imperative_eager",
    "imperative_compiled",
    "torchopt_eager",
    "torchopt_compiled",
    "loopkit_eager",
    "loopkit_compiled",
)
LR, WEIGHT_DECAY = 1e-3, 1e-2


# ----------------------------------------------------------------------------- models


class MLP(nn.Sequential):
    def __init__(self, d_in: int = 64, width: int = 256, depth: int = 3, classes: int = 10):
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth - 1):
            layers += [nn.Linear(d, width), nn.GELU()]
            d = width
        super().__init__(*layers, nn.Linear(d, classes))


class CNN(nn.Module):
    def __init__(self, channels: int = 32, classes: int = 10):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from einops import rearrange

        q, k, v = rearrange(self.qkv(self.ln1(x)), "b t (n h e) -> n b h t e", n=3, h=self.heads)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(rearrange(att, "b h t e -> b t (h e)"))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, tied head."""

    def __init__(self, vocab: int = 256, d: int = 128, heads: int = 4, layers: int = 2,
                 context: int = 64):  # fmt: skip
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.ln(self.blocks(x)) @ self.tok.weight.T


def loss_fn(net: Callable, batch: tuple) -> torch.Tensor:
    """Mean cross-entropy; for a language model over every position."""
    x, y = batch
    logits = net(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@dataclass(frozen=True)
class Case:
    """One model at one size: ``build()`` makes the model, ``batch(device)`` the data."""

    model: str
    size: dict

    @property
    def label(self) -> str:
        return f"{self.model}(" + ", ".join(f"{k}={v}" for k, v in self.size.items()) + ")"

    def build(self) -> nn.Module:
        s = {k: v for k, v in self.size.items() if k != "batch"}
        return {"mlp": MLP, "cnn": CNN, "transformer": TransformerLM}[self.model](**s)

    def batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        n = self.size["batch"]
        if self.model == "mlp":
            x = torch.randn(n, self.size.get("d_in", 64), generator=g)
            y = torch.randint(0, 10, (n,), generator=g)
        elif self.model == "cnn":
            x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        else:
            t, vocab = self.size.get("context", 64), self.size.get("vocab", 256)
            x = torch.randint(0, vocab, (n, t), generator=g)
            y = torch.randint(0, vocab, (n, t), generator=g)
        return x.to(device), y.to(device)


MODELS = ("mlp", "cnn", "transformer")

# The default cases (the sizes) and the size sweep (model size, then batch size).
CASES = [
    Case("mlp", {"width": 256, "batch": 128}),
    Case("cnn", {"channels": 32, "batch": 64}),
    Case("transformer", {"d": 128, "layers": 2, "batch": 16}),
]
SWEEP = [
    Case("mlp", {"width": 1024, "batch": 128}),
    Case("mlp", {"width": 256, "batch": 1024}),
    Case("transformer", {"d": 256, "layers": 4, "batch": 16}),
    Case("transformer", {"d": 128, "layers": 2, "batch": 64}),
]
TINY = [
    Case("mlp", {"d_in": 8, "width": 16, "batch": 4}),
    Case("cnn", {"channels": 4, "batch": 2}),
    Case("transformer", {"d": 16, "heads": 2, "layers": 1, "context": 8, "vocab": 32, "batch": 2}),
]


# --------------------------------------------------------------------------- variants


class Runner:
    """One variant on one case: ``step()`` runs a training step; ``state_tensors()``
    lists what it keeps between steps (for the memory figure); ``losses`` are the losses
    of its first three steps (every variant starts from the same weights and batch and
    trains with the same AdamW, so they agree across variants)."""

    def __init__(self, step: Callable[[], torch.Tensor], state_tensors: Callable[[], list]):
        self._step, self.state_tensors = step, state_tensors
        self.losses: list[float] = []

    def step(self) -> torch.Tensor:
        return self._step()


def _imperative(model: nn.Module, batch: tuple, compiled: bool, backend: str) -> Runner:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    net = torch.compile(model, backend=backend) if compiled else model
    opt_step = torch.compile(opt.step, backend=backend) if compiled else opt.step

    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(net, batch)
        loss.backward()
        opt_step()
        return loss.detach()

    def state() -> list:
        moments = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # held between steps
        return [*model.parameters(), *model.buffers(), *moments, *grads]

    return Runner(step, state)


def _torchopt(model: nn.Module, batch: tuple, compiled: bool, backend: str) -> Runner:
    """torchopt's functional AdamW in the same functional step. The params are a tuple
    (torchopt's pytrees are optree's; under torch.compile in torch 2.13 Dynamo's optree
    support mis-unflattens a dict of params after a graph break)."""
    import torchopt
    from torch.func import functional_call, grad_and_value

    tx = torchopt.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
    names = [k for k, _ in model.named_parameters()]
    params = tuple(v.detach() for v in model.parameters())
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    holder = [params, buffers, tx.init(params)]

    def train(params, buffers, opt_state, batch):
        def objective(p, b):
            b = dict(b)
            tensors = {**dict(zip(names, p, strict=True)), **b}
            loss = loss_fn(lambda x: functional_call(model, tensors, (x,)), batch)
            return loss, {k: tensors[k] for k in b}

        grads, (loss, buffers) = grad_and_value(objective, has_aux=True)(params, buffers)
        updates, opt_state = tx.update(grads, opt_state, params=params, inplace=False)
        return torchopt.apply_updates(params, updates, inplace=False), buffers, opt_state, loss

    fn = torch.compile(train, backend=backend) if compiled else train

    def step() -> torch.Tensor:
        params, buffers, opt_state, loss = fn(*holder, batch)
        holder[:] = [params, buffers, opt_state]
        return loss.detach()

    return Runner(step, lambda: torch.utils._pytree.tree_leaves(holder))


def _loopkit(model: nn.Module, batch: tuple, compiled: bool, backend: str) -> Runner:
    import loopkit as lk
    from loopkit import optim

    opt = optim.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
    kw: dict[str, Any] = {}
    if compiled:
        cuda = batch[0].is_cuda
        kw = dict(compile=True, backend=backend, donate=True)
        if cuda and backend == "inductor":
            kw["mode"] = "reduce-overhead"
    step_fn = lk.train_step(model, loss_fn, opt, **kw)
    holder = [lk.TrainState.create(model, opt)]

    def step() -> torch.Tensor:
        holder[0], metrics = step_fn(holder[0], batch)
        return metrics["loss"]

    return Runner(step, lambda: lk.tree.tree_leaves(holder[0]))


def make_runner(variant: str, case: Case, device: torch.device, backend: str) -> Runner:
    torch.manual_seed(0)
    model = case.build().to(device)
    batch = case.batch(device)
    kind, mode = variant.rsplit("_", 1)
    build = {"imperative": _imperative, "torchopt": _torchopt, "loopkit": _loopkit}[kind]
    return build(copy.deepcopy(model), batch, mode == "compiled", backend)


def torchopt_available() -> bool:
    try:
        import torchopt  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- measure


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(device: torch.device, n: int | None = None, repeats: int = 5) -> float:
    """This machine's large-matmul rate: the best of ``repeats`` float32 ``n x n`` products."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_flops(case: Case, device: torch.device) -> int:
    """Matmul and convolution FLOPs of one training step (forward + backward) of the
    imperative loop, counted by ``torch.utils.flop_counter`` (the update is elementwise and
    not counted).

    Attention is counted as the two batched matmuls of the full ``T x T`` scores (a causal
    mask saves nothing in the count), forward and backward, on every device: it runs here
    with SDPA's math backend, whose matmuls the counter sees. (CPU's fused SDPA kernel has
    no formula in the counter and would be counted as zero.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = case.build().to(device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model, case.batch(device)).backward()
    return counter.get_total_flops()


def peak_step_memory(runner: Runner, device: torch.device) -> int:
    """Bytes: the tensors the variant keeps between steps, plus the most one step holds
    on top of them (CUDA: the allocator's peak; CPU: the profiler's trace of every
    allocation and free, in time order).

    With CUDA graphs this undercounts: a replay allocates nothing, and the graph's buffers
    live in its private pool, reserved when it was recorded (benchmarks/RESULTS.md)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        runner.step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base + _state_bytes(runner)
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()  # so that what the measured step frees was allocated under the profiler
        with record_function(_MEASURED):
            runner.step()
    return _allocation_peak(prof) + _state_bytes(runner)


_MEASURED = "loopkit.bench.measured_step"


def _allocation_peak(prof: Any) -> int:
    """The most bytes the step marked ``_MEASURED`` held on top of what it started with:
    the allocations and frees (negative sizes) the profiler recorded during it, summed in
    time order.

    The raw allocation events are read, not the per-op memory figures: those are net (an
    op's allocations minus its frees), so a compiled graph -- one op to the profiler --
    that allocates and frees its buffers inside would show only its outputs. A step before
    the measured one is profiled too: a free of a block allocated before profiling began
    has no known size."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    start = end = None
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif node.name == _MEASURED:
            start, end = node.start_time_ns, node.end_time_ns
        stack.extend(node.children)
    if start is None:
        raise RuntimeError(f"no {_MEASURED!r} event in the profile: profile the step inside it")
    current = peak = 0
    # At equal timestamps, allocations before frees: the peak errs high, not low.
    for time_ns, size in sorted(events, key=lambda e: (e[0], -e[1])):
        if start <= time_ns <= end:
            current += size
            peak = max(peak, current)
    return peak


def _state_bytes(runner: Runner) -> int:
    seen, total = set(), 0
    for t in runner.state_tensors():
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def measure_case(
    case: Case,
    variants: list[str],
    device: torch.device,
    rounds: int,
    steps: int,
    backend: str,
    log: Callable[[str], None],
) -> list[dict]:
    """Time ``variants`` on ``case`` in interleaved rounds; one row per variant."""
    runners: dict[str, Runner] = {}
    first_call: dict[str, float] = {}
    for v in variants:
        runner = make_runner(v, case, device, backend)
        start = time.perf_counter()
        loss = runner.step()
        _sync(device)
        first_call[v] = time.perf_counter() - start
        # Warm up (a compiled optimizer compiles again at step 2); record the losses.
        runner.losses = [float(loss)] + [float(runner.step()) for _ in range(2)]
        runners[v] = runner
        log(f"  {case.label} {v}: first call {first_call[v]:.2f} s")
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, runner in runners.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                runner.step()
            _sync(device)
            samples[v].append(steps / (time.perf_counter() - start))
    flops = step_flops(case, device)
    rows = []
    for v, runner in runners.items():
        median = statistics.median(samples[v])
        q1, q3 = _quartiles(samples[v])
        rows.append(
            dict(
                case=case.label,
                model=case.model,
                size=case.size,
                variant=v,
                steps_per_s=median,
                spread_pct=100 * (q3 - q1) / median,
                samples=samples[v],
                first_call_s=first_call[v],
                peak_memory_mb=peak_step_memory(runner, device) / 2**20,
                flops_per_step=flops,
                achieved_gflops=flops * median / 1e9,
                losses=runner.losses,
            )
        )
    base = next((r for r in rows if r["variant"] == "imperative_eager"), None)
    for r in rows:
        r["ratio"] = r["steps_per_s"] / base["steps_per_s"] if base else None
    return rows


def compile_times(case: Case, device: torch.device, backend: str = "inductor") -> dict:
    """Seconds to the end of the first ``loopkit_compiled`` step in a fresh process: cold
    (an empty inductor cache) and warm (a second process reusing that cache)."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            arg = json.dumps(dict(model=case.model, size=case.size, device=str(device),
                                  backend=backend))  # fmt: skip
            proc = subprocess.run(
                [sys.executable, "-m", "loopkit.bench", "--first-step", arg,
                 str(torch.get_num_threads())],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            out[f"{label}_s"] = float(proc.stdout.strip().splitlines()[-1])
    return out


def _first_step(arg: str, threads: str | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))
    spec = json.loads(arg)  # the imports of a fresh process are not counted
    case, device = Case(spec["model"], spec["size"]), torch.device(spec["device"])
    runner = make_runner("loopkit_compiled", case, device, spec["backend"])
    start = time.perf_counter()
    runner.step()
    _sync(device)
    print(time.perf_counter() - start)


def select_cases(cases: list[Case], models: list[str], what: str = "the sizes") -> list[Case]:
    """The cases of ``cases`` whose model is in ``models``, in order. Raises ValueError for
    an empty ``models``, a name that is not a model (listing the valid ones) or a model
    with no case in ``cases`` (``what`` names them in the message): the selection is never
    empty, nor silently smaller than asked."""
    if not models:
        raise ValueError(f"no models selected; choose from {list(MODELS)}")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODELS)}")
    absent = [m for m in models if all(c.model != m for c in cases)]
    if absent:
        have = list(dict.fromkeys(c.model for c in cases))
        raise ValueError(f"{what} have no case of {absent} (only of {have})")
    return [c for c in cases if c.model in models]


def check_device(name: str) -> torch.device:
    """The device ``name`` if the comparison can run on it here (the CPU, or a CUDA GPU that
    this torch build sees); ValueError saying why not otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{name!r} is not a device ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name!r}: the comparison runs on 'cpu' or 'cuda' ('cuda:N')")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
            raise ValueError(f"{name!r}: CUDA is not available (torch {torch.__version__}, {why})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def run(
    cases: list[Case] | None = None,
    variants: list[str] | None = None,
    *,
    device: str = "cpu",
    rounds: int = 7,
    steps: int = 20,
    backend: str = "inductor",
    compile_time_models: tuple[str, ...] = ("mlp",),
    log: Callable[[str], None] = print,
) -> dict:
    """Run the comparison; returns ``{"machine": ..., "rows": [...], "compile": {...}}``.

    ``cases=None`` runs :data:`CASES`; an empty list is a ValueError (a selection that
    matched nothing), as is a model in ``compile_time_models`` outside :data:`MODELS`.
    ``rounds`` and ``steps`` must be positive, and ``device`` pass :func:`check_device`."""
    cases = CASES if cases is None else list(cases)
    if not cases:
        raise ValueError("no cases to run (an empty selection); cases=None runs bench.CASES")
    unknown = sorted(set(compile_time_models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown compile-time models {unknown}; choose from {list(MODELS)}")
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be positive, got {rounds} and {steps}")
    dev = check_device(device)
    variants = list(variants or VARIANTS)
    skipped = {}
    if not torchopt_available():
        for v in [v for v in variants if v.startswith("torchopt")]:
            variants.remove(v)
            skipped[v] = "torchopt is not installed (pip install torchopt)"
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    machine = dict(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        load_average=os.getloadavg(),
        torch=torch.__version__,
        python=sys.version.split()[0],
        matmul_gflops=matmul_flops_per_s(dev) / 1e9,
    )
    log(f"machine: {machine}")
    rows = []
    for case in cases:
        rows += measure_case(case, variants, dev, rounds, steps, backend, log)
    compile_s = {}
    for case in cases:
        if case.model in compile_time_models and case.label not in compile_s:
            compile_s[case.label] = compile_times(case, dev, backend)
            log(f"  {case.label} loopkit_compiled compile: {compile_s[case.label]}")
    machine["load_average_end"] = os.getloadavg()
    return dict(machine=machine, rows=rows, compile=compile_s, skipped=skipped)


# ----------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    """The results as a markdown table (one row per case and variant). Its spread column
    is ``±spread_pct / 2``: half the interquartile range, in % of the median, as a legend
    above the table says."""
    m = result["machine"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average"])
    lines = [
        f"Device: {m['device']} ({m['cpu_count']} CPUs, {m['threads']} torch threads), "
        f"torch {m['torch']}, Python {m['python']}; load average at start {load}; "
        f"large-matmul rate {m['matmul_gflops']:.0f} GFLOP/s.",
        "",
        "steps/s: the median over rounds; spread: ± half the interquartile range of the "
        "rounds, in % of the median (the JSON's spread_pct is the whole interquartile range).",
        "",
        "| case | variant | steps/s | spread (±IQR/2) | vs imperative eager | first call s "
        "| peak MB | GFLOP/s | % of matmul |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['steps_per_s']:.1f} | "
            f"±{r['spread_pct'] / 2:.1f}% | {ratio} | {r['first_call_s']:.2f} | "
            f"{r['peak_memory_mb']:.2f} | {r['achieved_gflops']:.1f} | "
            f"{100 * r['achieved_gflops'] / m['matmul_gflops']:.0f}% |"
        )
    if result["compile"]:
        lines += ["", "| case | loopkit_compiled cold compile s | warm (cache reused) s |",
                  "|---|---|---|"]  # fmt: skip
        for label, c in result["compile"].items():
            lines.append(f"| {label} | {c['cold_s']:.1f} | {c['warm_s']:.1f} |")
    for v, why in result.get("skipped", {}).items():
        lines.append(f"\n{v} skipped: {why}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Two panels: the speedup of each variant over imperative eager per case, and the
    achieved GFLOP/s of each case (against the large-matmul rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        for ax, key in ((ax1, "ratio"), (ax2, "achieved_gflops")):
            vals = [
                next((r[key] or 0 for r in rows if r["case"] == c and r["variant"] == v), 0)
                for c in cases
            ]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=v)
    for ax, title in ((ax1, "steps/s relative to imperative eager"), (ax2, "achieved GFLOP/s")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax2.axhline(result["machine"]["matmul_gflops"], color="k", lw=0.8, ls="--",
                label="large matmul")  # fmt: skip
    ax2.legend(fontsize=7)
    fig.suptitle(
        f"loopkit bench on {result['machine']['device']}, torch {result['machine']['torch']}"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(result: dict, out: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and (with matplotlib) ``bench.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["md"].write_text(markdown(result) + "\n")
    try:
        paths["png"] = plot(result, out / "bench.png")
    except ImportError:
        pass
    return paths


if __name__ == "__main__":
    if sys.argv[1:2] == ["--first-step"]:
        _first_step(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
