"""What a run reports: console lines, ``metrics.jsonl``, TensorBoard events, Weights & Biases, and MFU.

``metrics.jsonl`` holds one JSON object per line: training records (``"kind": "train"``, with ``step``,
``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``tflops``, ``mfu`` ...) and evaluation records
(``"kind": "eval"``, with ``split``, ``loss``, ``ppl`` or ``bpc``, ``tokens``).  Only the first rank writes.

MFU = achieved model FLOP/s / peak FLOP/s.  The achieved figure comes from the model's analytic FLOP count
(``model.flops``: what the code computes, memory-extended attention included), times 3 for forward + backward
(4 with activation recomputation, reported separately as hardware FLOPs).  Peak: a table of dense bf16 / fp32
tensor rates for known GPUs; on a CPU it is measured once with an fp32 matrix product (so CPU MFU is relative
to what torch's GEMM reaches on this machine, and says so).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Optional

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


def format_console(rec: Dict[str, Any]) -> str:
    """One line: ``step 120/1000 | loss 2.3456 | lr 2.50e-04 | gnorm 0.81 | 9.9k tok/s | ...``."""
    parts = [f"step {rec['step']}/{rec.get('total', '?')}"]
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    if "lr" in rec:
        parts.append(f"lr {rec['lr']:.2e}")
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.3f}")
    if "tokens_per_s" in rec:
        parts.append(f"{rec['tokens_per_s'] / 1000:.1f}k tok/s")
    if "tflops" in rec:
        parts.append(f"{rec['tflops']:.3f} TFLOP/s")
    if "mfu" in rec:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if "peak_mem_gb" in rec:
        parts.append(f"mem {rec['peak_mem_gb']:.2f} GB")
    if rec.get("skipped"):
        parts.append(f"skipped {rec['skipped']}")
    return " | ".join(parts)


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
        self._jsonl.write(json.dumps(clean) + "\n")
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
