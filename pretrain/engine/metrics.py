"""What a run reports: console lines, ``metrics.jsonl``, TensorBoard events, Weights & Biases, and MFU.

``metrics.jsonl`` holds one JSON object per line: training records (``"kind": "train"``, with ``step``,
``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``tflops``, ``mfu`` ...) and evaluation records
(``"kind": "eval"``, with ``split``, ``loss``, ``ppl`` or ``bpc``, ``tokens``).  Only the first rank writes.

MFU = achieved model FLOP/s / peak FLOP/s.  The achieved figure comes from the model's analytic FLOP count
(``model.flops``: what the code computes, memory-extended attention included), times 3 for forward + backward
(4 with activation recomputation, reported separately as hardware FLOPs).  Peak: a table of dense bf16 / fp32
tensor rates for known GPUs; on a CPU it is measured once with an fp32 matrix product (so CPU MFU is relative
to what torch's GEMM reaches on this machine, and says so).

Progress (``Progress``): on a terminal a tqdm bar with the ETA; anywhere else (a Slurm log, a pipe, a file) a
plain line every ``every_seconds`` seconds and/or ``every_steps`` steps, with the rate and the ETA, so a log file
holds a few readable lines instead of a bar redrawn with carriage returns several times a second.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional, TextIO

import torch

# Dense (no sparsity) peak TFLOP/s per GPU: (bf16/fp16 tensor, tf32 tensor, fp32 non-tensor).
_GPU_PEAKS = {
    "H200": (989.0, 494.0, 67.0),
    "H100 SXM": (989.0, 494.0, 67.0),
    "H100 NVL": (835.0, 418.0, 60.0),
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100": (989.0, 494.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "A10G": (70.0, 35.0, 31.2),
    "L40S": (362.0, 183.0, 91.6),
    "L4": (121.0, 60.0, 30.3),
    "V100": (125.0, 15.7, 15.7),
}


def gpu_peak_tflops(dtype: torch.dtype) -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (half, tf32, fp32) in _GPU_PEAKS.items():
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def measure_cpu_peak_tflops(dtype: torch.dtype = torch.float32, seconds: float = 0.5, n: int = 1024) -> float:
    """FLOP/s of a square matrix product on this CPU with torch's current thread count."""
    g = torch.Generator().manual_seed(0)  # private: the training generators stay untouched
    a = torch.randn(n, n, dtype=dtype, generator=g)
    b = torch.randn(n, n, dtype=dtype, generator=g)
    torch.mm(a, b)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    return 2.0 * n ** 3 * reps / dt / 1e12


def peak_tflops(dtype: torch.dtype, configured: float = 0.0) -> tuple:
    """(peak TFLOP/s, where it came from)."""
    if configured and configured > 0:
        return configured, "configured"
    p = gpu_peak_tflops(dtype)
    if p is not None:
        return p, f"datasheet {torch.cuda.get_device_name()}"
    # CPUs: the fp32 GEMM rate, whatever the training dtype (without AMX, bf16 GEMMs run 10-100x slower than
    # fp32 in torch, so fp32 is this machine's practical ceiling)
    return measure_cpu_peak_tflops(torch.float32), "measured fp32 CPU GEMM"


# The record fields of a console line after the loss, in order: (key, its text).
_CONSOLE_FIELDS = (
    ("lr", lambda v: f"lr {v:.2e}"),
    ("grad_norm", lambda v: f"gnorm {v:.3f}"),
    ("tokens_per_s", lambda v: f"{v / 1000:.1f}k tok/s"),
    ("tflops", lambda v: f"{v:.3f} TFLOP/s"),
    ("mfu", lambda v: f"MFU {100 * v:.1f}%"),
    ("aux_loss", lambda v: f"aux {v:.4f}"),
    ("peak_mem_gb", lambda v: f"mem {v:.2f} GB"),
)


