"""The thin driver, its hooks and checkpoints."""

import copy
import functools
import io
import os
import warnings

import pytest
import torch
from torch import nn

import loopkit as lk
from loopkit import optim
from tests.helpers import loss_fn


def problem(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 2)
    )
    return model, x, y


def assert_states_equal(a, b):
    la, lb = lk.tree.tree_leaves(a), lk.tree.tree_leaves(b)
    assert lk.tree.tree_structure(a) == lk.tree.tree_structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_fit_equals_calling_the_step_by_hand(tmp_path):
    model, x, y = problem()
    opt = optim.adam(lr=1e-2)
    step = lk.train_step(model, loss_fn, opt)
    data = lk.data.Batches(x, y, batch_size=8, shuffle=True, seed=3)
    state0 = lk.TrainState.create(model, opt, seed=0)

    fitted = lk.fit(step, state0, data, epochs=3)

    by_hand = state0
    for epoch in range(3):
        data.set_epoch(epoch)
        for batch in data:
            by_hand, _ = step(by_hand, batch)
    assert_states_equal(fitted, by_hand)
    assert int(fitted.step) == 15


def test_fit_with_validation_checkpoint_and_progress(tmp_path, capsys):
    model, x, y = problem()
    opt = optim.sgd(lr=0.1, momentum=0.9)
    step = lk.train_step(model, loss_fn, opt, clip_norm=1.0)
    evaluate = lk.eval_step(model, loss_fn)
    train = lk.data.Batches(x[:30], y[:30], batch_size=8, shuffle=True)
    val = lk.data.Batches(x[30:], y[30:], batch_size=4)
    seen = []

    class Record(lk.Hook):
        def on_validation_end(self, loop):
            seen.append(dict(loop.logs))

    ckpt = lk.hooks.Checkpoint(tmp_path / "ckpts", keep_last=2)
    state = lk.fit(step, lk.TrainState.create(model, opt), train, epochs=4, hooks=[
        lk.hooks.Validate(evaluate, val), ckpt, Record(), lk.hooks.ProgressBar(),
    ])  # fmt: skip
    assert len(seen) == 4 and {"train/loss", "val/loss", "val/acc"} <= set(seen[-1])
    out = capsys.readouterr().out
    assert out.count("val/acc") == 4
    # keep_last=2: the two newest, committed and complete; no temporary files left.
    files = sorted(os.listdir(tmp_path / "ckpts"))
    assert files == ["step-000000012", "step-000000016"]
    restored = lk.checkpoint.load(lk.checkpoint.latest(tmp_path / "ckpts"), like=state)
    assert_states_equal(restored, state)
    meta = lk.checkpoint.read(tmp_path / "ckpts" / files[-1])["metadata"]
    assert meta["step"] == 16 and meta["logs"]["val/acc"] == seen[-1]["val/acc"]
    assert meta["torch"] == torch.__version__


def test_resumed_from_a_checkpoint_continues_identically(tmp_path):
    model, x, y = problem()
    opt = optim.adamw(lr=optim.schedules.linear_warmup(1e-2, 5))
    step = lk.train_step(model, loss_fn, opt)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    state = lk.fit(step, lk.TrainState.create(model, opt, seed=5), batches, epochs=1)
    lk.checkpoint.save(tmp_path / "a.ckpt", state)
    straight = lk.fit(step, state, batches, epochs=2)
    resumed = lk.checkpoint.load(tmp_path / "a.ckpt", like=lk.TrainState.create(model, opt, seed=0))
    resumed = lk.fit(step, resumed, batches, epochs=2)
    assert_states_equal(resumed, straight)  # Dropout masks included: the rng is in the state


def test_validation_averages_over_examples():
    model, x, y = problem(n=10)
    state = lk.TrainState.create(model, optim.sgd())
    evaluate = lk.eval_step(model, loss_fn)
    uneven = lk.evaluate(evaluate, state, lk.data.Batches(x, y, batch_size=4))  # 4 + 4 + 2
    whole = evaluate(state, (x, y))
    assert uneven["loss"] == pytest.approx(float(whole["loss"]), rel=1e-6)
    assert uneven["acc"] == pytest.approx(float(whole["acc"]), rel=1e-6)


def test_a_hook_can_stop_training():
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)

    class StopAt(lk.Hook):
        def on_step_end(self, loop):
            loop.should_stop = loop.step >= 7

    state = lk.fit(
        lk.train_step(model, loss_fn, opt),
        lk.TrainState.create(model, opt),
        lk.data.Batches(x, y, batch_size=4),
        epochs=10,
        hooks=[StopAt()],
    )
    assert int(state.step) == 7


def test_one_shot_iterators_are_rejected_for_several_epochs():
    model, x, y = problem()
    opt = optim.sgd()
    step = lk.train_step(model, loss_fn, opt)
    gen = ((x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8))
    with pytest.raises(TypeError, match="one-shot iterator"):
        lk.fit(step, lk.TrainState.create(model, opt), gen, epochs=2)


def test_a_dataloader_is_not_iterated_before_training():
    """Checking for a one-shot iterator must not start a DataLoader pass: that would draw
    its shuffle seed from the global generator, so epoch 0 would depend on ``epochs``."""
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True
    )
    firsts = []

    class FirstEpoch(lk.Hook):
        def on_epoch_end(self, loop):
            if loop.epoch == 0:
                firsts.append(loop.state.params)

    for epochs in (1, 3):
        torch.manual_seed(5)
        lk.fit(step, lk.TrainState.create(model, opt), loader, epochs=epochs, hooks=[FirstEpoch()])
    assert all(torch.equal(firsts[0][k], firsts[1][k]) for k in firsts[0])


def test_what_is_not_a_state_a_hook_or_a_step_output_is_named():
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    state, data = lk.TrainState.create(model, opt), lk.data.Batches(x, y, batch_size=8)
    with pytest.raises(TypeError, match="fit needs a TrainState, got a Sequential"):
        lk.fit(step, model, data)
    for hooks, message in [
        ("ckpt", "hooks must be a list of hooks, got a str"),
        ({"t": lk.hooks.Timer()}, "hooks must be a list of hooks, got a dict"),
        (["checkpoint"], r"hooks\[0\] is a str \('checkpoint'\), not a hook"),
        ([lk.hooks.Timer(), None], r"hooks\[1\] is a NoneType"),
        ([lk.hooks.ProgressBar], r"hooks\[0\] is the class ProgressBar.*ProgressBar\(...\)"),
    ]:
        with pytest.raises(TypeError, match=message):
            lk.fit(step, state, data, hooks=hooks)
    evaluate = lk.eval_step(model, loss_fn)
    for wrong, got in [
        (evaluate, "returned a dict. An eval step"),
        (lambda s, b: step(s, b)[::-1], r"returned a 2-tuple \(dict, TrainState\)"),
        (lambda s, b: step(s, b)[0], "returned a TrainState"),
    ]:
        with pytest.raises(TypeError, match=rf"must return \(state, metrics\).*{got}"):
            lk.fit(wrong, state, data)


def test_keep_last_only_prunes_what_it_wrote(tmp_path):
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    directory = tmp_path / "ckpts"
    directory.mkdir()
    (directory / "best.ckpt").write_bytes(b"user file")
    later = lk.checkpoint.save(directory / "step-000000100", lk.TrainState.create(model, opt))
    hook = lk.hooks.Checkpoint(directory, keep_last=1)
    lk.fit(step, lk.TrainState.create(model, opt), lk.data.Batches(x, y, batch_size=8),
           epochs=3, hooks=[hook])  # fmt: skip
    files = sorted(os.listdir(directory))
    assert files == ["best.ckpt", "step-000000015", "step-000000100"]
    assert later.exists() and hook.saved == [directory / "step-000000015"]


