"""The one training loop: LoRA training and SwiftKV distillation both run it.

Why one: resuming (optimizer moments, RNG, step counter, history), the warm-up + cosine schedule, gradient
accumulation, clipping, the time limit and the checkpoint cadence used to be written twice and drifted. A job now
supplies only what differs: the trainable parameters, a loss per item, and how its checkpoint is written.

A run is resumable: the data order is a function of the step (item ``step * accumulate + j``), so a run that stops
at a checkpoint and is restarted with the same settings takes the same steps as one that never stopped.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

Item = TypeVar("Item")
RECENT = 20  # steps the progress bar averages its metrics over (one step's loss is noise)


@dataclass
class LoopSettings:
    """The settings the loop reads; each job declares its own defaults for them and adds its own fields."""

    out: str  # run folder: checkpoint, logs, results; rerunning with the same folder resumes
    steps: int  # optimizer steps in total: a resumed run continues the count
    lr: float  # peak learning rate, reached after the warm-up
    warmup: int  # linear warm-up steps; then a half cosine down to lr * LR_FLOOR at ``steps``
    checkpoint_every: int  # steps between checkpoints: at most this many steps are lost to a kill
    model: str | None = None  # base model (default: the packaged SmolLM2)
    max_minutes: float = 55.0  # stop and save after this long (each job says whether resumed runs add up)
    seed: int = 0  # data order and initialisation

    LR_FLOOR: ClassVar[float] = 0.0  # share of the peak rate the cosine ends at


def learning_rate(step: int, peak: float, warmup: int, steps: int, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then a half cosine from ``peak`` to ``floor * peak`` at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def seed_everything(seed: int) -> None:
    """Python's and torch's global generators (dropout, initialisation); data order uses its own seeded RNG."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def adamw(params: Sequence[Any], lr: float) -> Any:
    """The optimizer both jobs use (no weight decay: LoRA and SwiftKV parameters start at the model's values)."""
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


@dataclass
class LoopState:
    """Where a run is: the next step, one record per finished step, and the minutes of earlier runs that count
    against the time limit (0 when each run has its own limit)."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    minutes_before: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def minutes(self) -> float:
        return self.minutes_before + (time.monotonic() - self.started) / 60

    def snapshot(self, optimizer: Any) -> dict[str, Any]:
        """The part of a checkpoint every job writes: optimizer moments, step, and both RNG states."""
        import torch

        return {"optimizer": optimizer.state_dict(), "step": self.step, "rng": torch.get_rng_state(),
                "py_rng": random.getstate()}

    def restore(self, optimizer: Any, saved: Mapping[str, Any]) -> None:
        """Continue from :meth:`snapshot`'s content (checkpoints written before ``py_rng`` was saved lack it)."""
        import torch

        optimizer.load_state_dict(saved["optimizer"])
        self.step = saved["step"]
        torch.set_rng_state(saved["rng"])
        if "py_rng" in saved:
            random.setstate(saved["py_rng"])


def run(settings: LoopSettings, state: LoopState, optimizer: Any, items: Sequence[Item],
        item_loss: Callable[[Item], tuple[Any, Mapping[str, Any]]], checkpoint: Callable[[bool], None], *,
        accumulate: int, autocast: bool, desc: str, progress: bool = True,
        on_step: Callable[[dict[str, float]], None] | None = None) -> str:
    """Optimise until ``settings.steps`` or the time limit; returns why it stopped: ``"steps"`` or ``"time limit"``.

    ``item_loss(item)`` -> (loss tensor, metrics to log); each step averages the metrics over its ``accumulate``
    items into ``state.history`` as ``{"step", **metrics, "minutes"}``, then calls ``on_step`` with that record.
    ``checkpoint(final)`` runs every ``settings.checkpoint_every`` steps (``final`` False) and once at the end
    (``final``: the planned steps are done)."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    floor = type(settings).LR_FLOOR
    state.started = time.monotonic()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=state.step, desc=desc, unit="step")
    stopped = "steps"
    while state.step < settings.steps:
        if state.minutes() >= settings.max_minutes:
            stopped = "time limit"
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state.step, settings.lr, settings.warmup, settings.steps, floor)
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for j in range(accumulate):
            item = items[(state.step * accumulate + j) % len(items)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, metrics = item_loss(item)
            (loss / accumulate).backward()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach() if hasattr(value, "detach") else value)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state.step += 1
        record = {"step": state.step, **{k: v / accumulate for k, v in sums.items()},
                  "minutes": round(state.minutes(), 3)}
        state.history.append(record)
        if on_step is not None:
            on_step(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{recent_mean(state.history, k):.3f}" for k in sums})
        if state.step % settings.checkpoint_every == 0 and state.step < settings.steps:
            checkpoint(False)
    if bar is not None:
        bar.close()
    checkpoint(state.step >= settings.steps)
    return stopped


def recent_mean(history: Sequence[Mapping[str, float]], key: str, last: int = RECENT) -> float:
    """Mean of ``key`` over the last ``last`` records (0 for none): what summaries and the progress bar show."""
    recent = [h[key] for h in history[-last:]]
    return sum(recent) / max(1, len(recent))