def format_console(rec: Dict[str, Any]) -> str:
    """One line: ``step 120/1000 | loss 2.3456 | lr 2.50e-04 | gnorm 0.81 | 9.9k tok/s | ...``."""
    parts = [f"step {rec['step']}/{rec.get('total', '?')}"]
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    elif rec.get("scored") == 0 and not rec.get("skipped"):
        parts.append("no scored tokens")
    for key, text in _CONSOLE_FIELDS:
        if rec.get(key) is not None:
            parts.append(text(rec[key]))
    if rec.get("skipped"):
        parts.append(f"skipped {rec['skipped']}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (or ``M:SS`` under an hour); ``?`` for an unknown duration."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Progress of a loop of ``total`` steps, starting at ``initial``.

    On a terminal (``file.isatty()``, or ``tty=True``) a tqdm bar (redrawn at most once a second).  Elsewhere a
    line ``DESC: step 120/1000 (12.0%) | 2.31 steps/s | elapsed 0:52 | ETA 6:21 | loss 2.3456`` whenever
    ``every_seconds`` have passed since the last line or ``every_steps`` steps were done since it (either may be
    0 = not used; with both 0, only the final line), and one at ``close()`` when steps were done since the
    last.  The rate counts the steps of this process (a resumed run's ETA does not include the steps done before
    it).
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "train", file: Optional[TextIO] = None,
                 every_seconds: float = 60.0, every_steps: int = 0, tty: Optional[bool] = None,
                 clock=time.monotonic):
        self.total, self.n, self.start_n = int(total), int(initial), int(initial)
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.every_seconds, self.every_steps = float(every_seconds), int(every_steps)
        self.clock = clock
        self.t0 = self.last_t = clock()
        self.last_n = self.n
        self.postfix: Dict[str, str] = {}
        if tty is None:
            isatty = getattr(self.file, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.bar = None
        if tty:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit="step", dynamic_ncols=True,
                            file=self.file, mininterval=1.0)
        self.lines = 0

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more steps done; ``postfix`` (name=value) is shown with the bar or the next line."""
        self.n += n
        if postfix:
            self.postfix = {k: str(v) for k, v in postfix.items()}
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        due_t = self.every_seconds > 0 and now - self.last_t >= self.every_seconds
        due_n = self.every_steps > 0 and self.n - self.last_n >= self.every_steps
        if due_t or due_n:
            self._line(now)

    def line(self) -> str:
        """The progress line for the current state (what a non-terminal gets)."""
        now = self.clock()
        done = self.n - self.start_n
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        eta = (self.total - self.n) / rate if rate else None
        pct = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"{self.desc}: step {self.n}/{self.total} ({pct:.1f}%)",
                 f"{rate:.3g} steps/s" if rate else "? steps/s", f"elapsed {format_duration(elapsed)}",
                 f"ETA {format_duration(eta) if self.n < self.total else '0:00'}"]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return " | ".join(parts)

    def _line(self, now: float) -> None:
        print(self.line(), file=self.file, flush=True)
        self.lines += 1
        self.last_t, self.last_n = now, self.n

    def write(self, msg: str, file: Optional[TextIO] = None) -> None:
        """Print ``msg`` as a line of its own (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(msg, file=file or sys.stdout)
        else:
            print(msg, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.n != self.last_n:
            self._line(self.clock())


def peak_memory_gb() -> float:
    """Peak device memory (GPU) or peak resident set size (CPU) of this process, in GB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class MetricsWriter:
    """Writes records to metrics.jsonl, TensorBoard and wandb (each optional); rank 0 only."""

    def __init__(self, run_dir: Optional[str], enabled: bool, tensorboard: bool = True,
                 wandb_cfg: Optional[Dict[str, Any]] = None, config: Optional[Dict[str, Any]] = None):
        self.enabled = enabled and run_dir is not None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                print("metrics: tensorboard not installed; no event files", flush=True)
        if wandb_cfg and wandb_cfg.get("enabled"):
            os.environ.setdefault("WANDB_MODE", wandb_cfg.get("mode") or "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb
            self._wandb = wandb.init(project=wandb_cfg.get("project") or "memtrain",
                                     name=wandb_cfg.get("name") or None,
                                     dir=run_dir, config=config or {}, reinit=True)

    def write(self, rec: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        try:
            self._jsonl.write(json.dumps(clean) + "\n")
        except OSError as e:  # a full disk: name the file (a line-buffered write error carries no file name)
            raise OSError(e.errno, e.strerror, self._jsonl.name) from None
        step = rec.get("step", 0)
        prefix = rec.get("kind", "train") if rec.get("kind") != "eval" else f"eval/{rec.get('split', 'valid')}"
        for k, v in rec.items():
            if k in ("step", "kind", "split", "total") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in clean.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"},
                            step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
