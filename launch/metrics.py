"""Peak FLOP/s for MFU, and the run's logging: progress line and bar, metrics.jsonl, TensorBoard, plot.

MFU = flops_per_token * tokens_per_second / peak. On NVIDIA GPUs the peak is the dense BF16
tensor-core rate of the device's datasheet (table below, matched by name). On a CPU there is no
datasheet rate that torch reaches, so a short matmul calibration measures it once (BF16 and FP32;
the faster counts, and the log says which), cached in a JSON file keyed by CPU, torch version and
thread count.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense BF16 tensor-core peaks (FLOP/s) from NVIDIA datasheets; the first matching name wins.
GPU_BF16_PEAKS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # FP16 (V100 has no BF16)
]


def gpu_peak_flops(name: str) -> float | None:
    for key, peak in GPU_BF16_PEAKS:
        if key.lower() in name.lower():
            return peak
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Operand layouts of a square matmul. Without AMX, oneDNN's BF16 kernels differ by 10x or more
# between them (A @ B can run at well under 1 GFLOP/s while A^T @ B is fast).
MATMUL_LAYOUTS = {"A@B": lambda a, b: a @ b, "A@B^T": lambda a, b: a @ b.t(), "A^T@B": lambda a, b: a.t() @ b}


def matmul_rates(dtype: torch.dtype, n: int, seconds: float) -> dict[str, float]:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` per layout of MATMUL_LAYOUTS, over about
    ``seconds`` each (0: one timed call after a warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return {name: matmul_rate(mm, a, b, seconds) for name, mm in MATMUL_LAYOUTS.items()}


def fastest_matmul(dtype: torch.dtype, seconds: float = 0.05):
    """``mm(a, b)`` in the layout this CPU runs fastest in ``dtype`` (a 256^3 probe picks it), so
    that a peak is what the machine can do and a slow layout does not cost seconds per call."""
    rates = matmul_rates(dtype, 256, seconds)
    return MATMUL_LAYOUTS[max(rates, key=rates.get)]


def measure_matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` over about ``seconds``, in the fastest layout."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return matmul_rate(fastest_matmul(dtype), a, b, seconds)


def matmul_rate(mm, a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """Best FLOP/s of ``mm(a, b)`` (square operands) over about ``seconds``, after a warm-up."""
    n = a.shape[0]
    mm(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        if time.perf_counter() > deadline:
            return best


def cpu_peak_flops(cache: str | Path | None) -> tuple[float, str]:
    """(peak FLOP/s, description) of this CPU: the faster of BF16 and FP32 matmul, cached."""
    key = f"{_cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    path = Path(cache) if cache else None
    if path is not None and path.exists():
        try:
            entry = json.loads(path.read_text()).get(key)
            if entry:
                return float(entry["peak"]), entry["what"]
        except (OSError, json.JSONDecodeError, KeyError, ValueError):
            pass
    bf16 = measure_matmul_flops(torch.bfloat16)
    fp32 = measure_matmul_flops(torch.float32)
    dtype, peak = ("bf16", bf16) if bf16 >= fp32 else ("fp32", fp32)
    what = (f"CPU {dtype} matmul peak {peak / 1e9:.1f} GFLOP/s measured (bf16 {bf16 / 1e9:.1f}, "
            f"fp32 {fp32 / 1e9:.1f}; {torch.get_num_threads()} threads)")
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(path.read_text()) if path.exists() else {}
            data[key] = {"peak": peak, "what": what}
            path.write_text(json.dumps(data, indent=1))
        except (OSError, json.JSONDecodeError):
            pass
    return peak, what


def device_peak_flops(device: torch.device, cache: str | Path | None) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:
            return math.nan, f"{name}: no datasheet peak in the table, MFU not reported"
        return peak, f"{name} dense BF16 peak {peak / 1e12:.0f} TFLOP/s (datasheet)"
    return cpu_peak_flops(cache)


class GpuStats:
    """Memory, utilisation and power of this rank's GPU through nvidia-ml-py (empty on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # nvml missing or unusable: stats are optional
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        n = self._nvml
        try:
            util = n.nvmlDeviceGetUtilizationRates(self.handle)
            return {"gpu_util": float(util.gpu), "gpu_power_w": n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
                    "gpu_mem_gib": n.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30}
        except Exception:
            return {}


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:
        return math.nan


class RunLogger:
    """Rank 0's outputs: progress line + bar, metrics.jsonl, TensorBoard, loss-curve PNG."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, log_interval: int,
                 tensorboard: bool, progress_bar: bool) -> None:
        self.run_dir = run_dir
        self.total = total_steps
        self.log_interval = max(1, log_interval)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        self.bar = None
        if progress_bar and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass
        self.t_start = time.perf_counter()
        self.start_step = start_step

    def log(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / max(done, 1) * (self.total - step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", mfu=f"{100 * rec.get('mfu', 0):.2f}%")
        if step % self.log_interval == 0 or step == self.total:
            line = (f"step {step:6d}/{self.total} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
                    f"grad norm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | "
                    f"MFU {100 * rec['mfu']:.2f}% | expert load max/mean {rec.get('expert_load_max_mean', math.nan):.2f} | "
                    f"mem {rec.get('mem_gib', math.nan):.2f} GiB | ETA {eta / 60:.1f} min")
            if rec.get("skipped"):
                line += " | SKIPPED (non-finite)"
            self._print(line)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def plot_loss(metrics_path: Path, out: Path) -> bool:
    """Loss curve PNG from metrics.jsonl; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps, losses = [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if math.isfinite(rec.get("loss", math.nan)):
            steps.append(rec["step"])
            losses.append(rec["loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(out.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True
