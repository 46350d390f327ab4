"""Training logs on the main rank: progress, ``metrics.csv``, TensorBoard scalars, and at the end
``summary.json`` plus ``loss_curves.png`` (files written with :mod:`fastkd.durable`). Progress goes
to stderr: a tqdm bar on a terminal, else one plain line per logged step."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from tqdm.auto import tqdm

from fastkd.checks import check_positive_ints
from fastkd.durable import atomic_write_json, atomic_write_text

_FIRST_COLUMNS = ["step", "epoch", "loss", "lr", "weight_decay", "grad_norm", "images_per_s", "skipped_steps"]


def _value(row: dict, column: str) -> float:
    """``row[column]`` as a float; NaN where the row lacks it (CSV rows hold '' there)."""
    value = row.get(column, "")
    return math.nan if value in ("", None) else float(value)


def _clock(seconds: float) -> str:
    """``H:MM:SS``; ``?`` when unknown."""
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


def _is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class TrainLogger:
    """Writes the metrics of logged steps to ``<output_dir>/metrics.csv`` and TensorBoard
    (``<output_dir>/tensorboard``); ``enabled=False`` (non-main ranks): every call a no-op. On resume
    (``start_step > 0``) CSV rows after ``start_step`` (logged after the last checkpoint) are dropped."""

    def __init__(self, output_dir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 enabled: bool = True, progress: bool = True, tensorboard: bool = True):
        check_positive_ints(total_steps=total_steps)
        self.enabled, self.total_steps, self.output_dir = enabled, total_steps, Path(output_dir)
        self.csv_path = self.output_dir / "metrics.csv"
        self.rows: list[dict] = []
        self.columns: list[str] = []
        self._bar = self._writer = None
        self._lines = False  # progress as plain lines (stderr is not a terminal)
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or [])
                self.rows = [row for row in reader if start_step > 0 and int(float(row["step"])) <= start_step]
            self._rewrite_csv()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start_step + 1)
        if progress and _is_terminal(sys.stderr):
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
        elif progress:
            self._lines = True
            self._start_step, self._start_time = start_step, time.perf_counter()

    def _rewrite_csv(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, text.getvalue())

    def _progress_line(self, row: dict) -> str:
        """``train step S/T (P%) loss=... lr=... img/s=... elapsed H:MM:SS eta H:MM:SS``."""
        step, elapsed = row["step"], time.perf_counter() - self._start_time
        done = step - self._start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else math.nan
        return (f"train step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) "
                f"loss={row['loss']:.4g} lr={row.get('lr', math.nan):.3g} "
                f"img/s={row.get('images_per_s', math.nan):.1f} elapsed {_clock(elapsed)} eta {_clock(eta)}")

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar (called every step, logged or not)."""
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, metrics: dict) -> None:
        """Record one logged step; ``metrics`` must hold ``step`` and ``loss``."""
        if not self.enabled:
            return
        row = {key: float(value) if key != "step" else int(value) for key, value in metrics.items()}
        new = [key for key in row if key not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += [c for c in _FIRST_COLUMNS if c in new] + sorted(c for c in new if c not in _FIRST_COLUMNS)
            self._rewrite_csv()
        else:
            with open(self.csv_path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore").writerow(row)
        if self._writer is not None:
            for key, value in row.items():
                if key != "step":
                    self._writer.add_scalar(f"train/{key}", value, row["step"])
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row.get('lr', float('nan')):.3g}",
                                  img_s=f"{row.get('images_per_s', float('nan')):.1f}", refresh=False)
        if self._lines:
            print(self._progress_line(row), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """Print ``text`` to stderr without breaking the progress bar."""
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self, summary: dict) -> dict:
        """Close the bar and writer, write ``summary.json`` and ``loss_curves.png``, print the summary; returns it."""
        if not self.enabled:
            return summary
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()  # flushes
        atomic_write_json(self.output_dir / "summary.json", summary)
        if self.rows:
            self.plot(self.output_dir / "loss_curves.png")
        tqdm.write("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in summary.items()))
        return summary

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG of every loss column (``loss`` and the method's parts) and of the lr against step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [int(float(r["step"])) for r in self.rows]
        loss_columns = [c for c in self.columns if c == "loss" or (
            c not in _FIRST_COLUMNS and not c.startswith(("lr_", "weight_decay_", "grad_norm_")))]
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        for column in loss_columns:
            ax_loss.plot(steps, [_value(r, column) for r in self.rows], label=column,
                         linewidth=2 if column == "loss" else 1)
        for column in [c for c in self.columns if c == "lr" or c.startswith("lr_")]:
            ax_lr.plot(steps, [_value(r, column) for r in self.rows], label=column)
        ax_loss.set(ylabel="loss")
        ax_loss.legend(fontsize=8)
        ax_lr.set(ylabel="lr", xlabel="step")
        for ax in (ax_loss, ax_lr):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)
