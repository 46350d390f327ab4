"""TrainLogger progress output: a tqdm bar on a terminal, one plain line per logged step otherwise."""

import csv
import io
import json

from fastkd.train.logging import TrainLogger


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(logger: TrainLogger, steps: int, log_every: int) -> None:
    """What the trainer does: ``advance`` every step, ``log`` every ``log_every`` steps."""
    for step in range(1, steps + 1):
        logger.advance()
        if step % log_every == 0:
            logger.log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "images_per_s": 100.0})


def test_progress_to_a_file_is_one_line_per_logged_step(tmp_path, monkeypatch):
    stderr = io.StringIO()  # a log file: not a terminal
    monkeypatch.setattr("sys.stderr", stderr)
    logger = TrainLogger(tmp_path, total_steps=100, tensorboard=False)
    _run(logger, 100, log_every=10)
    logger.close({"steps": 100})
    text = stderr.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10, lines
    assert lines[0].startswith("train step 10/100 (10%) loss=0.1 lr=0.001 img/s=100.0 elapsed ")
    assert lines[-1].startswith("train step 100/100 (100%)") and "eta 0:00:00" in lines[-1]
    with open(tmp_path / "metrics.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == list(range(10, 101, 10))
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 100}
    assert not list(tmp_path.glob(".*tmp"))


def test_progress_on_a_terminal_is_a_bar(tmp_path, monkeypatch):
    stderr = _Terminal()
    monkeypatch.setattr("sys.stderr", stderr)
    logger = TrainLogger(tmp_path, total_steps=20, tensorboard=False)
    assert logger._bar is not None
    _run(logger, 20, log_every=10)
    logger.close({"steps": 20})
    assert "train step" not in stderr.getvalue() and "train:" in stderr.getvalue()


def test_no_progress_prints_nothing(tmp_path, monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    logger = TrainLogger(tmp_path, total_steps=20, progress=False, tensorboard=False)
    _run(logger, 20, log_every=5)
    logger.close({"steps": 20})
    assert stderr.getvalue() == ""


def test_resumed_run_counts_from_its_start(tmp_path, monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    logger = TrainLogger(tmp_path, total_steps=40, start_step=20, tensorboard=False)
    logger.log({"step": 30, "loss": 0.5})
    assert stderr.getvalue().startswith("train step 30/40 (75%) loss=0.5 lr=nan img/s=nan")