def test_a_stopped_run_still_validates_and_checkpoints(tmp_path):
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    seen = []

    class StopAt7(lk.Hook):
        def on_step_end(self, loop):
            loop.should_stop = loop.step >= 7

    class Record(lk.Hook):
        def on_validation_end(self, loop):
            seen.append(loop.step)

    evaluate = lk.eval_step(model, loss_fn)
    hooks = [
        StopAt7(),
        lk.hooks.Validate(evaluate, [(x, y)], every=5),
        lk.hooks.Checkpoint(tmp_path, every=5),
        Record(),
    ]
    lk.fit(step, lk.TrainState.create(model, opt), lk.data.Batches(x, y, batch_size=4),
           epochs=10, hooks=hooks)  # fmt: skip
    assert seen == [7]
    assert os.listdir(tmp_path) == ["step-000000007"]


@pytest.mark.parametrize("injected", [False, True])
def test_reduce_lr_on_plateau_hook_matches_torch(injected):
    """fit + Validate + ReduceLROnPlateau against torch's loop stepping the scheduler on the
    same validation loss after every epoch (float64, a noisy target so plateaus happen).
    With injected hyperparameters the hook finds and changes the injected lr."""
    torch.manual_seed(0)
    x = torch.randn(24, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (24,))
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    sgd = optim.inject_hyperparams(optim.sgd) if injected else optim.sgd
    opt = sgd(lr=0.5, momentum=0.9)
    plateau = optim.schedules.reduce_on_plateau(0.5, factor=0.5, patience=1, threshold=0.05)
    train = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    x_val = torch.randn(16, 3, dtype=torch.float64)  # unrelated labels: val loss plateaus
    y_val = torch.randint(0, 2, (16,))
    val = [(x_val, y_val)]
    lrs = []

    class RecordLR(lk.Hook):
        def on_epoch_end(self, loop):
            lrs.append(float(optim.learning_rates(loop.state.opt_state)[0]))

    state = lk.fit(
        lk.train_step(model, loss_fn, opt),
        lk.TrainState.create(model, opt),
        train,
        epochs=12,
        hooks=[
            lk.hooks.Validate(lk.eval_step(model, loss_fn), val),
            lk.hooks.ReduceLROnPlateau(plateau),
            RecordLR(),
        ],
    )

    ref = copy.deepcopy(model)
    topt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, factor=0.5, patience=1, threshold=0.05)
    ref_lrs = []
    for _ in range(12):
        for b in train:
            topt.zero_grad()
            loss_fn(ref, b)[0].backward()
            topt.step()
        ref.eval()
        with torch.no_grad():
            val_loss = loss_fn(ref, (x_val, y_val))[0].item()
        ref.train()
        sched.step(val_loss)
        ref_lrs.append(topt.param_groups[0]["lr"])
    assert lrs == ref_lrs and len(set(lrs)) > 1
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-10, atol=1e-12)


class FeedMetric(lk.Hook):
    """Puts a scripted value of a metric in the logs at each epoch end."""

    def __init__(self, values, key="val/loss"):
        self.values, self.key = list(values), key

    def on_epoch_end(self, loop):
        loop.logs[self.key] = self.values[loop.epoch]


def tiny_fit(hooks, epochs):
    model = nn.Linear(2, 2)
    opt = optim.sgd(lr=0.1)
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]
    return lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
                  epochs=epochs, hooks=hooks)  # fmt: skip


@pytest.mark.parametrize(
    "values, mode, patience, min_delta, stops_after",
    [
        ([5, 4, 3, 3.5, 3.2, 3.1, 2], "min", 3, 0.0, 6),  # 3 epochs without a new best
        ([5, 4, 3, 2.99, 2.98, 2.97, 1], "min", 2, 0.05, 5),  # tiny gains do not count
        ([1, 2, 3, 2, 2, 4, 5], "max", 2, 0.0, 5),
        ([5, float("nan"), float("nan"), 4, 3, 2, 1], "min", 2, 0.0, 3),  # NaN never improves
        ([5, 4, 3, 2, 1, 0, -1], "min", 1, 0.0, 7),  # always improving: runs to the end
    ],
)
def test_early_stopping(values, mode, patience, min_delta, stops_after):
    stop = lk.hooks.EarlyStopping("val/loss", mode=mode, patience=patience, min_delta=min_delta)
    state = tiny_fit([FeedMetric(values), stop], epochs=len(values))
    assert int(state.step) == stops_after


