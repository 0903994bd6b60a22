"""The thin driver, its hooks and checkpoints."""

import copy
import os

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
    assert files == ["step-000000012.ckpt", "step-000000016.ckpt"]
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


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    model, _, _ = problem()
    opt = optim.adam()
    lk.checkpoint.save(tmp_path / "a.ckpt", lk.TrainState.create(model, opt))
    other = nn.Sequential(
        nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 2)
    )
    with pytest.raises(
        lk.checkpoint.CheckpointError,
        match=r"params\['0.weight'\]: checkpoint has torch.float32\[8, 4\], "
        r"state has torch.float32\[16, 4\]",
    ):
        lk.checkpoint.load(tmp_path / "a.ckpt", like=lk.TrainState.create(other, opt))
    with pytest.raises(lk.checkpoint.CheckpointError, match=r"missing .*max_exp_avg_sq"):
        lk.checkpoint.load(
            tmp_path / "a.ckpt", like=lk.TrainState.create(model, optim.adam(amsgrad=True))
        )


def test_truncated_checkpoint_is_reported(tmp_path):
    model, _, _ = problem()
    state = lk.TrainState.create(model, optim.sgd())
    path = lk.checkpoint.save(tmp_path / "a.ckpt", state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(lk.checkpoint.CheckpointError, match="unreadable"):
        lk.checkpoint.load(path, like=state)


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model, _, _ = problem()
    state = lk.TrainState.create(model, optim.sgd())
    path = lk.checkpoint.save(tmp_path / "a.ckpt", state)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        lk.checkpoint.save(path, state)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_keep_last_only_prunes_what_it_wrote(tmp_path):
    model, x, y = problem()
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    directory = tmp_path / "ckpts"
    directory.mkdir()
    (directory / "best.ckpt").write_bytes(b"user file")
    later = lk.checkpoint.save(directory / "step-000000100.ckpt", lk.TrainState.create(model, opt))
    hook = lk.hooks.Checkpoint(directory, keep_last=1)
    lk.fit(step, lk.TrainState.create(model, opt), lk.data.Batches(x, y, batch_size=8),
           epochs=3, hooks=[hook])  # fmt: skip
    files = sorted(os.listdir(directory))
    assert files == ["best.ckpt", "step-000000015.ckpt", "step-000000100.ckpt"]
    assert later.exists() and hook.saved == [directory / "step-000000015.ckpt"]


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
    assert os.listdir(tmp_path) == ["step-000000007.ckpt"]


def test_generator_states_of_other_devices_are_tolerated(tmp_path):
    """A checkpoint carries one generator state per device: moving between a GPU and a CPU
    machine keeps the states both sides have and leaves the others alone."""
    model, _, _ = problem()
    opt = optim.sgd()
    cpu_state = lk.TrainState.create(model, opt, seed=1)
    gpu_like = cpu_state.replace(
        rng={**cpu_state.rng, "cuda:0": torch.zeros(16, dtype=torch.uint8)}
    )
    lk.checkpoint.save(tmp_path / "gpu.ckpt", gpu_like)
    restored = lk.checkpoint.load(tmp_path / "gpu.ckpt", like=lk.TrainState.create(model, opt))
    assert set(restored.rng) == {"cpu"} and torch.equal(restored.rng["cpu"], cpu_state.rng["cpu"])
    lk.checkpoint.save(tmp_path / "cpu.ckpt", cpu_state)
    restored = lk.checkpoint.load(tmp_path / "cpu.ckpt", like=gpu_like)
    assert torch.equal(restored.rng["cuda:0"], gpu_like.rng["cuda:0"])


def test_metadata_cannot_overwrite_versions(tmp_path):
    model, _, _ = problem()
    path = lk.checkpoint.save(tmp_path / "a.ckpt", lk.TrainState.create(model, optim.sgd()),
                              {"torch": "fake", "note": "mine"})  # fmt: skip
    meta = lk.checkpoint.read(path)["metadata"]
    assert meta["torch"] == str(torch.__version__) and meta["note"] == "mine"
    with pytest.raises(TypeError, match="JSON-serialisable"):
        lk.checkpoint.save(tmp_path / "b.ckpt", lk.TrainState.create(model, optim.sgd()),
                           {"tensor": torch.ones(1)})  # fmt: skip
    assert not (tmp_path / "b.ckpt").exists()


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
