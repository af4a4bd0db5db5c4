import csv
import json
import logging
import sys

import pytest

from videolm.pretrain.metrics_log import MetricsLogger, plot_losses, read_metrics


def _steps(n, start=0):
    """Records like training's: one sampled objective per step plus the always-present keys."""
    out = []
    for s in range(start, start + n):
        obj = "mlm_loss" if s % 2 == 0 else "fom_loss"
        out.append((s, {"loss": 5.0 - 0.1 * s, obj: 3.0 - 0.05 * s, "lr": 1e-4, "examples_per_s": 100.0 + s}))
    return out


def _log_all(logger, steps):
    for step, values in steps:
        logger.log(step, values)


def test_jsonl_round_trip_with_varying_keys(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    steps = _steps(6)
    _log_all(logger, steps)
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": s, **v} for s, v in steps]


def test_csv_union_header_and_empty_cells(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(0, {"loss": 2.0, "mlm_loss": 1.5})
    logger.log(1, {"loss": 1.8, "fom_loss": 0.5})  # new column: CSV rebuilt
    logger.log(2, {"loss": 1.7, "mlm_loss": 1.25})  # fits the header: appended
    # The CSV is complete on disk before close(), so a crash loses nothing.
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "mlm_loss", "fom_loss"]
    assert rows == [
        {"step": "0", "loss": "2.0", "mlm_loss": "1.5", "fom_loss": ""},
        {"step": "1", "loss": "1.8", "mlm_loss": "", "fom_loss": "0.5"},
        {"step": "2", "loss": "1.7", "mlm_loss": "1.25", "fom_loss": ""},
    ]
    logger.close()


def test_resume_drops_later_steps_and_continues(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    _log_all(logger, _steps(10))
    logger.close()

    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=5)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(6))
    _log_all(logger, _steps(4, start=6))
    logger.close()

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(10))
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(10))
    assert not list(tmp_path.glob("*.tmp"))


def test_new_run_overwrites(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    _log_all(logger, _steps(3))
    logger.close()
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(0, {"loss": 9.0})
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 9.0}]


def test_torn_last_line_is_skipped(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    _log_all(logger, _steps(3))
    logger.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 4.')  # crash mid-write
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]

    # Resuming rewrites the file without the torn line, so new lines append cleanly.
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=2)
    logger.log(3, {"loss": 4.5})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path)
    steps = _steps(5)
    _log_all(logger, steps)
    logger.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    want = [(s, v["loss"]) for s, v in steps]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want])
    assert [e.step for e in acc.Scalars("mlm_loss")] == [0, 2, 4]


def test_missing_tensorboard_warns_and_continues(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with caplog.at_level(logging.WARNING, logger="videolm.pretrain.trainer"):
        logger = MetricsLogger(tmp_path)
    assert "TensorBoard logging disabled" in caplog.text
    logger.log(0, {"loss": 1.0})
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists()


def test_plot_writes_png(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    assert logger.plot() is None  # nothing logged yet
    _log_all(logger, _steps(60))
    out = logger.plot()
    logger.close()
    assert out == tmp_path / "loss_curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    custom = plot_losses(read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "sub" / "curves.png")
    assert custom.stat().st_size > 0


def test_disabled_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, enabled=False)
    _log_all(logger, _steps(3))
    assert logger.plot() is None
    logger.close()
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_values_are_floats(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(0, {"loss": 1, "lr": 3e-4})
    with pytest.raises(ValueError):
        logger.log(1, {"step": 1.0})
    logger.close()
    (rec,) = read_metrics(tmp_path / "metrics.jsonl")
    assert json.dumps(rec) == '{"step": 0, "loss": 1.0, "lr": 0.0003}'