def test_loggers_write_one_record_per_epoch(tmp_path):
    values = [3.0, 2.0, 1.0]

    class ValEveryOther(lk.Hook):  # a column that appears only from the second epoch
        def on_epoch_end(self, loop):
            if loop.epoch >= 1:
                loop.logs["val/loss"] = values[loop.epoch]

    tiny_fit([ValEveryOther(), lk.hooks.CSVLogger(tmp_path), lk.hooks.JSONLLogger(tmp_path)], 3)
    import csv
    import json

    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["val/loss"] == "" and float(rows[2]["val/loss"]) == 1.0
    assert "train/loss" in rows[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["val/loss"] == 2.0
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_max_steps_and_steps_per_epoch():
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    data = lk.data.Batches(x, y, batch_size=8)  # 5 batches per pass
    seen = []

    class Record(lk.Hook):
        def on_epoch_end(self, loop):
            seen.append((loop.epoch, loop.step))

    state = lk.TrainState.create(model, opt)
    assert int(lk.fit(step, state, data, max_steps=12, hooks=[Record()]).step) == 12
    assert seen == [(0, 5), (1, 10), (2, 12)]
    seen.clear()
    assert int(lk.fit(step, state, data, epochs=3, steps_per_epoch=2, hooks=[Record()]).step) == 6
    assert seen == [(0, 2), (1, 4), (2, 6)]
    seen.clear()
    assert int(lk.fit(step, state, data, epochs=3, max_steps=7, hooks=[Record()]).step) == 7
    assert seen == [(0, 5), (1, 7)]
    # endless data: steps_per_epoch defines the epoch
    endless = lk.data.Reiterable(lambda: iter(lambda: (x[:8], y[:8]), None))
    seen.clear()
    assert (
        int(lk.fit(step, state, endless, epochs=2, steps_per_epoch=3, hooks=[Record()]).step) == 6
    )
    assert seen == [(0, 3), (1, 6)]
    for bad in (dict(epochs=-1), dict(max_steps=1.5), dict(steps_per_epoch=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            lk.fit(step, state, data, **bad)


def test_every_steps_runs_validation_and_checkpoints_on_steps(tmp_path):
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    seen = []

    class Record(lk.Hook):
        def on_validation_end(self, loop):
            seen.append(loop.step)

    hooks = [
        lk.hooks.Validate(lk.eval_step(model, loss_fn), [(x, y)], every=None, every_steps=4),
        Record(),
        lk.hooks.Checkpoint(tmp_path, every=None, every_steps=3),
    ]
    lk.fit(step, lk.TrainState.create(model, opt), lk.data.Batches(x, y, batch_size=8),
           epochs=2, hooks=hooks)  # fmt: skip
    assert seen == [4, 8, 10]  # and at the end of the final epoch
    steps = [lk.checkpoint.step_of(p) for p in lk.checkpoint.checkpoints(tmp_path)]
    assert steps == [3, 6, 9, 10]
    with pytest.raises(ValueError, match="every_steps must be a positive integer"):
        lk.hooks.Validate(None, [], every_steps=0)


def test_keep_last_and_keep_best_together(tmp_path):
    values = [5.0, 3.0, 4.0, 1.0, 2.0, float("nan"), 6.0]  # val/loss at each epoch end
    hook = lk.hooks.Checkpoint(tmp_path, keep_last=2, keep_best="val/loss")
    tiny_fit([FeedMetric(values), hook], epochs=len(values))
    names = [p.name for p in lk.checkpoint.checkpoints(tmp_path)]
    # best is epoch 3 (1.0) at step 4; the last two are steps 6 and 7
    assert names == ["step-000000004", "step-000000006", "step-000000007"]
    assert hook.best == tmp_path / "step-000000004"

    top2 = lk.hooks.Checkpoint(tmp_path / "max", keep_best="val/loss", mode="max", best_n=2)
    tiny_fit([FeedMetric(values), top2], epochs=len(values))
    names = [p.name for p in lk.checkpoint.checkpoints(tmp_path / "max")]
    assert names == ["step-000000001", "step-000000007"]  # 5.0, 6.0; the newest is 6.0


def test_hook_state_survives_a_resume(tmp_path):
    """Early stopping's counter, checkpoint retention and the logs carry over: without the
    saved counter the resumed run below would start a fresh patience and not stop."""
    values = [5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9, 5.0]

    def hooks():
        return [
            FeedMetric(values),
            lk.hooks.EarlyStopping("val/loss", patience=3),
            lk.hooks.Checkpoint(tmp_path / "ckpt", keep_last=1, keep_best="val/loss"),
            lk.hooks.JSONLLogger(tmp_path),
        ]

    model = nn.Linear(2, 2)
    opt = optim.sgd(lr=0.1)
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]
    step = lk.train_step(model, loss_fn, opt)

    def stop_after(calls):
        def wrapped(state, batch):
            if int(state.step) >= calls:
                raise RuntimeError("crash")
            return step(state, batch)

        return wrapped

    with pytest.raises(RuntimeError, match="crash"):
        lk.fit(stop_after(3), lk.TrainState.create(model, opt), data, epochs=8, hooks=hooks())
    state = lk.fit(step, lk.TrainState.create(model, opt), data, epochs=8, hooks=hooks(),
                   resume="latest")  # fmt: skip
    assert int(state.step) == 5  # epochs 2, 3, 4 did not improve on 4.0
    names = [p.name for p in lk.checkpoint.checkpoints(tmp_path / "ckpt")]
    assert names == ["step-000000002", "step-000000005"]  # the best (4.0) and the last
    import json

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in lines] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("action", ["stop", "skip", "raise"])
def test_nan_guard(action):
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    bad = (torch.full_like(x[:8], float("nan")), y[:8])
    data = batches[:2] + [bad] + batches[2:]
    guard = lk.hooks.NaNGuard(action=action)
    seen = []

    class Record(lk.Hook):
        def on_epoch_end(self, loop):
            seen.append(dict(loop.logs))

    state0 = lk.TrainState.create(model, opt, seed=0)
    if action == "raise":
        with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 \(epoch 0, batch 2\)"):
            lk.fit(step, state0, data, hooks=[guard])
        return
    with pytest.warns(UserWarning, match=r"loss is nan at step 3 \(epoch 0, batch 2\)"):
        state = lk.fit(step, state0, data, epochs=1, hooks=[guard, Record()])
    expected = state0
    kept = batches[:2] if action == "stop" else batches
    losses = []
    for b in kept:
        expected, m = step(expected, b)
        losses.append(m["loss"])
    assert_states_equal(state, expected)
    assert seen[0]["train/loss"] == pytest.approx(float(sum(losses) / len(losses)), rel=1e-6)
    assert guard.skipped == [3]


def test_timer_and_learning_rate_monitor():
    model = nn.Linear(2, 2)
    opt = optim.multi_transform(
        {"w": optim.sgd(lr=0.1), "b": optim.sgd(lr=0.01)},
        lambda name, p: "w" if name.endswith("weight") else "b",
    )
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))] * 3
    seen = []

    class Record(lk.Hook):
        def on_epoch_end(self, loop):
            seen.append(dict(loop.logs))

    lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
           hooks=[lk.hooks.Timer(), lk.hooks.LearningRateMonitor(), Record()])  # fmt: skip
    logs = seen[0]
    assert logs["time/epoch_s"] > 0 and logs["time/steps_per_s"] > 0
    assert sorted([logs["lr/0"], logs["lr/1"]]) == pytest.approx([0.01, 0.1])


def test_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_fit([FeedMetric([3.0, 2.0]), lk.hooks.TensorBoardLogger(tmp_path)], epochs=2)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(1, 3.0), (2, 2.0)]
    assert len(events.Scalars("train/loss")) == 2


def test_loggers_take_per_member_lists_numpy_values_and_flags(tmp_path):
    """An ensemble's per-member lists become ``key/0``, ``key/1`` scalars in TensorBoard
    (they were dropped, with every other list metric); NumPy numbers and bools in the logs
    are written by every logger (JSONL failed on a np.float32: not JSON serializable)."""
    pytest.importorskip("tensorboard")
    import json

    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hooks = [FeedMetric([[3.0, 4.0], [2.0, 1.0]]), FeedMetric([np.float32(0.5)] * 2, "np/x"),
             FeedMetric([True, False], "flag"), lk.hooks.TensorBoardLogger(tmp_path / "tb"),
             lk.hooks.JSONLLogger(tmp_path), lk.hooks.CSVLogger(tmp_path)]  # fmt: skip
    tiny_fit(hooks, epochs=2)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/loss/0")] == [3.0, 2.0]
    assert [e.value for e in events.Scalars("val/loss/1")] == [4.0, 1.0]
    assert [e.value for e in events.Scalars("np/x")] == [0.5, 0.5]
    assert [e.value for e in events.Scalars("flag")] == [1.0, 0.0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["np/x"] for r in records] == [0.5, 0.5]
    assert [r["val/loss"] for r in records] == [[3.0, 4.0], [2.0, 1.0]]


def test_loopkit_plot_draws_the_curves_of_a_run(tmp_path):
    import subprocess
    import sys

    import matplotlib.image

    tiny_fit([FeedMetric([3.0, 2.0, 1.5]), lk.hooks.JSONLLogger(tmp_path)], epochs=3)
    done = subprocess.run([sys.executable, "-m", "loopkit", "plot", str(tmp_path)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    png = tmp_path / "curves.png"
    assert done.stdout.strip() == str(png)
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    from loopkit.plot import curves, read_logs

    panels = curves(read_logs(tmp_path))
    assert [v for _, v in panels["loss"]["val"]] == [3.0, 2.0, 1.5]
    assert set(panels["loss"]) == {"train", "val"}
    empty = subprocess.run([sys.executable, "-m", "loopkit", "plot", str(tmp_path / "none")],
                           capture_output=True, text=True)  # fmt: skip
    assert empty.returncode == 1 and "no metrics.jsonl" in empty.stderr


def counting_validation(model, data, **kwargs):
    seen = []

    class Count(lk.Hook):
        def on_validation_end(self, loop):
            seen.append(loop.step)

    return lk.hooks.Validate(lk.eval_step(model, loss_fn), data, **kwargs), Count(), seen


def test_a_step_is_validated_once_even_when_every_steps_meets_the_epoch_end():
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    validate, count, seen = counting_validation(model, [(x, y)], every_steps=5)
    data = lk.data.Batches(x, y, batch_size=8)
    lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
           epochs=2, hooks=[validate, count])  # fmt: skip
    assert seen == [5, 10]  # steps 5 and 10 end the epochs: not validated twice


def test_hooks_on_steps_do_not_fire_again_for_a_skipped_step(tmp_path):
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    data = batches[:2] + [(torch.full_like(x[:8], float("nan")), y[:8])] + batches[2:]
    validate, count, seen = counting_validation(model, [(x, y)], every=None, every_steps=2)
    hooks = [lk.hooks.NaNGuard(action="skip"), validate, count,
             lk.hooks.Checkpoint(tmp_path, every=None, every_steps=2)]  # fmt: skip
    with pytest.warns(UserWarning, match="skipped"):
        lk.fit(step, lk.TrainState.create(model, opt), data, hooks=hooks)
    assert seen == [2, 4, 5]  # not again at 2 for the skipped batch; 5 is the end
    names = [p.name for p in lk.checkpoint.checkpoints(tmp_path)]
    assert names == ["step-000000002", "step-000000004", "step-000000005"]


def test_checkpoint_works_wherever_it_sits_in_the_hook_list(tmp_path):
    """Listed first, Checkpoint still sees this epoch's validation (for keep_best and the
    metadata) and a stop requested by a later hook (for the final save)."""
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    values = [3.0, 1.0, 2.0, 2.5]
    ckpt = lk.hooks.Checkpoint(tmp_path, every=10, keep_last=1, keep_best="val/loss")

    class StopAfter3(lk.Hook):
        def on_epoch_end(self, loop):
            loop.should_stop = loop.epoch == 2

    lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt),
           lk.data.Batches(x, y, batch_size=20), epochs=4,
           hooks=[ckpt, FeedMetric(values), StopAfter3()])  # fmt: skip
    # epoch 2 (step 6) is the stop: saved; its val/loss 2.0 is the best seen by a save
    assert [p.name for p in lk.checkpoint.checkpoints(tmp_path)] == ["step-000000006"]
    meta = lk.checkpoint.read(tmp_path / "step-000000006")["metadata"]
    assert meta["logs"]["val/loss"] == 2.0 and ckpt.best == tmp_path / "step-000000006"


