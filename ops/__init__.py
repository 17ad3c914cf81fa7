"""The Python face of csrc/: FP8 kernels registered with torch.library (namespace ``dsv3``),
argument checks, and float64/eager references.

One call runs on the CPU or CUDA kernel by the tensors' device.
"""

from ops._native import built_with_cuda, cpu_isa, detected_cpu_isa, set_cpu_isa
from ops.diff import calc_diff
from ops.gemm import (
    PackedFP8Weight,
    fp8_gemm_nn,
    fp8_gemm_nt,
    fp8_gemm_tn,
    fp8_gemm_tt,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    grouped_transposed_per_token_cast_to_fp8,
    k_grouped_fp8_gemm_nt_contiguous,
    k_grouped_fp8_gemm_tn_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    prepack_fp8_weight,
)
from ops.linear import fp8_linear, grouped_fp8_linear
from ops.quant import per_block_cast_to_fp8, per_token_cast_to_fp8, transposed_per_token_cast_to_fp8

__all__ = [
    "PackedFP8Weight",
    "built_with_cuda",
    "calc_diff",
    "cpu_isa",
    "detected_cpu_isa",
    "fp8_gemm_nn",
    "fp8_gemm_nt",
    "fp8_gemm_tn",
    "fp8_gemm_tt",
    "fp8_linear",
    "get_m_alignment_for_contiguous_layout",
    "get_mk_alignment_for_contiguous_layout",
    "grouped_fp8_linear",
    "grouped_transposed_per_token_cast_to_fp8",
    "k_grouped_fp8_gemm_nt_contiguous",
    "k_grouped_fp8_gemm_tn_contiguous",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "per_block_cast_to_fp8",
    "per_token_cast_to_fp8",
    "prepack_fp8_weight",
    "set_cpu_isa",
    "transposed_per_token_cast_to_fp8",
]
