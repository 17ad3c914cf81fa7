"""FP8 GEMMs with DeepSeek-V3's fine-grained scaling, under DeepGEMM's names and argument order.

Operands are ``(payload, scales)`` tuples: payloads float8_e4m3fn, row-major and contiguous;
scales float32 with any strides (made contiguous here). With kb(K) = ceil(K / 128):

* LHS ``(a [M, K], sa [M, kb(K)])``: 1x128 tiles (``ops.per_token_cast_to_fp8``).
* RHS ``(b [N, K], sb)``: ``sb`` is either ``[ceil(N/128), kb(K)]`` (128x128 blocks,
  ``ops.per_block_cast_to_fp8``) or ``[N, kb(K)]`` (1x128 tiles per row, e.g. the weight-gradient
  operand from ``ops.transposed_per_token_cast_to_fp8``).

Every product is accumulated as DeepSeek-V3 does: each 128-wide K block's partial dot product
is formed in FP32 and added to an FP32 accumulator multiplied by its two scales ("promotion");
the result (plus C) is rounded once to ``d``'s dtype. Any M, N and K work (K % 128 != 0
included). All functions check their arguments here, before native code, and raise
TypeError/ValueError/RuntimeError naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ops._native import built_with_cuda, native
from ops.checks import check_contiguous, check_dim, check_dtype, check_same_device, check_tensor

__all__ = [
    "PackedFP8Weight",
    "fp8_gemm_nn",
    "fp8_gemm_nt",
    "fp8_gemm_tn",
    "fp8_gemm_tt",
    "get_m_alignment_for_contiguous_layout",
    "get_mk_alignment_for_contiguous_layout",
    "grouped_transposed_per_token_cast_to_fp8",
    "k_grouped_fp8_gemm_nt_contiguous",
    "k_grouped_fp8_gemm_tn_contiguous",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "prepack_fp8_weight",
]

BLOCK = 128
FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.bfloat16, torch.float32)


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda" and not built_with_cuda():
        raise RuntimeError(f"{name} is on {t.device} but ops._C was built without CUDA kernels")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{name} must be on a CPU or CUDA device, got {t.device}")


def _unpack(name: str, pair: object) -> tuple[object, object]:
    if isinstance(pair, PackedFP8Weight):
        raise TypeError(
            f"{name}: a PackedFP8Weight is accepted only as the b of fp8_gemm_nt and of the m-grouped GEMMs; "
            "pass its (b, sb) here"
        )
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a (payload, scales) tuple, got {type(pair).__name__}")
    return pair[0], pair[1]


def _operand(name: str, pair: object, dims: int) -> tuple[torch.Tensor, object]:
    """A checked (FP8 payload, unchecked scales) operand tuple; scales are checked per op."""
    payload, scales = _unpack(name, pair)
    return _payload(name, payload, dims), scales


def _payload(name: str, t: object, dims: int) -> torch.Tensor:
    t = check_tensor(name, t)
    check_dtype(name, t, (FP8,))
    check_dim(name, t, dims)
    check_contiguous(name, t)
    _check_device(name, t)
    return t


def _scales(name: str, s: object, shapes: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """Float32 scales of one of the given shapes, returned contiguous (any strides accepted)."""
    s = check_tensor(name, s)
    check_dtype(name, s, (torch.float32,))
    if tuple(s.shape) not in [tuple(x) for x in shapes]:
        expected = " or ".join(str(list(x)) for x in dict.fromkeys(tuple(x) for x in shapes))
        raise ValueError(f"{name} must have shape {expected}, got {list(s.shape)}")
    _check_device(name, s)
    return s.contiguous()


def _rhs_scale_shapes(lead: tuple[int, ...], n: int, kb: int) -> list[tuple[int, ...]]:
    """128x128 blocks, or 1x128 tiles per row (the same shape when N == 1)."""
    return [(*lead, _cdiv(n, BLOCK), kb), (*lead, n, kb)]


def _output(name: str, d: object, shape: tuple[int, ...], f32_only: bool = False) -> torch.Tensor:
    d = check_tensor(name, d)
    check_dtype(name, d, (torch.float32,) if f32_only else OUT_DTYPES)
    if tuple(d.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(d.shape)}")
    check_contiguous(name, d)
    _check_device(name, d)
    return d


def _index_tensor(name: str, t: object, length: int) -> torch.Tensor:
    t = check_tensor(name, t)
    check_dtype(name, t, (torch.int32, torch.int64))
    check_dim(name, t, 1)
    if t.shape[0] != length:
        raise ValueError(f"{name} must have {length} elements, got {t.shape[0]}")
    _check_device(name, t)
    return t.to(torch.int32).contiguous()


def _check_k(a_name: str, ka: int, b_name: str, kb: int) -> None:
    if ka != kb:
        raise ValueError(f"K mismatch: {a_name} has K={ka} but {b_name} has K={kb}")


_PANEL_COLS = 16
"""Columns of B per panel of the CPU GEMM's packed layout (its micro-kernel's width)."""


@dataclass(frozen=True, eq=False)
class PackedFP8Weight:
    """An FP8 weight ``(b [N, K], sb)`` with B decoded once for the CPU GEMM
    (``prepack_fp8_weight``); ``fp8_gemm_nt`` accepts it in place of ``(b, sb)``. A grouped
    weight ``(b [G, N, K], sb [G, ...])`` (MoE experts) packs the same way, each group on its own,
    and ``m_grouped_fp8_gemm_nt_contiguous`` / ``m_grouped_fp8_gemm_nt_masked`` accept it in place
    of their ``(b, sb)``; ``num_groups`` tells the two kinds apart (None for a dense weight).

    Why: for M > 16 rows the CPU GEMM decodes B into fp32 panels (K-interleaved, _PANEL_COLS columns
    wide) on every call; for a 7168 x 7168 weight that is about 20 ms of one core, a third of a
    17-row GEMM and a fifth of a 64-row one (the MoE experts' few-token shapes). Packed, the
    panels are made once. The cost is memory: the panels hold 4 bytes per weight element next to
    the FP8 bytes, which the GEMV path (M <= 16) still streams (half the bytes of BF16).

    The panels are a snapshot of ``b``: changing ``b`` in place afterwards is detected (torch's
    version counter) and refused (inference tensors have no version counter: not checked);
    ``sb`` is read at every call (scales are applied at promotion, never folded into the panels),
    so it may be updated in place. CPU only: the CUDA kernels take ``(b, sb)``.

    Grouped weights: the GEMM of a group with more than 16 rows reads its panels; groups with
    fewer rows (decode-time expert batches) take the GEMV path, which streams ``b``'s FP8 bytes
    and gains nothing from packing.
    """

    b: torch.Tensor
    sb: torch.Tensor
    panels: torch.Tensor = field(repr=False)
    b_version: int | None = field(repr=False)  # None for an inference tensor

    @property
    def shape(self) -> torch.Size:
        """b's shape: [N, K], or [G, N, K] for a grouped weight."""
        return self.b.shape

    @property
    def num_groups(self) -> int | None:
        """G for a grouped weight packed from b [G, N, K]; None for a dense [N, K] one."""
        return self.b.shape[0] if self.b.dim() == 3 else None

    def __repr__(self) -> str:
        *g, n, k = self.b.shape
        groups = f"G={g[0]}, " if g else ""
        return f"PackedFP8Weight({groups}N={n}, K={k}, sb={list(self.sb.shape)}, device={self.b.device})"


def prepack_fp8_weight(b: tuple[torch.Tensor, torch.Tensor]) -> PackedFP8Weight:
    """Packs an FP8 weight once for repeated ``fp8_gemm_nt(a, packed, d)`` calls on the CPU.

    Also packs the grouped weight of MoE experts for repeated ``m_grouped_fp8_gemm_nt_contiguous``
    / ``m_grouped_fp8_gemm_nt_masked`` calls.

    Args:
        b: (b [N, K] e4m3 contiguous, sb [ceil(N/128), ceil(K/128)] or [N, ceil(K/128)] f32),
            or grouped: (b [G, N, K], sb [G, ceil(N/128), ceil(K/128)] or [G, N, ceil(K/128)]).

    Returns:
        A PackedFP8Weight (results are bit-identical to passing ``(b, sb)`` itself). Its panels
        take 4 bytes per weight element (e.g. 470 MB for 8 experts of 2048 x 7168).
    """
    payload, scales = _unpack("b", b)
    payload = check_tensor("b", payload)
    if payload.dim() not in (2, 3):
        raise ValueError(f"b must be [N, K] (dense) or [G, N, K] (grouped), got shape {list(payload.shape)}")
    b_ = _payload("b", payload, payload.dim())
    *lead, n, k = b_.shape
    sb = _scales("sb", scales, _rhs_scale_shapes(tuple(lead), n, _cdiv(k, BLOCK)))
    check_same_device(b=b_, sb=sb)
    if b_.device.type != "cpu":
        raise RuntimeError(f"prepack_fp8_weight packs for the CPU GEMM; b is on {b_.device} (pass (b, sb) on CUDA)")
    return PackedFP8Weight(b_, sb, native.fp8_prepack_b(b_), None if b_.is_inference() else b_._version)


def _packed_operand(op: str, b: PackedFP8Weight, a: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, sb) of a packed weight, after checking it fits `op` (dense or grouped), was not
    changed since packing, and is used with a CPU a (the panels exist only for the CPU kernels)."""
    grouped = op.startswith("m_grouped")
    if grouped != (b.num_groups is not None):
        raise ValueError(
            f"b: {op} needs a {'grouped [G, N, K]' if grouped else 'dense [N, K]'} PackedFP8Weight, got one "
            f"packed from b of shape {list(b.shape)}"
        )
    lhs = a[0] if isinstance(a, (tuple, list)) and a else None
    if isinstance(lhs, torch.Tensor) and lhs.device.type != "cpu":
        raise RuntimeError(
            f"b: a PackedFP8Weight is for the CPU kernels only (prepack_fp8_weight), but a is on {lhs.device}; "
            "pass (b, sb) there"
        )
    if b.b_version is not None and b.b._version != b.b_version:
        raise RuntimeError("b: the FP8 weight was modified in place after prepack_fp8_weight; pack it again")
    return b.b, b.sb


def fp8_gemm_nt(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor] | PackedFP8Weight,
    d: torch.Tensor,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """D = C + A @ B^T in FP8 with fine-grained scales.

    Args:
        a: (a [M, K] e4m3, sa [M, ceil(K/128)] f32).
        b: (b [N, K] e4m3, sb [ceil(N/128), ceil(K/128)] or [N, ceil(K/128)] f32), or a
            PackedFP8Weight from prepack_fp8_weight (CPU).
        d: output [M, N], bfloat16 or float32 (float32 when c is given), contiguous.
        c: optional [M, N] float32 added to the product; may be d itself (accumulate in place).

    Returns:
        d.
    """
    packed = b if isinstance(b, PackedFP8Weight) else None
    b = _packed_operand("fp8_gemm_nt", packed, a) if packed else b
    a_, sa = _operand("a", a, 2)
    b_, sb = _operand("b", b, 2)
    (m, k), n = a_.shape, b_.shape[0]
    _check_k("a", k, "b", b_.shape[1])
    kb = _cdiv(k, BLOCK)
    sa = _scales("sa", sa, [(m, kb)])
    sb = _scales("sb", sb, _rhs_scale_shapes((), n, kb))
    d = _output("d", d, (m, n), f32_only=c is not None)
    if c is not None:
        c = _output("c", c, (m, n), f32_only=True)
    check_same_device(a=a_, sa=sa, b=b_, sb=sb, c=c, d=d)
    if packed:
        native.fp8_gemm_nt_prepacked_out(a_, sa, b_, sb, packed.panels, c, d)
    else:
        native.fp8_gemm_nt_out(a_, sa, b_, sb, c, d)
    return d


def _t(name: str, pair: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A K-major operand given transposed ([K, rows]): its row-major copy, scales unchanged."""
    x, s = _unpack(name, pair)
    x = check_tensor(name, x)
    check_dim(name, x, 2)
    return x.t().contiguous(), s


def fp8_gemm_nn(a, b, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """D = C + A @ B with b given as [K, N] (scales as for fp8_gemm_nt). Copies b to [N, K]."""
    return fp8_gemm_nt(a, _t("b", b), d, c)


def fp8_gemm_tn(a, b, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """D = C + A @ B^T with a given as [K, M] (scales as for fp8_gemm_nt). Copies a to [M, K]."""
    return fp8_gemm_nt(_t("a", a), b, d, c)


def fp8_gemm_tt(a, b, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """D = C + A @ B with a given as [K, M] and b as [K, N]. Copies both."""
    return fp8_gemm_nt(_t("a", a), _t("b", b), d, c)


def get_mk_alignment_for_contiguous_layout() -> int:
    """Rows each group segment of the m-grouped contiguous layout (and each K group of the
    k-grouped layout) should be padded to: 1 for the CPU kernels (any size works), 128 when the
    CUDA kernels are available (DeepGEMM's block size)."""
    return BLOCK if built_with_cuda() and torch.cuda.is_available() else 1


def get_m_alignment_for_contiguous_layout() -> int:
    """Older DeepGEMM name of get_mk_alignment_for_contiguous_layout."""
    return get_mk_alignment_for_contiguous_layout()


def m_grouped_fp8_gemm_nt_contiguous(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor] | PackedFP8Weight,
    d: torch.Tensor,
    m_indices: torch.Tensor,
) -> torch.Tensor:
    """Grouped GEMM over rows laid out contiguously by group (MoE experts after dispatch).

    Args:
        a: (a [M, K] e4m3, sa [M, ceil(K/128)] f32).
        b: (b [G, N, K] e4m3, sb [G, ceil(N/128), ceil(K/128)] (or [G, N, ceil(K/128)]) f32), or
            a grouped PackedFP8Weight from prepack_fp8_weight (CPU).
        d: output [M, N] bfloat16 or float32.
        m_indices: [M] int32 (int64 accepted): the group of each row, or -1 for padding rows,
            which are written as zeros.

    Returns:
        d, with d[m] = A[m] @ B[m_indices[m]]^T.
    """
    packed = b if isinstance(b, PackedFP8Weight) else None
    b = _packed_operand("m_grouped_fp8_gemm_nt_contiguous", packed, a) if packed else b
    a_, sa = _operand("a", a, 2)
    b_, sb = _operand("b", b, 3)
    (m, k), (g, n) = a_.shape, b_.shape[:2]
    _check_k("a", k, "b", b_.shape[2])
    kb = _cdiv(k, BLOCK)
    sa = _scales("sa", sa, [(m, kb)])
    sb = _scales("sb", sb, _rhs_scale_shapes((g,), n, kb))
    d = _output("d", d, (m, n))
    m_indices = _index_tensor("m_indices", m_indices, m)
    check_same_device(a=a_, sa=sa, b=b_, sb=sb, d=d, m_indices=m_indices)
    if m and bool(((m_indices < -1) | (m_indices >= g)).any()):
        bad = m_indices[(m_indices < -1) | (m_indices >= g)][0].item()
        raise ValueError(f"m_indices must be in [-1, {g}) (-1 marks padding rows), got {bad}")
    if packed:
        native.m_grouped_fp8_gemm_nt_contiguous_prepacked_out(a_, sa, b_, sb, packed.panels, m_indices, d)
    else:
        native.m_grouped_fp8_gemm_nt_contiguous_out(a_, sa, b_, sb, m_indices, d)
    return d


def m_grouped_fp8_gemm_nt_masked(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor] | PackedFP8Weight,
    d: torch.Tensor,
    masked_m: torch.Tensor,
    expected_m: int,
) -> torch.Tensor:
    """Grouped GEMM where group g uses only its first masked_m[g] rows (low-latency layout).

    Args:
        a: (a [G, Mmax, K] e4m3, sa [G, Mmax, ceil(K/128)] f32).
        b: (b [G, N, K] e4m3, sb [G, ceil(N/128), ceil(K/128)] (or [G, N, ceil(K/128)]) f32), or
            a grouped PackedFP8Weight from prepack_fp8_weight (CPU; used by groups > 16 rows).
        d: output [G, Mmax, N] bfloat16 or float32; rows at or past masked_m[g] are not touched.
        masked_m: [G] int32 (int64 accepted), each in [0, Mmax].
        expected_m: a hint of the typical masked_m (used for tile choice on CUDA), > 0.

    Returns:
        d.
    """
    packed = b if isinstance(b, PackedFP8Weight) else None
    b = _packed_operand("m_grouped_fp8_gemm_nt_masked", packed, a) if packed else b
    a_, sa = _operand("a", a, 3)
    b_, sb = _operand("b", b, 3)
    (g, mmax, k), n = a_.shape, b_.shape[1]
    if b_.shape[0] != g:
        raise ValueError(f"b must have G={g} groups like a, got shape {list(b_.shape)}")
    _check_k("a", k, "b", b_.shape[2])
    kb = _cdiv(k, BLOCK)
    sa = _scales("sa", sa, [(g, mmax, kb)])
    sb = _scales("sb", sb, _rhs_scale_shapes((g,), n, kb))
    d = _output("d", d, (g, mmax, n))
    masked_m = _index_tensor("masked_m", masked_m, g)
    if isinstance(expected_m, bool) or not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"expected_m must be a non-negative int, got {expected_m!r}")
    check_same_device(a=a_, sa=sa, b=b_, sb=sb, d=d, masked_m=masked_m)
    if g and bool(((masked_m < 0) | (masked_m > mmax)).any()):
        bad = masked_m[(masked_m < 0) | (masked_m > mmax)][0].item()
        raise ValueError(f"masked_m must be in [0, Mmax={mmax}], got {bad}")
    if packed:
        native.m_grouped_fp8_gemm_nt_masked_prepacked_out(a_, sa, b_, sb, packed.panels, masked_m, expected_m, d)
    else:
        native.m_grouped_fp8_gemm_nt_masked_out(a_, sa, b_, sb, masked_m, expected_m, d)
    return d


def _group_sizes(ks: object) -> list[int]:
    if isinstance(ks, torch.Tensor):
        if ks.dim() != 1 or ks.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ks must be a 1-D int tensor or a list of ints, got {ks.dtype} {list(ks.shape)}")
        ks = ks.tolist()
    if not isinstance(ks, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ks):
        raise TypeError(f"ks must be a list of ints, got {ks!r}")
    if any(x < 0 for x in ks):
        raise ValueError(f"ks must be >= 0, got {list(ks)}")
    return list(ks)


def k_grouped_fp8_gemm_nt_contiguous(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    d: torch.Tensor,
    ks: Sequence[int] | torch.Tensor,
    ks_tensor: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped GEMM with the groups concatenated along K (the token dimension): the weight
    gradients of MoE experts, dW_g = dY_g^T @ X_g, in one call.

    Layout (both operands K-contiguous, 1x128 tiles along K restarting at each group):
        a: (a [M, sum(ks)] e4m3, e.g. dY^T, sa [M, S] f32),
        b: (b [N, sum(ks)] e4m3, e.g. X^T,  sb [N, S] f32), S = sum_g ceil(ks[g] / 128);
        group g covers columns [ks[0] + .. + ks[g-1], + ks[g]) and its scale columns start at
        sum_{g' < g} ceil(ks[g'] / 128). ``grouped_transposed_per_token_cast_to_fp8(x, ks)``
        makes these operands from token-major X [sum(ks), N] (and dY likewise).
        d: output [G, M, N] float32 or bfloat16 (float32 when c is given).
        ks: the G group sizes (list of ints or an int tensor); 0 is allowed (d[g] = c[g] or 0).
        ks_tensor: DeepGEMM passes the sizes again as a device tensor; optional, checked for
            length only.
        c: optional [G, M, N] float32 added to the products; may be d itself.

    Returns:
        d, with d[g] = c[g] + A[:, group g] @ B[:, group g]^T.
    """
    ks = _group_sizes(ks)
    a_, sa = _operand("a", a, 2)
    b_, sb = _operand("b", b, 2)
    (m, sum_k), n = a_.shape, b_.shape[0]
    _check_k("a", sum_k, "b", b_.shape[1])
    if sum(ks) != sum_k:
        raise ValueError(f"ks must sum to the K of a and b ({sum_k}), got sum {sum(ks)}")
    if ks_tensor is not None:
        ks_tensor = check_tensor("ks_tensor", ks_tensor)
        if ks_tensor.dim() != 1 or ks_tensor.numel() != len(ks):
            raise ValueError(f"ks_tensor must have {len(ks)} elements like ks, got shape {list(ks_tensor.shape)}")
    tiles = sum(_cdiv(x, BLOCK) for x in ks)
    sa = _scales("sa", sa, [(m, tiles)])
    sb = _scales("sb", sb, [(n, tiles)])
    d = _output("d", d, (len(ks), m, n), f32_only=c is not None)
    if c is not None:
        c = _output("c", c, (len(ks), m, n), f32_only=True)
    check_same_device(a=a_, sa=sa, b=b_, sb=sb, c=c, d=d)
    native.k_grouped_fp8_gemm_nt_contiguous_out(a_, sa, b_, sb, ks, c, d)
    return d


k_grouped_fp8_gemm_tn_contiguous = k_grouped_fp8_gemm_nt_contiguous
"""The SM100 name of the same call (the K-grouped GEMM is "TN" in the [K, M] view of the operands)."""


def grouped_transposed_per_token_cast_to_fp8(
    x: torch.Tensor, ks: Sequence[int] | torch.Tensor, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes X^T for the k-grouped GEMM: 1x128 tiles along the tokens of each group, so that
    no tile straddles two groups.

    Args:
        x: [sum(ks), C] float32/bfloat16/float16, tokens grouped contiguously.
        ks: the group sizes along the tokens.

    Returns:
        (xt [C, sum(ks)] float8_e4m3fn, scales [C, sum_g ceil(ks[g] / 128)] float32).
    """
    from ops.quant import transposed_per_token_cast_to_fp8

    ks = _group_sizes(ks)
    x = check_tensor("x", x)
    check_dim("x", x, 2)
    if sum(ks) != x.shape[0]:
        raise ValueError(f"ks must sum to the number of rows of x ({x.shape[0]}), got {sum(ks)}")
    parts = [transposed_per_token_cast_to_fp8(seg.contiguous(), BLOCK, use_ue8m0) for seg in x.split(ks) if seg.shape[0]]
    if not parts:
        return (x.new_empty((x.shape[1], 0), dtype=FP8), x.new_empty((x.shape[1], 0), dtype=torch.float32))
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


@torch.library.register_fake("dsv3::fp8_gemm_nt_out")
def _fp8_gemm_nt_out_fake(a, sa, b, sb, c, d) -> None:
    return None


@torch.library.register_fake("dsv3::fp8_prepack_b")
def _fp8_prepack_b_fake(b) -> torch.Tensor:
    *lead, n, k = b.shape  # [N, K] or [G, N, K]
    return b.new_empty((*lead, _cdiv(n, _PANEL_COLS), k, _PANEL_COLS), dtype=torch.float32)


@torch.library.register_fake("dsv3::fp8_gemm_nt_prepacked_out")
def _fp8_gemm_nt_prepacked_out_fake(a, sa, b, sb, b_panels, c, d) -> None:
    return None


@torch.library.register_fake("dsv3::m_grouped_fp8_gemm_nt_contiguous_out")
def _m_grouped_contiguous_fake(a, sa, b, sb, m_indices, d) -> None:
    return None


@torch.library.register_fake("dsv3::m_grouped_fp8_gemm_nt_contiguous_prepacked_out")
def _m_grouped_contiguous_prepacked_fake(a, sa, b, sb, b_panels, m_indices, d) -> None:
    return None


@torch.library.register_fake("dsv3::m_grouped_fp8_gemm_nt_masked_prepacked_out")
def _m_grouped_masked_prepacked_fake(a, sa, b, sb, b_panels, masked_m, expected_m, d) -> None:
    return None


@torch.library.register_fake("dsv3::m_grouped_fp8_gemm_nt_masked_out")
def _m_grouped_masked_fake(a, sa, b, sb, masked_m, expected_m, d) -> None:
    return None


@torch.library.register_fake("dsv3::k_grouped_fp8_gemm_nt_contiguous_out")
def _k_grouped_fake(a, sa, b, sb, ks, c, d) -> None:
    return None