def test_a_stop_requested_at_epoch_start_takes_no_step():
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)

    class StopAtEpoch1(lk.Hook):
        def on_epoch_start(self, loop):
            loop.should_stop = loop.epoch == 1

    data = lk.data.Batches(x, y, batch_size=8)
    state = lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
                   epochs=3, hooks=[StopAtEpoch1()])  # fmt: skip
    assert int(state.step) == 5


def test_loggers_every_and_append(tmp_path):
    import json

    log = lk.hooks.JSONLLogger(tmp_path, every=2)
    tiny_fit([FeedMetric([3.0, 2.0, 1.0]), log], epochs=3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in lines] == [1, 2]  # every 2nd, and the last
    hooks = [FeedMetric([3.0]), lk.hooks.JSONLLogger(tmp_path, append=True),
             lk.hooks.Checkpoint(tmp_path / "ckpt")]  # fmt: skip
    model = nn.Linear(2, 2)
    opt = optim.sgd(lr=0.1)
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]
    lk.fit(
        lk.train_step(model, loss_fn, opt),
        lk.TrainState.create(model, opt),
        data,
        hooks=hooks,
        resume="latest",
    )  # no checkpoint yet: a fresh run that appends
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_every_thins_a_hooks_step_and_epoch_events():
    seen = []

    class Plain:  # any object with event methods is a hook; no base class needed
        def on_step_end(self, loop):
            seen.append(("step", loop.step))

        def on_epoch_end(self, loop):
            seen.append(("epoch", loop.epoch))

    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt),
           lk.data.Batches(x, y, batch_size=8), epochs=3,
           hooks=[lk.hooks.Every(Plain(), steps=4, epochs=2)])  # fmt: skip
    assert seen == [("step", 4), ("step", 8), ("epoch", 1), ("step", 12), ("epoch", 2)]
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        lk.hooks.Every(Plain(), steps=0)


# --- metric sums in float64 ---------------------------------------------------------------


def test_epoch_means_of_bf16_metrics_are_summed_in_float64():
    """500 bf16 losses near 0.68: summed in bf16 the mean came out 0.51."""
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).bfloat16()
    opt = optim.sgd(lr=0.0)
    losses, logs = [], {}

    class Record(lk.Hook):
        def on_step_end(self, loop):
            losses.append(loop.metrics["loss"])

        def on_epoch_end(self, loop):
            logs.update(loop.logs)

    lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt),
           lk.data.Batches(x, y, batch_size=2), hooks=[Record()])  # fmt: skip
    mean = torch.stack(losses).double().mean().to(torch.bfloat16)
    assert len(losses) == 500 and logs["train/loss"] == mean.item()


def test_vector_and_integer_metric_sums_are_float64_from_the_first_step():
    """A 0-dim float64 start would not promote a bf16 vector (0-dim tensors rank below
    dimensioned ones in type promotion): each sum has its metric's shape from the start."""
    from loopkit.driver import add_metrics, means

    sums, dtypes, counts = {}, {}, {}
    values = torch.rand(50, 3, generator=torch.Generator().manual_seed(0)).bfloat16() + 100
    for v in values:
        metrics = {"v": v, "n": torch.tensor(7), "ok": torch.tensor(True)}
        add_metrics(sums, dtypes, metrics, 2, counts)
    assert all(t.dtype == torch.float64 for t in sums.values())
    assert counts == {"v": 100, "n": 100, "ok": 100}
    got = means(sums, dtypes, counts)
    assert got["v"] == values.double().mean(0).bfloat16().tolist()
    assert got["n"] == 7.0 and got["ok"] == 1.0


def test_evaluate_sums_fp16_metrics_in_float64():
    """100000 examples of an fp16 loss near 0.7: their fp16 sum overflowed to inf."""
    x = torch.randn(100_000, 4, generator=torch.Generator().manual_seed(0)).half()
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).half()
    state = lk.TrainState.create(model, optim.sgd(lr=0.1))
    evaluate = lk.eval_step(model, loss_fn)
    data = lk.data.Batches(x, y, batch_size=20_000)
    got = lk.evaluate(evaluate, state, data)["loss"]
    sums = sum(evaluate(state, b)["loss"].double() * b[0].shape[0] for b in data)
    assert got == (sums / 100_000).half().item() and abs(got - 0.7) < 0.1


def test_metric_sums_of_an_older_checkpoint_load_and_cast_up():
    """Checkpoints before float64 sums held them in the metric's dtype, without dtypes."""
    model, _, _ = problem()
    loop = lk.Loop(lk.TrainState.create(model, optim.sgd(lr=0.1)), [], 1, None)
    loop.load_state_dict({"epoch": 0, "batch": 1, "taken": 1, "logs": {}, "history": [],
                          "sums": {"loss": torch.tensor(0.1, dtype=torch.float32)},
                          "stopped": False, "hooks": {}})  # fmt: skip
    lk.driver.add_metrics(loop.sums, loop.sum_dtypes, {"loss": torch.tensor(0.2)},
                          counts=loop.counts)  # fmt: skip
    assert loop.sums["loss"].dtype == torch.float64
    expected = ((torch.tensor(0.1).double() + torch.tensor(0.2).double()) / 2).float()
    assert loop.counts == {"loss": 2}  # the older checkpoint's step counted, from "taken"
    assert lk.driver.means(loop.sums, loop.sum_dtypes, loop.counts) == {"loss": expected.item()}


def test_a_metric_some_steps_do_not_return_is_averaged_over_those_that_do():
    """``evaluate`` and the train means: a metric only some batches report is their mean
    (weighted by examples for evaluate), not a mean with zeros for the others (10 came out
    as 5); a step returning no dict is named."""
    model, x, y = problem()
    state = lk.TrainState.create(model, optim.sgd(lr=0.0))
    seen = []

    def sometimes(net, batch):
        loss, metrics = loss_fn(net, batch)
        seen.append(len(seen))
        return loss, ({**metrics, "extra": torch.tensor(10.0 * len(seen))} if len(seen) == 1
                      else metrics)  # fmt: skip

    batches = [(x[:8], y[:8]), (x[8:12], y[8:12])]
    got = lk.evaluate(lk.eval_step(model, sometimes), state, batches)
    assert got["extra"] == 10.0
    want = lk.evaluate(lk.eval_step(model, loss_fn), state, batches)
    assert got["loss"] == want["loss"]
    seen.clear()
    logs = []

    class Record(lk.Hook):
        def on_epoch_end(self, loop):
            logs.append(dict(loop.logs))

    lk.fit(lk.train_step(model, sometimes, optim.sgd(lr=0.0)), state, batches, epochs=1,
           hooks=[Record()])  # fmt: skip
    assert logs[0]["train/extra"] == 10.0
    with pytest.raises(TypeError, match="must return a dict of metrics, got a tuple"):
        lk.evaluate(lambda s, b: (1.0, {}), state, batches)


