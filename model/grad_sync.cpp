#include "model/grad_sync.h"

#include <cmath>
#include <string>

#include "core/error.h"

namespace moe {
namespace {

bool is_router(const ParamEntry& entry) {
  return entry.name.find(".moe.router.") != std::string::npos;
}

// The block index of "h.{l}.…", or -1 for the embeddings and ln_f.
int block_of(const ParamEntry& entry) {
  if (entry.name.rfind("h.", 0) != 0) return -1;
  return std::stoi(entry.name.substr(2));
}

}  // namespace

bool holds_canonical_copy(const ParamEntry& entry, const ParallelDims& dims) {
  // Experts: one copy per ep_rank, replicated over tp and expert-data-parallel ranks.
  if (entry.is_expert) return dims.tp_rank == 0 && dims.edp_rank == 0;
  if (dims.dp_rank != 0) return false;
  // Tensor-parallel shards: every tp rank holds a distinct piece.
  return entry.is_sharded() || dims.tp_rank == 0;
}

GradientSync::GradientSync(Backend& backend, const ParamLayout& layout, const ParallelDims& dims,
                           const GradGroups& groups)
    : backend_(backend), layout_(layout), dims_(dims), groups_(groups) {
  // Adjacent tensors reduced over the same group merge into one range (one message); only
  // alignment padding may lie between them, never another tensor.
  auto add = [&](std::vector<Range>& ranges, const ParamEntry& entry, Communicator* group) {
    const size_t begin = entry.offset, end = entry.offset + entry.numel;
    const bool adjacent = !ranges.empty() && ranges.back().end <= begin &&
                          begin - ranges.back().end < 16;
    if (adjacent && ranges.back().group == group) {
      ranges.back().end = end;
      return;
    }
    ranges.push_back({begin, end, group});
  };
  int num_blocks = 0;
  for (const ParamEntry& entry : layout.entries()) num_blocks = std::max(num_blocks, block_of(entry) + 1);
  block_ranges_.resize(num_blocks);
  for (const ParamEntry& entry : layout.entries()) {
    Communicator* group = entry.is_expert ? &groups.expert_dp
                          : is_router(entry) ? &groups.world
                                             : &groups.dp;
    const int block = block_of(entry);
    add(block < 0 ? tail_ranges_ : block_ranges_[block], entry, group);
  }
}

void GradientSync::start(float* grads, const Range& range) {
  if (range.group->size() == 1) return;
  pending_.push_back(range.group->allreduce_sum_async(grads + range.begin, range.end - range.begin));
}

void GradientSync::start_block(float* grads, int layer) {
  for (const Range& range : block_ranges_[layer]) start(grads, range);
}

void GradientSync::finish(float* grads) {
  for (const Range& range : tail_ranges_) start(grads, range);
  for (auto& pending : pending_) pending->wait();
  pending_.clear();
  if (dims_.dp > 1) backend_.scale(grads, 1.0f / dims_.dp, layout_.total_floats());
}

double GradientSync::global_norm(const float* grads) {
  double sum = 0.0;
  for (const ParamEntry& entry : layout_.entries())
    if (holds_canonical_copy(entry, dims_)) sum += backend_.sum_squares(grads + entry.offset, entry.numel);
  groups_.world.allreduce_sum(&sum, 1);
  return std::sqrt(sum);
}

}  // namespace moe
