"""What each variant of the comparison holds on CUDA, by allocator pool (CUDA only):

    PYTHONPATH=. python3 benchmarks/cuda_memory.py

It first shows what cuBLAS takes at the first matmul on a stream (its workspace, through
the caching allocator), then builds each variant of ``loopkit.bench.CASES`` in turn, runs
5 steps and prints: the state it keeps, the steady step's peak as ``loopkit bench``
reports it, and how much the private pools (CUDA graphs: ``loopkit_compiled`` records one
into the pool of torch's CUDA-graph trees) grew. The pool is shared by every graph of the
process, so a later case reuses the segments an earlier one reserved: the first case's
growth is the clean figure. The allocated/reserved deltas include deferred frees of the
variant before (they can be negative). Results: benchmarks/RESULTS.md."""

import torch

from loopkit import bench

dev = torch.device("cuda")


def pools():
    out = {}
    for seg in torch.cuda.memory_snapshot():
        pid = str(tuple(seg.get("segment_pool_id", (0, 0))))
        tot, act = out.get(pid, (0, 0))
        out[pid] = (tot + seg["total_size"], act + seg.get("active_size", 0))
    return out


MB = 2**20
x = torch.randn(512, 512, device=dev)
a0 = torch.cuda.memory_allocated()
x @ x
torch.cuda.synchronize()
print("first matmul on the default stream allocated MB", (torch.cuda.memory_allocated() - a0) / MB)
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    a0 = torch.cuda.memory_allocated()
    x @ x
    torch.cuda.synchronize()
    print("first matmul on a side stream allocated MB", (torch.cuda.memory_allocated() - a0) / MB)
for case in bench.CASES:
    for v in ["imperative_eager", "loopkit_eager", "loopkit_compiled"]:
        torch.cuda.synchronize()
        before, alloc0, res0 = pools(), torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        r = bench.make_runner(v, case, dev, "inductor")
        for _ in range(5):
            r.step()
        torch.cuda.synchronize()
        after = pools()
        grown = {
            k: ((t - before.get(k, (0, 0))[0]) / MB, a / MB)
            for k, (t, a) in after.items()
            if k != "(0, 0)"
        }
        print(
            f"{case.label} {v}: state {bench._state_bytes(r) / MB:.2f} MB, steady-step peak "
            f"{bench.peak_step_memory(r, dev) / MB:.2f} MB, allocated +"
            f"{(torch.cuda.memory_allocated() - alloc0) / MB:.2f} MB, reserved +"
            f"{(torch.cuda.memory_reserved() - res0) / MB:.2f} MB, private pools "
            f"(reserved growth, active) MB {grown}",
            flush=True,
        )
        del r