# --- a fresh fit starts its hooks afresh ----------------------------------------------------


def test_a_fresh_fit_resets_the_hooks_of_an_earlier_one(tmp_path):
    """The same hook objects in a second fresh fit (and in a resume that finds no
    checkpoint) behave as new ones: the early stop after 4 steps, not 1."""
    _, x, y = problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = optim.sgd(lr=0.0)  # the val loss never improves after the first check
    step = lk.train_step(model, loss_fn, opt)
    evaluate = lk.eval_step(model, loss_fn)
    plateau = optim.schedules.reduce_on_plateau(0.1, patience=0)

    def hooks(directory):
        return [
            lk.hooks.NaNGuard(action="skip"),
            lk.hooks.Validate(evaluate, [(x[:8], y[:8])], every_steps=1),
            lk.hooks.EarlyStopping("val/loss", patience=3),
            lk.hooks.ReduceLROnPlateau(plateau),
            lk.hooks.Checkpoint(directory, every_steps=1),
        ]

    def go(hooks, resume=None):
        data = lk.data.Batches(x, y, batch_size=8)
        state = lk.fit(step, lk.TrainState.create(model, opt), data, epochs=3, hooks=hooks,
                       resume=resume)  # fmt: skip
        return int(state.step), lk.driver.plain_data([h.state_dict() for h in hooks], "hooks")

    new = go(hooks(tmp_path / "a"))
    reused = hooks(tmp_path / "b")
    assert go(reused) == new and new[0] == 4
    for path in lk.checkpoint.checkpoints(tmp_path / "b"):
        lk.checkpoint.remove(path)
    assert go(reused) == new
    for path in lk.checkpoint.checkpoints(tmp_path / "b"):
        lk.checkpoint.remove(path)
    assert go(reused, resume="latest") == new


# --- data that yields no batch --------------------------------------------------------------


def test_an_epoch_without_batches_is_an_error():
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    state = lk.TrainState.create(model, opt)
    passes = []

    def empty():
        passes.append(1)
        if len(passes) > 3:  # the old driver looped forever
            raise RuntimeError("endless loop")
        return iter([])

    for limits in ({"max_steps": 3}, {"max_steps": 3, "steps_per_epoch": 2}, {"epochs": 2}):
        passes.clear()
        with pytest.raises(ValueError, match="no batches.*epoch 0"):
            lk.fit(step, state, lk.data.Reiterable(empty), **limits)
    with pytest.raises(ValueError, match="no batches.*length 0"):
        lk.fit(step, state, [], epochs=3)
    one_pass = (b for b in [(x[:8], y[:8])])  # a generator: exhausted after the first pass
    with pytest.raises(ValueError, match="no batches.*epoch 1.*fresh iterator"):
        lk.fit(step, state, lk.data.Reiterable(lambda: one_pass), epochs=3)


def test_fit_arguments_are_checked():
    np = pytest.importorskip("numpy")
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    state = lk.TrainState.create(model, opt)
    data = [(x[:8], y[:8])]
    assert int(lk.fit(step, state, data, epochs=np.int64(2)).step) == 2
    with pytest.raises(TypeError, match="fit needs data"):
        lk.fit(step, state, None)
    with pytest.raises(TypeError, match=r"hooks=\[hook\]"):
        lk.fit(step, state, data, hooks=lk.hooks.Timer())
    with pytest.raises(TypeError, match="resume must be"):
        lk.fit(step, state, data, resume="")


# --- ReduceLROnPlateau ----------------------------------------------------------------------


class ConstantValidation(lk.Hook):
    """A validation loss that never improves, at each epoch end."""

    def on_epoch_end(self, loop):
        loop.logs["val/loss"] = 1.0
        loop.emit("on_validation_end")


@pytest.mark.parametrize("min_lr", [0.004, [0.004, 0.1], (0.3, 0.001)])
def test_reduce_lr_on_plateau_clamps_each_parameter_group_as_torch(min_lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    labels = {n: "bias" if n.endswith("bias") else "w" for n, _ in model.named_parameters()}
    opt = optim.multi_transform({"w": optim.sgd(lr=0.01), "bias": optim.sgd(lr=0.5)}, labels)
    plateau = optim.schedules.reduce_on_plateau(0.01, factor=0.5, patience=0, min_lr=min_lr)
    lrs = []

    class RecordLRs(lk.Hook):
        def on_epoch_end(self, loop):
            lrs.append([float(lr) for lr in optim.learning_rates(loop.state.opt_state)])

    hooks = [ConstantValidation(), lk.hooks.ReduceLROnPlateau(plateau), RecordLRs()]
    data = [(torch.randn(4, 4), torch.randint(0, 2, (4,)))]
    lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
           epochs=12, hooks=hooks)  # fmt: skip

    params = dict(model.named_parameters())
    groups = [{"params": [p for n, p in params.items() if labels[n] == g], "lr": lr}
              for g, lr in (("w", 0.01), ("bias", 0.5))]  # fmt: skip
    topt = torch.optim.SGD(groups)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, factor=0.5, patience=0, min_lr=min_lr)
    ref = []
    for _ in range(12):
        sched.step(1.0)
        ref.append([g["lr"] for g in topt.param_groups])
    assert lrs == ref
    floors = min_lr if isinstance(min_lr, (list, tuple)) else [min_lr] * 2
    assert any(lr == f for f, lr in zip(floors, ref[-1], strict=True))  # a floor was reached


def test_reduce_lr_on_plateau_refuses_a_scheduled_lr():
    model = nn.Linear(2, 2)
    opt = optim.sgd(lr=optim.schedules.constant(0.1))
    plateau = optim.schedules.reduce_on_plateau(0.1, factor=0.5, patience=0)
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]
    hooks = [ConstantValidation(), lk.hooks.ReduceLROnPlateau(plateau)]
    with pytest.raises(ValueError, match="schedule.*inject_hyperparams"):
        lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
               epochs=3, hooks=hooks)  # fmt: skip


