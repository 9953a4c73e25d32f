"""Metric tracking: metrics.jsonl, the console (a tqdm bar), and optionally wandb. Rank 0 only.

metrics.jsonl (contract): training lines carry step, loss, lr, tokens, tok_per_s (plus
grad_norm, mfu, peak_mem_mb); evaluation lines carry step, val_loss, val_ppl. The tracker owns
the logging cadence (`train.log_every`), so the loop calls `log_step` after every step.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any, Dict, List

from tqdm.auto import tqdm

from tinyllama.config import LoggerConfig

WANDB_ID_FILE = "wandb_id.txt"


class Tracker:
    """Writes metrics for one run. On ranks other than 0 every method is a no-op.

    run_dir: the run folder; start_step: 0, or the step a resumed run continues from (lines
    after it, written before the interruption, are dropped so the file reads as one run).
    """

    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        logger: LoggerConfig,
        log_every: int,
        max_steps: int,
        start_step: int,
        config: Dict[str, Any],
    ) -> None:
        self.is_main = is_main
        self.log_every, self.max_steps = log_every, max_steps
        self._window: List[float] = []
        self._wandb = None
        self._bar = None
        if not is_main:
            return
        self.path = run_dir / "metrics.jsonl"
        if start_step > 0:
            self._truncate_after(start_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run never mixes its lines with an old one's
        self._file = self.path.open("a", encoding="utf-8")
        self._bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if logger.name == "wandb":
            self._wandb = _start_wandb(run_dir, logger, config)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def _write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def print(self, text: str) -> None:
        """A console line that does not break the progress bar (rank 0 only)."""
        if self.is_main:
            tqdm.write(text)

    def log_step(self, step: int, loss: float) -> bool:
        """Record the loss of optimizer step `step` (1-based) and advance the bar. Returns True
        every log_every steps and at the last step: the caller then measures throughput and
        calls `write_step`."""
        self._window.append(loss)
        if self._bar is not None:
            self._bar.update(1)
        return step % self.log_every == 0 or step == self.max_steps

    @property
    def pending(self) -> bool:
        """True when steps were recorded since the last training line (a run stopped early)."""
        return bool(self._window)

    def write_step(self, step: int, lr: float, tokens: int, perf: Dict[str, float], **extra: float) -> None:
        """Write the training line for the window that ends at `step` (see log_step)."""
        loss = sum(self._window) / max(1, len(self._window))
        self._window.clear()
        if not self.is_main:
            return
        record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, **perf, **extra}
        self._write(record)
        self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{perf['tok_per_s']:.0f}")

    def log_eval(self, step: int, val_loss: float) -> None:
        if not self.is_main:
            return
        ppl = math.exp(min(val_loss, 700.0))
        self._write({"step": step, "val_loss": val_loss, "val_ppl": ppl})
        self.print(f"step {step}: val_loss {val_loss:.4f} (ppl {ppl:.2f})")

    def end_progress(self) -> None:
        """Close the progress bar (training is over; what follows prints plain lines)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self, values: Dict[str, Any]) -> None:
        """Final figures: printed, and set as the wandb run summary."""
        if not self.is_main:
            return
        self.end_progress()
        for key, value in values.items():
            self.print(f"  {key:<16} {value:.4g}" if isinstance(value, float) else f"  {key:<16} {value}")
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        if not self.is_main:
            return
        self.end_progress()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, logger: LoggerConfig, config: Dict[str, Any]):
    """wandb.init with the run id kept in the run folder, so a resumed run continues the same
    wandb run (resume="allow") instead of starting a new one."""
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=logger.project,
        group=logger.group,
        tags=list(logger.tags) or None,
        mode=logger.mode,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        name=logger.run_name or run_dir.name,
        config=config,
    )
