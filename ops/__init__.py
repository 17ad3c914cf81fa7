"""The Python face of csrc/: FP8 kernels registered with torch.library (namespace ``dsv3``),
argument checks, and float64/eager references.

One call runs on the CPU or CUDA kernel by the tensors' device.
"""

from ops._native import built_with_cuda, cpu_isa, detected_cpu_isa, set_cpu_isa
from ops.diff import calc_diff
from ops.quant import per_block_cast_to_fp8, per_token_cast_to_fp8, transposed_per_token_cast_to_fp8

__all__ = [
    "built_with_cuda",
    "calc_diff",
    "cpu_isa",
    "detected_cpu_isa",
    "per_block_cast_to_fp8",
    "per_token_cast_to_fp8",
    "set_cpu_isa",
    "transposed_per_token_cast_to_fp8",
]