def test_reduce_lr_on_plateau_loads_the_state_of_an_older_checkpoint():
    """Before it recorded its last check, the hook's state_dict was the plateau's fields."""
    plateau = optim.schedules.reduce_on_plateau(0.1, factor=0.5, patience=0)
    hook = lk.hooks.ReduceLROnPlateau(plateau)
    state = plateau.update(plateau.init(torch.device("cpu")), torch.tensor(1.0))
    hook.load_state_dict(state._asdict())
    assert hook.checked is None
    for a, b in zip(hook.state, state, strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    saved = hook.state_dict()
    hook.load_state_dict(saved)
    assert hook.state_dict().keys() == {"plateau", "checked"}


def test_early_stopping_loads_the_state_of_an_older_checkpoint():
    """Before it recorded the step of its last check, the hook saved whether it checked."""
    hook = lk.hooks.EarlyStopping(patience=2)
    hook.load_state_dict({"best": 0.5, "wait": 1, "checked": False})
    assert (hook.best, hook.wait, hook.checked) == (0.5, 1, None)  # the epoch end checks
    hook.load_state_dict({"best": 0.5, "wait": 1, "checked": True})
    assert hook.checked == -1  # checked this epoch, at no step a validation now reaches


def test_a_validation_of_another_prefix_does_not_recheck_an_earlier_value(tmp_path):
    """val/ every 10 steps, test/ every 5: at step 15 val/loss in the logs is step 10's, so
    EarlyStopping does not count it again and keep_best does not rank step 15 by it."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = optim.sgd(lr=0.0)  # val/loss never improves: each check counts
    data = lk.data.Batches(torch.randn(40, 4), torch.randint(0, 3, (40,)), batch_size=2)
    evaluate = lk.eval_step(model, loss_fn)
    stopping = lk.hooks.EarlyStopping("val/loss", patience=100)
    checked = []
    stopping.check = lambda loop, check=stopping.check: (checked.append(loop.step), check(loop))
    saving = lk.hooks.Checkpoint(tmp_path, every_steps=5, keep_best="val/loss")
    lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
           epochs=1, hooks=[
               lk.hooks.Validate(evaluate, data, every=None, every_steps=10, prefix="val"),
               lk.hooks.Validate(evaluate, data, every=None, every_steps=5, prefix="test"),
               stopping, saving])  # fmt: skip
    assert checked == [10, 20] and stopping.wait == 1
    ranked = {r["step"]: r["value"] for r in saving.records}
    assert ranked[10] is not None and ranked[20] is not None
    assert ranked.get(5) is None and ranked.get(15) is None


# --- keep_best ranks by values of the checkpoint's own step ---------------------------------


def test_keep_best_ranks_a_checkpoint_only_by_its_own_steps_validation(tmp_path):
    """Step saves every 3 steps, validation every 5 and at the end (step 20): only the
    saves at steps 15 and 20 have a value, and it is their own state's."""
    model, x, y = problem(n=120)
    opt = optim.sgd(lr=0.5)
    evaluate = lk.eval_step(model, loss_fn)
    val = [(x[80:], y[80:])]
    hook = lk.hooks.Checkpoint(tmp_path, every_steps=3, every=None, keep_best="val/loss",
                               best_n=20)  # fmt: skip
    like = lk.TrainState.create(model, opt)
    lk.fit(lk.train_step(model, loss_fn, opt), like, lk.data.Batches(x[:80], y[:80], batch_size=4),
           hooks=[lk.hooks.Validate(evaluate, val, every_steps=5, every=None), hook])  # fmt: skip
    valued = {r["step"]: r["value"] for r in hook.records if r["value"] is not None}
    assert sorted(valued) == [15, 20] and len(hook.records) == 2  # the others rank nowhere
    for r in hook.records:
        if r["value"] is not None:
            saved = lk.checkpoint.load(tmp_path / r["name"], like)
            assert r["value"] == lk.evaluate(evaluate, saved, val)["loss"]


def test_a_monitor_missing_from_the_logs_is_warned_of_once():
    """A typo (others of its source are logged) is named; a source not validated this
    epoch (a validation every few epochs) and a metric a later hook derives are not."""
    with pytest.warns(UserWarning, match="val/los.*val/loss") as warned:
        tiny_fit([FeedMetric([1.0, 1.0]), ConstantValidation(),
                  lk.hooks.EarlyStopping("val/los")], epochs=2)  # fmt: skip
    assert len([w for w in warned if "val/los" in str(w.message)]) == 1

    class Derive(lk.Hook):  # listed after the hook that reads what it derives
        def on_validation_end(self, loop):
            loop.logs["val/ppl"] = 2.0

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_fit([ConstantValidation(), lk.hooks.EarlyStopping("val/ppl"), Derive()], epochs=2)
        test = lk.hooks.Validate(lk.eval_step(nn.Linear(2, 2), loss_fn),
                                 [(torch.randn(4, 2), torch.randint(0, 2, (4,)))],
                                 every=5, prefix="test")  # fmt: skip
        tiny_fit([ConstantValidation(), test, lk.hooks.EarlyStopping("test/loss")], epochs=2)
    with pytest.warns(UserWarning, match="'val_loss', which is not in the logs"):
        tiny_fit([ConstantValidation(), lk.hooks.EarlyStopping("val_loss")], epochs=2)


def test_keep_best_with_a_monitor_missing_from_the_logs_is_warned_of(tmp_path):
    hook = lk.hooks.Checkpoint(tmp_path, keep_best="val/los")
    with pytest.warns(UserWarning, match="keep_best.*val/los"):
        tiny_fit([ConstantValidation(), hook], epochs=1)


def test_reduce_lr_on_plateau_takes_a_custom_plateau_rule():
    """A Plateau of one's own, whose update takes (state, metric): halve the lr each time."""
    inner = optim.schedules.reduce_on_plateau(0.1)
    rule = optim.schedules.Plateau(
        inner.init, lambda state, metric: state._replace(lr=state.lr * 0.5)
    )
    model, opt = nn.Linear(4, 2), optim.sgd(lr=0.1)
    data = [(torch.randn(4, 4), torch.randint(0, 2, (4,)))]
    lrs = []

    class RecordLR(lk.Hook):
        def on_epoch_end(self, loop):
            lrs.append(float(optim.learning_rates(loop.state.opt_state)[0]))

    lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data, epochs=3,
           hooks=[ConstantValidation(), lk.hooks.ReduceLROnPlateau(rule), RecordLR()])  # fmt: skip
    assert lrs == [0.05, 0.025, 0.0125]


def test_a_fresh_run_beside_an_earlier_runs_checkpoints_is_warned_of(tmp_path):
    model, opt = nn.Linear(4, 2), optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    data = [(torch.randn(4, 4), torch.randint(0, 2, (4,)))]
    lk.fit(step, lk.TrainState.create(model, opt), data, hooks=[lk.hooks.Checkpoint(tmp_path)])
    with pytest.warns(UserWarning, match="already holds 1 checkpoint.*resume='latest'"):
        lk.fit(step, lk.TrainState.create(model, opt), data, hooks=[lk.hooks.Checkpoint(tmp_path)])
    with warnings.catch_warnings():  # resuming it is what those checkpoints are for
        warnings.simplefilter("error")
        lk.fit(step, lk.TrainState.create(model, opt), data, epochs=2,
               hooks=[lk.hooks.Checkpoint(tmp_path)], resume="latest")  # fmt: skip


# --- ReduceLROnPlateau on a train metric; monitors nothing logs --------------------------


@pytest.mark.parametrize("validate", [None, "before", "after"])
def test_reduce_lr_on_plateau_on_a_train_metric_matches_torch(validate):
    """monitor="train/loss" steps the plateau once per epoch on the epoch's mean train loss,
    as torch's loop calling ``scheduler.step(epoch_loss)`` does: without a Validate hook,
    and with one listed before or after it (still once per epoch, not twice)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    train = [(torch.randn(6, 5, generator=g, dtype=torch.float64),
              torch.randint(0, 3, (6,), generator=g)) for _ in range(4)]  # fmt: skip
    kwargs = dict(factor=0.5, patience=0, threshold=0.05)
    opt = optim.sgd(lr=0.5, momentum=0.9)
    lrs = []

    class RecordLR(lk.Hook):
        def on_epoch_end(self, loop):
            lrs.append(float(optim.learning_rates(loop.state.opt_state)[0]))

    plateau = lk.hooks.ReduceLROnPlateau(
        optim.schedules.reduce_on_plateau(0.5, **kwargs), monitor="train/loss"
    )
    hooks = [plateau, RecordLR()]
    if validate is not None:
        check = lk.hooks.Validate(lk.eval_step(model, loss_fn), train[:1])
        hooks.insert(0 if validate == "before" else 1, check)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt),
                       train, epochs=14, hooks=hooks)  # fmt: skip

    ref = copy.deepcopy(model)
    topt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kwargs)
    ref_lrs = []
    for _ in range(14):
        total = torch.zeros((), dtype=torch.float64)
        for b in train:
            topt.zero_grad()
            loss = loss_fn(ref, b)[0]
            loss.backward()
            topt.step()
            total += loss.detach()
        sched.step((total / len(train)).item())
        ref_lrs.append(topt.param_groups[0]["lr"])
    assert lrs == ref_lrs and len(set(lrs)) > 2
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-10, atol=1e-12)


def test_early_stopping_checks_a_train_metric_once_per_epoch_wherever_it_is_listed():
    """Listed before a Validate, EarlyStopping("train/loss") checks at the epoch end and not
    again at that step's validation; two Validate hooks at one step check "val/loss" once."""
    for hooks in (
        lambda es: [es, ConstantValidation()],
        lambda es: [ConstantValidation(), ConstantValidation(), es],
    ):
        for monitor in ("train/loss", "val/loss"):
            stop = lk.hooks.EarlyStopping(monitor, patience=3, mode="max")  # never improves
            state = tiny_fit(hooks(stop), epochs=10)
            assert int(state.step) == 4, (monitor, int(state.step))  # best at 1, 3 more


