// Gradient reduction across the parallel layout, bucketed by layer so that it overlaps
// backward: as soon as block l's gradients are final, non-blocking all-reduces start on them
// while backward continues with block l-1.
//
// Which group sums which gradient (DESIGN.md, Parallel layout):
//   dense tensors (replicated or tensor-parallel shards)  -> dp group
//   the router (its tp ranks routed different tokens)     -> every rank
//   the experts (held by every rank with the same ep_rank) -> expert_dp group
// then every gradient is divided by dp: each rank's loss was the mean over its own tokens.
#pragma once

#include <memory>
#include <vector>

#include "core/backend.h"
#include "dist/communicator.h"
#include "dist/parallel_dims.h"
#include "model/parameters.h"

namespace moe {

struct GradGroups {
  Communicator& dp;
  Communicator& world;
  Communicator& expert_dp;
};

// True on exactly one rank for every element of the unsharded model: the rank that counts
// this tensor in the gradient norm and writes it into an exported file.
bool holds_canonical_copy(const ParamEntry& entry, const ParallelDims& dims);

class GradientSync {
 public:
  GradientSync(Backend& backend, const ParamLayout& layout, const ParallelDims& dims,
               const GradGroups& groups);

  // Starts the reductions of block `layer` (call when its gradients are final).
  void start_block(float* grads, int layer);
  // Reduces what remains (embeddings, ln_f), waits for everything and divides by dp.
  void finish(float* grads);
  // The global L2 norm of the gradient, every parameter counted once whatever the layout.
  double global_norm(const float* grads);

 private:
  struct Range {
    size_t begin = 0, end = 0;  // float offsets into the flat buffer
    Communicator* group = nullptr;
  };
  void start(float* grads, const Range& range);

  Backend& backend_;
  const ParamLayout& layout_;
  ParallelDims dims_;
  GradGroups groups_;
  std::vector<std::vector<Range>> block_ranges_;  // (L) ranges of each block
  std::vector<Range> tail_ranges_;                // wte, wpe, ln_f
  std::vector<std::unique_ptr<PendingCollective>> pending_;
};

}  // namespace moe
