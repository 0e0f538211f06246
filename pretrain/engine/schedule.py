"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay.

The rate is a pure function of the optimizer step, so a resumed run gets exactly the rates of an
uninterrupted one; the scheduler's state is just that step.  ``LRScheduler`` follows torch's scheduler
protocol (``step()``, ``get_last_lr()``, ``state_dict()``, ``load_state_dict()``), which DeepSpeed calls
after every optimizer step and saves in its checkpoints.
"""
from __future__ import annotations

import math
from typing import List

STYLES = ("cosine", "linear", "constant", "wsd")


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, style: str,
          wsd_decay: float = 0.1, wsd_shape: str = "linear") -> float:
    """Rate for optimizer step ``step`` (0-based: the rate used by the ``step``-th update).

    warmup: linear from lr/warmup to lr over the first ``warmup`` steps (none if 0).
    cosine / linear: from lr at the end of warmup down to min_lr at ``total``, min_lr afterwards.
    constant: lr after warmup.
    wsd (warmup-stable-decay): lr until the last ``wsd_decay`` fraction of ``total``, then down to min_lr
    (``wsd_shape`` linear, cosine or 1-sqrt).
    """
    if style not in STYLES:
        raise ValueError(f"unknown schedule {style!r} (choose from {', '.join(STYLES)})")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if style == "constant":
        return lr
    if style == "wsd":
        decay_steps = max(1, int(round(wsd_decay * total)))
        start = total - decay_steps
        if step < start:
            return lr
        frac = min(1.0, (step - start) / decay_steps)
        if wsd_shape == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * frac))
        elif wsd_shape == "1-sqrt":
            f = 1 - math.sqrt(frac)
        else:
            f = 1 - frac
        return min_lr + (lr - min_lr) * f
    span = max(1, total - warmup)
    frac = min(1.0, max(0.0, (step - warmup) / span))
    f = 0.5 * (1 + math.cos(math.pi * frac)) if style == "cosine" else 1 - frac
    return min_lr + (lr - min_lr) * f


class LRScheduler:
    """Sets every param group's ``lr`` to ``lr_at(step)``; ``step()`` advances after an optimizer update."""

    def __init__(self, optimizer, *, lr: float, min_lr: float, warmup: int, total: int, style: str,
                 wsd_decay: float = 0.1, wsd_shape: str = "linear", last_step: int = 0):
        self.optimizer = optimizer
        self.kw = dict(lr=lr, min_lr=min_lr, warmup=warmup, total=total, style=style,
                       wsd_decay=wsd_decay, wsd_shape=wsd_shape)
        lr_at(0, **self.kw)  # validates the style
        self.last_step = last_step
        self._apply()

    def _apply(self) -> None:
        value = lr_at(self.last_step, **self.kw)
        for g in self.optimizer.param_groups:
            g["lr"] = value * g.get("lr_scale", 1.0)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, increment: int = 1) -> None:
        self.last_step += increment
        self._apply()

    def get_last_lr(self) -> List[float]:
        return list(self._last_lr)

    def get_lr(self) -> List[float]:
        return self.get_last_lr()

    def state_dict(self):
        return {"last_step": self.last_step, **self.kw}

    def load_state_dict(self, sd) -> None:
        self.last_step = int(sd["last_step"])
        self._apply()