@pytest.mark.parametrize(
    "make",
    [
        lambda d: lk.hooks.ReduceLROnPlateau(optim.schedules.reduce_on_plateau(0.1)),
        lambda d: lk.hooks.EarlyStopping("val/loss"),
        lambda d: lk.hooks.Checkpoint(d, keep_best="val/loss"),
    ],
)
def test_a_monitor_that_no_hook_logs_is_warned_of(make, tmp_path):
    """The default monitor "val/loss" without a Validate hook would never be fed: warned
    of once, naming the fix. With a Validate of that prefix (every few epochs) it is not."""
    with pytest.warns(UserWarning, match="'val/loss'.*no Validate hook.*prefix") as warned:
        tiny_fit([make(tmp_path / "a")], epochs=3)
    assert len([w for w in warned if "val/loss" in str(w.message)]) == 1
    model = nn.Linear(2, 2)
    later = lk.hooks.Validate(lk.eval_step(model, loss_fn), [(torch.randn(4, 2),
                              torch.randint(0, 2, (4,)))], every=5)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_fit([later, make(tmp_path / "b")], epochs=3)


# --- loggers appending to a file whose last line a crash cut short -----------------------


@pytest.mark.parametrize(
    "logger, cut",
    [
        (lk.hooks.JSONLLogger, '{"epoch": 0, "step": 3, "train/loss": 0.7}\n{"epoch": 1, "st'),
        (lk.hooks.CSVLogger, "epoch,step,train/loss\r\n0,3,0.7\r\n1,6"),
    ],
)
def test_append_after_a_line_cut_short_drops_it_and_resumes(logger, cut, tmp_path):
    """The earlier run's cut-short last line is dropped, not glued to this run's first
    record; interrupted and resumed, the file is the uninterrupted run's."""

    class Crash(Exception):
        pass

    class CrashAt(lk.Hook):
        def on_step_end(self, loop):
            if loop.step == 8:
                raise Crash

    model, opt = nn.Linear(5, 2), optim.sgd(lr=0.1)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 5, generator=g), torch.randint(0, 2, (4,), generator=g))
            for _ in range(3)]  # fmt: skip
    step = lk.train_step(model, loss_fn, opt)

    def run(directory, *extra, resume=None):
        hooks = [logger(directory, append=True), lk.hooks.Checkpoint(directory / "ck"), *extra]
        lk.fit(step, lk.TrainState.create(model, opt), data, epochs=4, hooks=hooks,
               resume=resume)  # fmt: skip
        return (directory / logger.default_filename).read_text()

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for d in (straight, broken):
        d.mkdir()
        (d / logger.default_filename).write_text(cut, newline="")
    expected = run(straight)
    with pytest.raises(Crash):
        run(broken, CrashAt())
    assert run(broken, resume="latest") == expected
    records = logger(straight).read()
    assert [int(r["epoch"]) for r in records] == [0, 0, 1, 2, 3]
    assert [int(r["step"]) for r in records] == [3, 3, 6, 9, 12]
    assert float(records[0]["train/loss"]) == 0.7


# --- hooks on an ensemble's per-member metrics --------------------------------------------


def ensemble_problem():
    mk = lambda: nn.Linear(5, 2)  # noqa: E731
    opt = optim.sgd(lr=0.1)
    state = lk.ensemble.create(mk, opt, seeds=range(3))
    state = lk.ensemble.set_hyperparams(state, lr=[0.1, 0.2, 0.3])
    step = lk.ensemble_step(lk.train_step(mk(), loss_fn, opt))
    evaluate = lk.ensemble_step(lk.eval_step(mk(), loss_fn))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g)
    data = lk.data.Batches(x, (x[:, 0] > 0).long(), batch_size=8)
    return step, state, data, lk.hooks.Validate(evaluate, data)


def test_learning_rate_monitor_logs_an_ensembles_lrs_per_member():
    step, state, data, _ = ensemble_problem()
    logged = []

    class Record(lk.Hook):
        def on_epoch_end(self, loop):
            logged.append(loop.logs["lr"])

    lk.fit(step, state, data, epochs=1, hooks=[lk.hooks.LearningRateMonitor(), Record()])
    assert logged == [pytest.approx([0.1, 0.2, 0.3], rel=1e-7)]


@pytest.mark.parametrize(
    "make, who",
    [
        (lambda d: lk.hooks.EarlyStopping("val/loss"), "EarlyStopping"),
        (lambda d: lk.hooks.EarlyStopping("train/loss"), "EarlyStopping"),
        (lambda d: lk.hooks.Checkpoint(d, keep_last=1, keep_best="val/loss"), "keep_best"),
    ],
)
def test_a_per_member_metric_where_one_number_is_needed_names_the_fix(make, who, tmp_path):
    step, state, data, validate = ensemble_problem()
    with pytest.raises(TypeError, match=f"{who}.*one per ensemble member.*statistics.mean"):
        lk.fit(step, state, data, epochs=2, hooks=[validate, make(tmp_path)])


def test_empty_validation_data_is_named_before_training():
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    ran = []
    step = lk.train_step(model, loss_fn, opt)

    def counting(state, batch):
        ran.append(1)
        return step(state, batch)

    with pytest.raises(ValueError, match="Validate\\(prefix='val'\\) got validation data with no"):
        lk.fit(counting, lk.TrainState.create(model, opt), lk.data.Batches(x, y, batch_size=8),
               hooks=[lk.hooks.Validate(lk.eval_step(model, loss_fn), [])])  # fmt: skip
    assert not ran


def test_reiterable_passes_the_epoch_only_to_a_positional_parameter():
    """``make(epoch)`` where ``make`` takes a positional argument, else ``make()``: a
    ``functools.partial`` leaving keyword-only parameters (a seed) once got the epoch as a
    second positional argument and failed."""

    def gen(data, *, seed=0):
        yield from data[seed:]

    def by_epoch(epoch, scale=1):
        yield epoch * scale

    cases = {
        "partial with keyword-only": (functools.partial(gen, [1, 2]), [[1, 2], [1, 2]]),
        "positional": (by_epoch, [[0], [1]]),
        "var-positional": (lambda *args: iter(args), [[0], [1]]),
        "none": (lambda: iter([7]), [[7], [7]]),
    }
    for name, (make, want) in cases.items():
        data = lk.data.Reiterable(make)
        got = []
        for epoch in range(2):
            data.set_epoch(epoch)
            got.append(list(data))
        assert got == want, name


