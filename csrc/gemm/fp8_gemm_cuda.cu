// CUDA implementations of the FP8 GEMM ops (schemas in gemm_ops.cpp): dense NT, m-grouped
// contiguous, m-grouped masked and k-grouped, on the generic kernel of fp8_gemm_kernel_cuda.cuh
// or, on Hopper when asked, the TMA + warp-specialised kernel of fp8_gemm_tma_cuda.cuh. Python
// (ops/gemm.py) has validated the arguments; the checks here only keep the kernels from reading
// or writing outside the tensors they were given.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>

#include "fp8_gemm_cuda_launches.h"
#include "fp8_gemm_kernel_cuda.cuh"
#include "fp8_gemm_tma_cuda.cuh"

namespace dsv3 {
namespace {

using gemm_cuda::Params;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_cuda(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
}

// Payload and output tensors: the last dimension contiguous (rows may be strided).
void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, op, ": ", name, " must have a contiguous last dimension");
}

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_output(const at::Tensor& d, const char* op) {
  TORCH_CHECK(d.scalar_type() == at::kFloat || d.scalar_type() == at::kBFloat16, op,
              ": d must be float32 or bfloat16, got ", d.scalar_type());
  TORCH_CHECK(d.is_cuda(), op, ": d must be a CUDA tensor");
  check_rows(d, op, "d");
}

const uint8_t* bytes(const at::Tensor& t) { return reinterpret_cast<const uint8_t*>(t.data_ptr()); }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// B's scales: 128 x 128 blocks [ceil(N/128), kb] or one per row [N, kb] (weight gradients).
int sb_rows_of(const at::Tensor& sb, int64_t n, const char* op) {
  const int64_t rows = sb.size(-2);
  TORCH_CHECK(rows == ceil_div(n, 128) || rows == n, op, ": sb must have ceil(N/128) = ", ceil_div(n, 128),
              " (128x128 blocks) or N = ", n, " (per-row) rows, got ", rows);
  return rows == ceil_div(n, 128) ? 128 : 1;
}

// Raises the kernel's dynamic shared-memory limit once per device.
template <typename Kernel>
void allow_smem(Kernel kernel, int smem, std::atomic<uint64_t>& configured) {
  const int dev = at::cuda::current_device();
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit == 0 || !(configured.load() & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    configured.fetch_or(bit);
  }
}

dim3 tile_grid(const Params& p, int64_t batch) {
  return dim3(static_cast<unsigned>(ceil_div(p.n, gemm_cuda::kBlockN)),
              static_cast<unsigned>(ceil_div(p.m, gemm_cuda::kBlockM)), static_cast<unsigned>(batch));
}

template <typename Mma, typename OutT>
void launch_typed(const Params& p, int64_t batch, cudaStream_t stream) {
  auto kernel = gemm_cuda::fp8_gemm_kernel<Mma, OutT>;
  constexpr int smem = gemm_cuda::smem_bytes<Mma>();
  static std::atomic<uint64_t> configured{0};
  allow_smem(kernel, smem, configured);
  kernel<<<tile_grid(p, batch), gemm_cuda::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// The TMA kernel's tensor maps. cuTensorMapEncodeTiled is a driver function: it is looked up
// through the runtime, so the extension needs no link against libcuda.

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found));
#endif
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                "FP8 GEMM: the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12+)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A [depth][rows][k] E4M3 tensor (row stride ld, depth stride ds bytes) read in 128 x 128-byte
// boxes, 128-byte swizzled as the wgmma descriptors expect; reads outside it return zeros.
CUtensorMap tile_map(const uint8_t* base, int64_t k, int64_t rows, int64_t depth, int64_t ld, int64_t ds) {
  if (depth == 1) ds = ld * rows;  // never stepped; any multiple of 16 is valid
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(depth)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(ld), static_cast<cuuint64_t>(ds)};
  const cuuint32_t box[3] = {gemm_cuda::kBlockK, gemm_cuda::kBlockM, 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult res = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<uint8_t*>(base), dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, "FP8 GEMM: cuTensorMapEncodeTiled failed (", static_cast<int>(res), ") for a [",
              depth, ", ", rows, ", ", k, "] operand with strides (", ds, ", ", ld, ")");
  return map;
}

