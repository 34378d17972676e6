"""What a person watching a run reads: a progress line every few seconds, a final table.

The line (``step 350/1200 (29%)  12.1 steps/s  ETA 1m10s  loss 0.4312``) is
logged by a clu periodic action at most ``every_secs`` apart in wall time;
TensorBoard gets the same numbers through clu's ``ReportProgress``.
"""

from __future__ import annotations

import logging as std_logging
import time
from collections.abc import Callable, Mapping

from absl import logging
from clu import periodic_actions


# Libraries whose INFO lines say nothing a user acts on (each checkpoint save logs a dozen).
_QUIET_BELOW_WARNING = ("/orbax/", "/clu/metric_writers/", "/clu/platform/")


class _LibraryInfoFilter(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in _QUIET_BELOW_WARNING)


def quiet_library_logs() -> None:
  """Drops the INFO lines of orbax and clu (writers, work-unit notes) from absl's log.

  Their warnings and errors still show.
  """
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def format_seconds(seconds: float) -> str:
  """3725 -> '1h02m05s', 70 -> '1m10s', 4.2 -> '4.2s'."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class ProgressLine(periodic_actions.PeriodicCallback):
  """Logs step, steps/s, ETA and the current training loss every `every_secs` seconds.

  And at the last step. Steps/s is measured since the previous line.

  `current_loss` is called only when a line is due (it may synchronise with
  the device).
  """

  def __init__(self, *, num_train_steps: int, start_step: int,
               current_loss: Callable[[], float | None], every_secs: float = 30.0):
    self._total = num_train_steps
    self._last = (start_step, time.monotonic())
    self._current_loss = current_loss
    super().__init__(every_secs=every_secs, on_steps=[num_train_steps], callback_fn=self._log)

  def _log(self, step: int, t: float) -> None:
    del t
    previous_step, previous_time = self._last
    now = time.monotonic()
    rate = (step - previous_step) / max(now - previous_time, 1e-9)
    self._last = (step, now)
    eta = format_seconds((self._total - step) / rate) if rate > 0 else "?"
    loss = self._current_loss()
    loss_text = "" if loss is None else f"  loss {loss:.4f}"
    logging.info("step %d/%d (%d%%)  %.2f steps/s  ETA %s%s", step, self._total,
                 100 * step // self._total, rate, eta, loss_text)


def metrics_table(values: Mapping[str, float]) -> str:
  """A two-column plain-text table of final metrics, one per line."""
  width = max(len(k) for k in values)
  lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
  for key, value in values.items():
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    lines.append(f"{key.ljust(width)}  {shown}")
  return "\n".join(lines)
