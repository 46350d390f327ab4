"""`fastkd eval` checks its numeric options before loading anything, always prints valid JSON, and
shows progress bars only on a terminal without TQDM_DISABLE; `fastkd data scan` honours TQDM_DISABLE."""

import io
import json
import math

import pytest
import torch

from fastkd.cli import _finite_report, main
from fastkd.eval import extract_features, train_linear_probe
from fastkd.eval.evaluate import check_eval_options


def _exit_2(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("protocol, option, value", [
    ("linear", "--lr", "nan"), ("linear", "--lr", "inf"), ("linear", "--lr", "-0.1"), ("linear", "--epochs", "0"),
    ("linear", "--weight-decay", "nan"), ("linear", "--probe-batch-size", "0"), ("knn", "--k", "0"),
    ("knn", "--temperature", "0"), ("knn", "--temperature", "nan"), ("knn", "--batch-size", "0"),
    ("knn", "--num-workers", "-1"), ("knn", "--image-size", "0"), ("linear", "--resize", "-3"),
])
def test_bad_numeric_option_is_rejected_before_loading(tmp_path, capsys, protocol, option, value):
    # the model and the splits do not exist: an error about them would mean they were loaded first
    err = _exit_2(capsys, ["eval", protocol, str(tmp_path / "missing.pt"), "--train", str(tmp_path / "t"),
                           "--val", str(tmp_path / "v"), f"{option}={value}"])
    assert f"{option} must be" in err and "missing.pt" not in err, err


def test_library_rejects_non_finite_values():
    with pytest.raises(ValueError, match="lr must be a finite number"):
        check_eval_options({"lr": math.nan})
    with pytest.raises(ValueError, match="lr must be a finite number"):
        train_linear_probe(torch.randn(8, 4), torch.arange(8) % 2, torch.randn(4, 4), torch.arange(4) % 2,
                           lr=math.nan, epochs=1)
    check_eval_options({"lr": 0.0, "k": 1, "image_size": None, "backend": "torch"})


def test_report_json_is_always_valid(capsys):
    report = _finite_report({"top1": 50.0, "train_loss": math.nan, "class_counts": {"a": {"x": 1}},
                             "extra": [math.inf, 1.0]})
    assert report["train_loss"] is None and report["extra"] == [None, 1.0]
    assert report["non_finite"] == ["train_loss", "extra[0]"]
    json.dumps(report, allow_nan=False)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _Loader:
    def __init__(self):
        self.batches = [type("B", (), {"views": [torch.randn(2, 3)], "labels": torch.zeros(2, dtype=torch.long),
                                       "indices": torch.arange(2) + 2 * i}) for i in range(3)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("env", [None, "1"])
def test_progress_bars_on_a_terminal_unless_tqdm_disable(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    extract_features(torch.nn.Linear(3, 4), _Loader(), desc="train features")
    train_linear_probe(torch.randn(8, 4), torch.arange(8) % 2, torch.randn(4, 4), torch.arange(4) % 2, epochs=2)
    text = terminal.getvalue()
    if env is None:
        assert "train features" in text and "3/3" in text and "linear probe" in text and "2/2" in text
    else:
        assert text == ""


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    extract_features(torch.nn.Linear(3, 4), _Loader())
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("env", [None, "1"])
def test_data_scan_honours_tqdm_disable(tmp_path, monkeypatch, env):
    from fastkd.data import write_sample_dataset
    from fastkd.data.scan import scan_dataset

    terminal = _Terminal()  # the scan bar shows on a terminal only
    monkeypatch.setattr("sys.stderr", terminal)
    data = write_sample_dataset(tmp_path / "data", images=12)
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    scan_dataset(data, workers=1, progress=True)
    assert ("scan:" in terminal.getvalue()) == (env is None)
