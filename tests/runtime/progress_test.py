"""Progress lines: rate and ETA from finished work (autospace_jax/runtime/progress.py)."""

import logging
import re
import time

import jax.numpy as jnp
import pytest

from autospace_jax.data import input_pipeline
from autospace_jax.final import train
from autospace_jax.runtime import progress


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_format_seconds():
    assert [progress.format_seconds(s) for s in (7.4, 185, 7620)] == ["7s", "3m05s", "2h07m"]


def test_first_unit_and_excluded_time_are_left_out_of_the_rate():
    clock, compiling = FakeClock(), [0.0]
    p = progress.Progress(10, every_secs=1.0, clock=clock, excluded=lambda: compiling[0])
    clock.t, compiling[0] = 30.0, 28.0  # The first unit: mostly compile.
    assert p.measure(1).seconds_per_unit == pytest.approx(2.0)  # Only unit so far: its own.
    clock.t += 4.0  # Two more units, 2 s each...
    m = p.measure(3)
    assert m.seconds_per_unit == pytest.approx(2.0) and m.eta_s == pytest.approx(14.0)
    clock.t, compiling[0] = clock.t + 7.0, compiling[0] + 5.0  # ...one with 5 s of compile.
    m = p.measure(4)
    assert m.seconds_per_unit == pytest.approx(2.0) and m.excluded_s == pytest.approx(33.0)


class Dispatched:
    """A step the host has dispatched; the device finishes it ``seconds`` later."""

    def __init__(self, clock, seconds):
        self.clock, self.seconds = clock, seconds

    def block_until_ready(self):
        self.clock.t += self.seconds
        return self


def test_report_counts_finished_steps_and_logs_only_when_due(caplog):
    clock, compiling = FakeClock(), [0.0]
    p = progress.Progress(100, every_secs=10.0, clock=clock, excluded=lambda: compiling[0])
    with caplog.at_level(logging.INFO):
        assert p.report(1, "x: step", sync=jnp.ones(3)) is None  # Starts the clock only.
        clock.t = 5.0
        assert p.report(2, "x: step") is None  # Not due.
        clock.t = 12.0
        # Dispatched 11 steps in 12 s; the device needs 10 s more to finish them.
        m = p.report(12, "x: step", sync=Dispatched(clock, 10.0))
        clock.t, compiling[0] = 33.0, 5.0  # 3 more steps (2 s each) and 5 s of compiling.
        p.report(15, "x: step", excluded_name="compiling, 4 of 5 cells")
    assert m is not None and m.seconds_per_unit == pytest.approx(22.0 / 11)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("x: ")]
    assert lines == [
        "x: step 12/100 (12%), 2.0 s/step, ETA 2m56s",
        "x: step 15/100 (15%), 2.0 s/step, ETA 2m50s "
        "(+ 5.0s compiling, 4 of 5 cells so far; not in the rate)",
    ]


def test_train_eta_within_a_factor_2_of_the_real_remaining_time(tmp_path, monkeypatch, caplog):
    """A real train run whose steps take uneven time (the input sleeps 0 to 0.25 s in a
    cycle): every ETA it logs is within a factor 2 of the time the steps really took
    after it (the ETA covers the steps, not the final evaluation)."""
    from configs import digits

    config = digits.get_config()
    config.model.stem, config.model.widths, config.model.head = 8, (8, 16), 16
    config.model.blocks, config.model.strides = (1, 1), (1, 2)
    # About 7 s of steps, most of it the sleeps below: enough ETA lines with 2 s or more
    # left, however fast the steps themselves run (2 epochs left too few on 4 devices).
    config.train.epochs, config.train.batch_size = 3, 32
    config.train.eval_every_epochs = 100  # No evaluation inside the loop.
    config.progress_every_secs = 1.0
    sleeps = (0.0, 0.0, 0.05, 0.0, 0.25)
    fetched = []  # When each training batch was ready.
    load = input_pipeline.load

    class Uneven:
        def __init__(self, dataset):
            self._dataset = dataset

        def __getattr__(self, name):
            return getattr(self._dataset, name)

        def train_batch(self, step, *args, **kwargs):
            time.sleep(sleeps[step % len(sleeps)])
            batch = self._dataset.train_batch(step, *args, **kwargs)
            fetched.append(time.time())
            return batch

    monkeypatch.setattr(input_pipeline, "load", lambda *a, **k: Uneven(load(*a, **k)))
    with caplog.at_level(logging.INFO):
        train.run(config, str(tmp_path))
    etas = []
    for record in caplog.records:
        found = re.match(r"train: step \d+/\d+ .*ETA (?:(\d+)m)?(\d+)s$", record.getMessage())
        if found:
            eta = 60 * int(found[1] or 0) + int(found[2])
            etas.append((eta, fetched[-1] - record.created))
    checked = [(eta, left) for eta, left in etas if left >= 2.0]  # ETAs are whole seconds.
    assert len(checked) >= 3, etas
    for eta, left in checked:
        assert left / 2 <= eta <= 2 * left, (eta, left, etas)