def test_batches_takes_numpy_integers_and_names_bad_input():
    """NumPy integers are integers (``world_size=np.int64(2)`` was refused with a message
    contradicting itself); a dict, a 0-dim tensor, mismatched lengths and bad counts are
    errors that say what Batches takes."""
    import numpy as np

    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    two, one = np.int64(2), np.int64(1)
    sharded = lk.data.Batches(x, y, batch_size=two, rank=one, world_size=two)
    plain = lk.data.Batches(x, y, batch_size=2, rank=1, world_size=2)
    assert (
        [b[1].tolist() for b in sharded] == [b[1].tolist() for b in plain] == [[2, 3], [6, 7], [9]]
    )
    arrays = lk.data.Batches(x.numpy(), y.numpy(), batch_size=4)  # NumPy arrays index alike
    assert [b[1].tolist() for b in arrays] == [b[1].tolist() for b in lk.data.Batches(
        x, y, batch_size=4)]  # fmt: skip
    for bad, error, message in [
        (({"x": x},), TypeError, "leading example dimension, got a dict: pass each as an"),
        ((torch.tensor(1.0),), ValueError, "got a 0-dim tensor"),
        ((x, y[:5]), ValueError, "same first dimension"),
    ]:
        with pytest.raises(error, match=message):
            lk.data.Batches(*bad, batch_size=2)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match=f"batch_size must be an integer, got {bad}"):
            lk.data.Batches(x, batch_size=bad)
    with pytest.raises(ValueError, match=r"need 0 <= rank < world_size, got rank=2"):
        lk.data.Batches(x, batch_size=2, rank=2, world_size=2)


def test_hooks_are_closed_when_an_exception_ends_the_fit():
    """A hook raising mid-epoch: the error reaches the caller unchanged, ``on_fit_end`` is
    not called (a Checkpoint must not save then), and every hook's ``close()`` is (the
    progress bar was left open, the TensorBoard writer too); a ``close()`` that fails then is
    a warning, not the error the caller sees."""
    events = []

    class Boom(lk.Hook):
        def on_step_end(self, loop):
            if loop.step == 2:
                raise KeyError("boom")

    class Recorder(lk.Hook):
        def on_fit_end(self, loop):
            events.append("end")

        def close(self):
            events.append("close")

    class BadClose(lk.Hook):
        def close(self):
            raise OSError("disk gone")

    class OwnClose(lk.Hook):  # a close() of another signature is not the event
        def close(self, loop):
            raise AssertionError("called")

    bar = lk.hooks.ProgressBar(file=io.StringIO())
    model = nn.Linear(3, 2)
    opt = optim.sgd(lr=0.1)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))] * 4
    hooks = [bar, lk.hooks.Every(Recorder(), steps=2), Boom(), BadClose(), OwnClose()]
    with pytest.warns(UserWarning, match=r"BadClose.close\(\) failed: OSError"):
        with pytest.raises(KeyError, match="boom"):
            lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
                   epochs=1, hooks=hooks)  # fmt: skip
    assert events == ["close"] and bar.bar.disable  # closed
    events.clear()
    with pytest.raises(OSError, match="disk gone"):  # after a normal end: raised, all closed
        lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
               epochs=1, hooks=[BadClose(), lk.hooks.Every(Recorder(), steps=2),
                                OwnClose()])  # fmt: skip
    assert events == ["end", "close"]


def test_sharded_data_with_a_step_that_does_not_sync_is_warned_of(monkeypatch):
    """Under torchrun, a plain (or DP-SGD) step over data sharded across the ranks trains a
    different model on each rank, silently; fit warns, unless data_parallel=False says it is
    meant. Unsharded data, or one process, is not warned of."""
    monkeypatch.setattr(lk.distributed, "world_size", lambda: 2)
    model = nn.Linear(3, 2)
    opt = optim.sgd(lr=0.1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    step = lk.train_step(model, loss_fn, opt)
    shard = lk.data.Batches(x, y, batch_size=2, rank=0, world_size=2)
    sampler = torch.utils.data.DistributedSampler(
        torch.utils.data.TensorDataset(x, y), num_replicas=2, rank=0
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), sampler=sampler)
    for data in (shard, loader):
        with pytest.warns(UserWarning, match="sharded across 2 ranks but the step does not sync"):
            lk.fit(step, lk.TrainState.create(model, opt), data, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.fit(step, lk.TrainState.create(model, opt), shard, epochs=1, data_parallel=False)
        lk.fit(step, lk.TrainState.create(model, opt), lk.data.Batches(x, y, batch_size=2),
               epochs=1)  # fmt: skip


def test_hook_states_follow_what_the_hooks_monitor_across_a_resume(tmp_path):
    """A resumed run with an EarlyStopping added before the one it had: each gets its own
    state (by monitor), not the other's by position (the accuracy hook once got the loss
    hook's best, 1.02, which no accuracy beats). A checkpoint written before states were
    keyed by monitor still loads by position."""
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    data = lk.data.Batches(x, y, batch_size=8)
    validate = lk.hooks.Validate(lk.eval_step(model, loss_fn), [(x, y)])
    first = lk.hooks.EarlyStopping("val/loss", patience=50)
    ckpt = lk.hooks.Checkpoint(tmp_path)
    lk.fit(step, lk.TrainState.create(model, opt), data, epochs=2,
           hooks=[validate, first, ckpt])  # fmt: skip
    acc = lk.hooks.EarlyStopping("val/acc", mode="max", patience=50)
    loss = lk.hooks.EarlyStopping("val/loss", patience=50)
    lk.fit(step, lk.TrainState.create(model, opt), data, epochs=2, resume="latest",
           hooks=[validate, acc, loss, lk.hooks.Checkpoint(tmp_path)])  # fmt: skip
    assert loss.best == first.best and acc.best is None

    loop = lk.Loop(lk.TrainState.create(model, opt), [validate, first], None, 5, None)
    saved = loop.state_dict()
    assert set(saved["hooks"]) == {"Validate[val]", "EarlyStopping[val/loss]"}
    saved["hooks"] = {"Validate": {"last_step": 3}, "EarlyStopping": {"best": 0.5, "wait": 2,
                                                                      "checked": None}}  # fmt: skip
    old = lk.hooks.EarlyStopping("val/loss")
    lk.Loop(lk.TrainState.create(model, opt), [validate, old], None, 5, None).load_state_dict(saved)
    assert (old.best, old.wait, validate.last_step) == (0.5, 2, 3)


@pytest.mark.compile
def test_a_donated_step_is_not_undone_but_refused_with_the_fix():
    """NaNGuard's 'skip' and 'stop' put back the state before the step; a donated step
    wrote its new state into that state's tensors, so the guard 'undid' nothing and the
    params went NaN. Refused at fit start (action='raise' still works), and skip_step()
    from any hook is an error naming donate."""
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    donated = lk.train_step(model, loss_fn, opt, compile=True, donate=True, backend="aot_eager")
    data = lk.data.Batches(x, y, batch_size=8)
    for action, step in (("skip", donated), ("stop", functools.partial(donated))):
        with pytest.raises(ValueError, match=f"NaNGuard\\(action='{action}'\\).*donated step"):
            lk.fit(step, lk.TrainState.create(model, opt), data, epochs=1,
                   hooks=[lk.hooks.NaNGuard(action=action)])  # fmt: skip

    class Undo(lk.Hook):
        def on_step_end(self, loop):
            loop.skip_step()

    with pytest.raises(RuntimeError, match="a donated step .* cannot be undone"):
        lk.fit(donated, lk.TrainState.create(model, opt), data, epochs=1, hooks=[Undo()])
    state = lk.fit(donated, lk.TrainState.create(model, opt), data, epochs=1,
                   hooks=[lk.hooks.NaNGuard(action="raise")])  # fmt: skip
    assert int(state.step) == len(data)


def test_two_loggers_on_one_file_are_refused(tmp_path):
    """Each record was written twice; an Every-wrapped logger counts too, and a JSONL and
    a CSV logger in one directory are two files, not a clash."""
    for hooks in ([lk.hooks.JSONLLogger(tmp_path), lk.hooks.JSONLLogger(tmp_path)],
                  [lk.hooks.CSVLogger(tmp_path), lk.hooks.Every(lk.hooks.CSVLogger(tmp_path),
                                                                epochs=2)]):  # fmt: skip
        with pytest.raises(ValueError, match="two loggers write .*metrics"):
            tiny_fit(hooks, epochs=1)
    tiny_fit([lk.hooks.JSONLLogger(tmp_path), lk.hooks.CSVLogger(tmp_path)], epochs=1)