// A stride the TMA can step: a multiple of 16 bytes, and at least the extent it steps over (a
// one-row operand may report any stride, 0 included, which the driver would refuse).
bool tma_stride(int64_t stride, int64_t extent) { return stride % 16 == 0 && stride >= extent; }

// What the TMA needs: 16-byte-aligned bases and strides, coordinates that fit int32, some K.
bool tma_fits(const Params& p, int64_t batch) {
  const bool batched_a = p.masked_m != nullptr, batched_b = p.masked_m != nullptr || p.m_indices != nullptr;
  return p.k > 0 && p.num_groups > 0 && aligned16(p.a) && aligned16(p.b) && tma_stride(p.lda, p.k) &&
         tma_stride(p.ldb, p.k) && (!batched_a || tma_stride(p.a_bs, p.lda * p.m)) &&
         (!batched_b || tma_stride(p.b_bs, p.ldb * p.n)) && p.k < INT32_MAX && p.m < INT32_MAX &&
         p.n < INT32_MAX && batch < INT32_MAX;
}

template <typename OutT>
void launch_tma(const Params& p, int64_t batch, cudaStream_t stream) {
  const int64_t a_depth = p.masked_m != nullptr ? batch : 1;
  const int64_t b_depth = p.masked_m != nullptr ? batch : (p.m_indices != nullptr ? p.num_groups : 1);
  const CUtensorMap map_a = tile_map(p.a, p.k, p.m, a_depth, p.lda, p.a_bs);
  const CUtensorMap map_b = tile_map(p.b, p.k, p.n, b_depth, p.ldb, p.b_bs);
  auto kernel = gemm_cuda::fp8_gemm_tma_kernel<OutT>;
  constexpr int smem = gemm_cuda::tma_smem_bytes();
  static std::atomic<uint64_t> configured{0};
  allow_smem(kernel, smem, configured);
  kernel<<<tile_grid(p, batch), gemm_cuda::kTmaThreads, smem, stream>>>(map_a, map_b, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernel: DSV3_FP8_GEMM_KERNEL = mma_sync (default: any sm_80+ GPU), wgmma (Hopper's wgmma
// in the generic kernel) or tma (the TMA + warp-specialised Hopper kernel, where the operands
// suit the TMA, else wgmma). On other GPUs both Hopper choices fall back to mma_sync. They become
// the default on Hopper once a GPU run has verified them; until then they are opt-in.
enum class Kernel { kMmaSync, kWgmma, kTma };
std::atomic<int64_t> launches[3];  // by Kernel

Kernel kernel_choice(const cudaDeviceProp& prop) {
  const char* env = std::getenv("DSV3_FP8_GEMM_KERNEL");
  const std::string choice = env == nullptr ? "mma_sync" : env;
  TORCH_CHECK(choice == "mma_sync" || choice == "wgmma" || choice == "tma",
              "DSV3_FP8_GEMM_KERNEL must be mma_sync, wgmma or tma, got '", choice, "'");
  if (prop.major != 9 || choice == "mma_sync") return Kernel::kMmaSync;
  return choice == "wgmma" ? Kernel::kWgmma : Kernel::kTma;
}

template <typename OutT>
void launch_for(Params p, int64_t batch, Kernel kernel, cudaStream_t stream) {
  if (kernel == Kernel::kTma && !tma_fits(p, batch)) kernel = Kernel::kWgmma;
  if (kernel == Kernel::kTma) {
    launch_tma<OutT>(p, batch, stream);
  } else if (kernel == Kernel::kMmaSync) {
    launch_typed<gemm_cuda::MmaSync, OutT>(p, batch, stream);
  } else {
    launch_typed<gemm_cuda::Wgmma, OutT>(p, batch, stream);
  }
  ++launches[static_cast<int>(kernel)];  // counted once launched
}

void launch(Params p, int64_t batch, at::ScalarType out_dtype) {
  if (p.m == 0 || p.n == 0 || batch == 0) return;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "FP8 GEMM on CUDA needs compute capability 8.0 or newer, this device has ",
              prop->major, ".", prop->minor);
  TORCH_CHECK(ceil_div(p.m, gemm_cuda::kBlockM) <= 65535 && batch <= 65535, "FP8 GEMM: too many rows or groups for one launch");
  p.vec16 = p.k % 16 == 0 && p.lda % 16 == 0 && p.ldb % 16 == 0 && p.a_bs % 16 == 0 && p.b_bs % 16 == 0 &&
            aligned16(p.a) && aligned16(p.b);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Kernel kernel = kernel_choice(*prop);
  if (out_dtype == at::kFloat) {
    launch_for<float>(p, batch, kernel, stream);
  } else {
    launch_for<__nv_bfloat16>(p, batch, kernel, stream);
  }
}

// Fills the A/sa/B/sb/C/D fields of a problem of `lead` leading (batch) dimensions.
Params make_params(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                   const std::optional<at::Tensor>& c, const at::Tensor& d, int64_t m, int64_t n, int64_t k,
                   const char* op) {
  Params p{};
  p.a = bytes(a);
  p.lda = a.stride(-2);
  p.a_bs = a.dim() == 3 ? a.stride(0) : 0;
  p.sa = sa.data_ptr<float>();
  p.sa_rs = sa.stride(-2);
  p.sa_ks = sa.stride(-1);
  p.sa_bs = sa.dim() == 3 ? sa.stride(0) : 0;
  p.b = bytes(b);
  p.ldb = b.stride(-2);
  p.b_bs = b.dim() == 3 ? b.stride(0) : 0;
  p.sb = sb.data_ptr<float>();
  p.sb_rs = sb.stride(-2);
  p.sb_ks = sb.stride(-1);
  p.sb_bs = sb.dim() == 3 ? sb.stride(0) : 0;
  p.sb_rows = sb_rows_of(sb, n, op);
  if (c.has_value() && c->defined()) {
    p.c = c->data_ptr<float>();
    p.ldc = c->stride(-2);
    p.c_bs = c->dim() == 3 ? c->stride(0) : 0;
  }
  p.d = d.data_ptr();
  p.ldd = d.stride(-2);
  p.d_bs = d.dim() == 3 ? d.stride(0) : 0;
  p.m = m;
  p.n = n;
  p.k = k;
  p.num_groups = 1;
  return p;
}

void check_c(const std::optional<at::Tensor>& c, const at::Tensor& d, const char* op) {
  if (!c.has_value() || !c->defined()) return;
  check_cuda(*c, op, "c", at::kFloat, d.dim());
  check_shape(*c, d.sizes(), op, "c");
  check_rows(*c, op, "c");
}

// D = C + A @ B^T; a [M,K], sa [M,ceil(K/128)], b [N,K], sb [ceil(N/128) or N, ceil(K/128)].
void fp8_gemm_nt_out_cuda(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                          const std::optional<at::Tensor>& c, const at::Tensor& d) {
  constexpr const char* op = "fp8_gemm_nt";
  check_cuda(a, op, "a", at::kFloat8_e4m3fn, 2);
  check_cuda(b, op, "b", at::kFloat8_e4m3fn, 2);
  check_cuda(sa, op, "sa", at::kFloat, 2);
  check_cuda(sb, op, "sb", at::kFloat, 2);
  check_output(d, op);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0), kb = ceil_div(k, 128);
  TORCH_CHECK(b.size(1) == k, op, ": b must be [N, K] with K = ", k, ", got ", b.sizes());
  check_shape(sa, {m, kb}, op, "sa");
  TORCH_CHECK(sb.size(1) == kb, op, ": sb must have ceil(K/128) = ", kb, " columns, got ", sb.sizes());
  check_shape(d, {m, n}, op, "d");
  check_rows(a, op, "a");
  check_rows(b, op, "b");
  check_c(c, d, op);
  c10::cuda::CUDAGuard guard(d.device());
  launch(make_params(a, sa, b, sb, c, d, m, n, k, op), 1, d.scalar_type());
}

// Rows of a [M,K] use the expert named by m_indices [M] (int32; -1: padding, written as zeros).
void m_grouped_fp8_gemm_nt_contiguous_out_cuda(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                               const at::Tensor& sb, const at::Tensor& m_indices,
                                               const at::Tensor& d) {
  constexpr const char* op = "m_grouped_fp8_gemm_nt_contiguous";
  check_cuda(a, op, "a", at::kFloat8_e4m3fn, 2);
  check_cuda(b, op, "b", at::kFloat8_e4m3fn, 3);
  check_cuda(sa, op, "sa", at::kFloat, 2);
  check_cuda(sb, op, "sb", at::kFloat, 3);
  check_cuda(m_indices, op, "m_indices", at::kInt, 1);
  check_output(d, op);
  const int64_t m = a.size(0), k = a.size(1), groups = b.size(0), n = b.size(1), kb = ceil_div(k, 128);
  TORCH_CHECK(b.size(2) == k, op, ": b must be [G, N, K] with K = ", k, ", got ", b.sizes());
  TORCH_CHECK(sb.size(0) == groups && sb.size(2) == kb, op, ": sb must be [G, *, ceil(K/128)], got ", sb.sizes());
  check_shape(sa, {m, kb}, op, "sa");
  check_shape(d, {m, n}, op, "d");
  check_shape(m_indices, {m}, op, "m_indices");
  TORCH_CHECK(m_indices.is_contiguous(), op, ": m_indices must be contiguous");
  TORCH_CHECK(groups <= INT32_MAX, op, ": too many groups");
  check_rows(a, op, "a");
  check_rows(b, op, "b");
  c10::cuda::CUDAGuard guard(d.device());
  Params p = make_params(a, sa, b, sb, std::nullopt, d, m, n, k, op);
  p.m_indices = m_indices.data_ptr<int>();
  p.num_groups = static_cast<int>(groups);
  if (groups == 0) {  // no expert: every row is padding (or invalid)
    p.b_bs = p.sb_bs = 0;
  }
  launch(p, 1, d.scalar_type());
}

// Group g computes its first masked_m[g] rows of a [G, Mmax, K] against b[g]; the rest of d
// [G, Mmax, N] is not touched. expected_m is a performance hint of DeepGEMM's (unused here).
void m_grouped_fp8_gemm_nt_masked_out_cuda(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                           const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,
                                           const at::Tensor& d) {
  constexpr const char* op = "m_grouped_fp8_gemm_nt_masked";
  (void)expected_m;
  check_cuda(a, op, "a", at::kFloat8_e4m3fn, 3);
  check_cuda(b, op, "b", at::kFloat8_e4m3fn, 3);
  check_cuda(sa, op, "sa", at::kFloat, 3);
  check_cuda(sb, op, "sb", at::kFloat, 3);
  check_cuda(masked_m, op, "masked_m", at::kInt, 1);
  check_output(d, op);
  const int64_t groups = a.size(0), m = a.size(1), k = a.size(2), n = b.size(1), kb = ceil_div(k, 128);
  check_shape(b, {groups, n, k}, op, "b");
  check_shape(sa, {groups, m, kb}, op, "sa");
  TORCH_CHECK(sb.size(0) == groups && sb.size(2) == kb, op, ": sb must be [G, *, ceil(K/128)], got ", sb.sizes());
  check_shape(d, {groups, m, n}, op, "d");
  check_shape(masked_m, {groups}, op, "masked_m");
  TORCH_CHECK(masked_m.is_contiguous(), op, ": masked_m must be contiguous");
  check_rows(a, op, "a");
  check_rows(b, op, "b");
  c10::cuda::CUDAGuard guard(d.device());
  Params p = make_params(a, sa, b, sb, std::nullopt, d, m, n, k, op);
  p.masked_m = masked_m.data_ptr<int>();
  launch(p, groups, d.scalar_type());
}

// Weight gradients of grouped experts: group g covers columns [k0_g, k0_g + ks[g]) of a [M, sumK]
// and b [N, sumK]; its 1x128 scale tiles start at column s0_g of sa [M, S] and sb [N, S] (S =
// sum ceil(ks/128)); d[g] = c[g] + A_g @ B_g^T. One launch per group (ks lives on the host).
void k_grouped_fp8_gemm_nt_contiguous_out_cuda(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                               const at::Tensor& sb, at::IntArrayRef ks,
                                               const std::optional<at::Tensor>& c, const at::Tensor& d) {
  constexpr const char* op = "k_grouped_fp8_gemm_nt_contiguous";
  check_cuda(a, op, "a", at::kFloat8_e4m3fn, 2);
  check_cuda(b, op, "b", at::kFloat8_e4m3fn, 2);
  check_cuda(sa, op, "sa", at::kFloat, 2);
  check_cuda(sb, op, "sb", at::kFloat, 2);
  check_output(d, op);
  const int64_t groups = static_cast<int64_t>(ks.size()), m = a.size(0), sum_k = a.size(1), n = b.size(0);
  int64_t total_k = 0, total_s = 0;
  for (int64_t kg : ks) {
    TORCH_CHECK(kg >= 0, op, ": ks must be non-negative, got ", ks);
    total_k += kg;
    total_s += ceil_div(kg, 128);
  }
  TORCH_CHECK(total_k == sum_k, op, ": a must have sum(ks) = ", total_k, " columns, got ", a.sizes());
  check_shape(b, {n, sum_k}, op, "b");
  check_shape(sa, {m, total_s}, op, "sa");
  check_shape(sb, {n, total_s}, op, "sb");
  check_shape(d, {groups, m, n}, op, "d");
  check_rows(a, op, "a");
  check_rows(b, op, "b");
  check_c(c, d, op);
  c10::cuda::CUDAGuard guard(d.device());
  const bool has_c = c.has_value() && c->defined();
  int64_t k0 = 0, s0 = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t kg = ks[g];
    Params p{};
    p.a = bytes(a) + k0;
    p.lda = a.stride(0);
    p.sa = sa.data_ptr<float>() + s0 * sa.stride(1);
    p.sa_rs = sa.stride(0);
    p.sa_ks = sa.stride(1);
    p.b = bytes(b) + k0;
    p.ldb = b.stride(0);
    p.sb = sb.data_ptr<float>() + s0 * sb.stride(1);
    p.sb_rs = sb.stride(0);
    p.sb_ks = sb.stride(1);
    p.sb_rows = 1;
    if (has_c) {
      p.c = c->data_ptr<float>() + g * c->stride(0);
      p.ldc = c->stride(1);
    }
    p.d = static_cast<char*>(d.data_ptr()) + g * d.stride(0) * d.element_size();
    p.ldd = d.stride(1);
    p.m = m;
    p.n = n;
    p.k = kg;
    p.num_groups = 1;
    launch(p, 1, d.scalar_type());
    k0 += kg;
    s0 += ceil_div(kg, 128);
  }
}

}  // namespace

std::map<std::string, int64_t> fp8_gemm_cuda_launches() {
  return {{"mma_sync", launches[0].load()}, {"wgmma", launches[1].load()}, {"tma", launches[2].load()}};
}

TORCH_LIBRARY_IMPL(dsv3, CUDA, m) {
  m.impl("fp8_gemm_nt_out", &fp8_gemm_nt_out_cuda);
  m.impl("m_grouped_fp8_gemm_nt_contiguous_out", &m_grouped_fp8_gemm_nt_contiguous_out_cuda);
  m.impl("m_grouped_fp8_gemm_nt_masked_out", &m_grouped_fp8_gemm_nt_masked_out_cuda);
  m.impl("k_grouped_fp8_gemm_nt_contiguous_out", &k_grouped_fp8_gemm_nt_contiguous_out_cuda);
}

}  // namespace dsv3
