// Dispatch layout on the CPU: from each token's top-k experts, how many tokens go to each rank,
// node and expert, and which ranks receive each token.
//
// Experts are split evenly and contiguously: expert e lives on rank e / experts_per_rank, and
// rank r on node r / ranks_per_node. A token counts once per rank (and once per node) however
// many of its experts live there; topk_idx -1 means "no expert". Inputs arrive checked from
// comm/kernels.py; the shape checks here guard the native code itself.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace dsv3 {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_dispatch_layout_cpu(
    const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t ranks_per_node) {
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.is_contiguous() && topk_idx.scalar_type() == at::kLong,
              "moe_dispatch_layout: topk_idx must be a contiguous int64 [T, k] tensor");
  TORCH_CHECK(num_ranks > 0 && num_experts > 0 && num_experts % num_ranks == 0,
              "moe_dispatch_layout: num_experts must be a positive multiple of num_ranks");
  TORCH_CHECK(ranks_per_node > 0 && num_ranks % ranks_per_node == 0,
              "moe_dispatch_layout: num_ranks must be a multiple of ranks_per_node");
  const int64_t t_count = topk_idx.size(0), k = topk_idx.size(1);
  const int64_t epr = num_experts / num_ranks, num_nodes = num_ranks / ranks_per_node;
  auto opts = topk_idx.options();
  auto is_token_in_rank = at::zeros({t_count, num_ranks}, opts.dtype(at::kBool));
  auto per_rank = at::zeros({num_ranks}, opts.dtype(at::kInt));
  auto per_node = at::zeros({num_nodes}, opts.dtype(at::kInt));
  auto per_expert = at::zeros({num_experts}, opts.dtype(at::kInt));
  const int64_t* idx = topk_idx.data_ptr<int64_t>();
  bool* in_rank = is_token_in_rank.data_ptr<bool>();
  for (int64_t i = 0; i < t_count * k; ++i)
    TORCH_CHECK(idx[i] >= -1 && idx[i] < num_experts, "moe_dispatch_layout: topk_idx entry ", idx[i],
                " outside [-1, ", num_experts, ")");

  // Per-thread partial counts, summed at the end: no atomics, deterministic.
  const int threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> partial(threads, std::vector<int64_t>(num_ranks + num_nodes + num_experts, 0));
  at::parallel_for(0, t_count, 256, [&](int64_t begin, int64_t end) {
    std::vector<int64_t>& acc = partial[at::get_thread_num()];
    std::vector<char> node_seen(num_nodes);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(node_seen.begin(), node_seen.end(), 0);
      bool* row = in_rank + t * num_ranks;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = idx[t * k + j];
        if (e < 0) continue;
        acc[num_ranks + num_nodes + e] += 1;
        const int64_t r = e / epr;
        if (!row[r]) {
          row[r] = true;
          acc[r] += 1;
        }
        const int64_t node = r / ranks_per_node;
        if (!node_seen[node]) {
          node_seen[node] = 1;
          acc[num_ranks + node] += 1;
        }
      }
    }
  });
  int32_t* pr = per_rank.data_ptr<int32_t>();
  int32_t* pn = per_node.data_ptr<int32_t>();
  int32_t* pe = per_expert.data_ptr<int32_t>();
  for (const auto& acc : partial) {
    for (int64_t r = 0; r < num_ranks; ++r) pr[r] += static_cast<int32_t>(acc[r]);
    for (int64_t n = 0; n < num_nodes; ++n) pn[n] += static_cast<int32_t>(acc[num_ranks + n]);
    for (int64_t e = 0; e < num_experts; ++e) pe[e] += static_cast<int32_t>(acc[num_ranks + num_nodes + e]);
  }
  return {per_rank, per_node, per_expert, is_token_in_rank};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("moe_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks, int ranks_per_node) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_send_positions(Tensor is_token_in_rank) -> Tensor");
  m.def("moe_dispatch_pack(Tensor[] payloads, Tensor send_pos, Tensor? topk_idx, Tensor? topk_weights, "
        "int experts_per_rank, int expert_base, Tensor(a!) out) -> ()");
  m.def("moe_unpack_rows(Tensor buf, Tensor(a!)[] outs) -> ()");
  m.def("moe_combine_reduce(Tensor recv, Tensor send_pos, Tensor(a!) out) -> ()");
  m.def("moe_permute(Tensor[] payloads, Tensor topk_idx, int num_local_experts, int alignment) -> "
        "(Tensor[], Tensor, Tensor)");
  m.def("moe_unpermute(Tensor y, Tensor row_pos, Tensor weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) { m.impl("moe_dispatch_layout", &moe_dispatch_layout_cpu); }

}  // namespace dsv3
