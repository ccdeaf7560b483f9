// The performance model behind moe-plan: from a model, a batch, a parallel layout (tp, ep, dp)
// and a machine description (compute rates, memory bandwidth, link bandwidths and latencies),
// it predicts one training step's time per phase, the bytes each collective moves per rank,
// and the memory each rank holds. Every formula is in perf_model.cpp beside the code.
//
// It follows this trainer's own algorithm (DESIGN.md, docs/ARCHITECTURE.md): Megatron tensor
// parallelism of attention and dense FFNs (tp all-reduce after each projection, forward and
// backward); Switch layers route a 1/tp slice of the tokens, dispatch and combine them over
// the ep group (four all-to-alls per layer and micro-step: dispatch and combine forward, and
// their reverses in backward); dense gradients reduced over dp, expert gradients over the
// expert-data-parallel group (dp/ep), overlapped with backward; AdamW on this rank's shard.
#pragma once

#include <boost/program_options/options_description.hpp>
#include <boost/program_options/variables_map.hpp>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"

namespace moe {

// What one training step processes.
struct Workload {
  ModelConfig model;
  int seq_length = 128;           // T
  int micro_batch_size = 16;      // sequences per micro-step per data-parallel rank
  int global_batch_size = 0;      // sequences per step; 0: micro x dp
  double capacity_factor = 1.25;  // 0: dropless
};

struct PlanLayout {
  int tp = 1, ep = 1, dp = 1;
  int world() const { return tp * dp; }
  std::string str() const;  // "tp2 ep4 dp8"
};

// One rank's machine and the numbers formats. Rates are what the rank sustains, not peaks.
struct Hardware {
  std::string name = "custom";
  int nodes = 1;
  int ranks_per_node = 1;           // GPUs per node (or CPU ranks per machine)
  double gemm_gflops = 100;         // large GEMMs (dense and expert FFNs, logits)
  double attention_gflops = 50;     // the attention core: q k^T, causal softmax, att v
  double memory_gbps = 10;          // elementwise ops (layernorm, gelu, softmax, AdamW...)
  double memory_gib = 16;           // capacity per rank
  double intra_gbps = 10;           // per-rank bandwidth to a peer on the same node, one way
  double inter_gbps = 10;           // per-rank bandwidth to other nodes, one way
  double intra_latency_us = 5;      // per collective step on one node
  double inter_latency_us = 10;
  int param_bytes = 4;              // weight element used in compute (4 fp32, 2 bf16)
  int grad_bytes = 4;               // gradient element (also what the all-reduce moves)
  int optimizer_bytes = 8;          // per parameter: AdamW m and v (+4 with an fp32 master copy)
  int act_bytes = 4;                // activation element (also what the all-to-all moves)
  double expert_imbalance = 1.0;    // busiest rank's expert rows / the mean (the step waits for it)
  double grad_overlap = 1.0;        // fraction of the gradient all-reduce hidden under backward
  // Every assumption, one per line, for the printout.
  std::vector<std::string> describe() const;
};

// Bytes each rank sends per training step, by collective.
struct Volumes {
  double alltoall = 0;            // expert-parallel dispatch and combine, forward and backward
  double tp_allreduce = 0;        // tensor-parallel activations (ring: 2(n-1)/n of the buffer)
  double dp_allreduce = 0;        // dense gradients over dp
  double expert_dp_allreduce = 0; // expert gradients over dp/ep
};

// Bytes each rank holds.
struct MemoryEstimate {
  double weights = 0;
  double grads = 0;
  double optimizer = 0;
  double activations = 0;  // saved for backward plus backward scratch, one micro-batch
  double total() const { return weights + grads + optimizer + activations; }
};

// Parameter counts of the whole model and of one rank.
struct ParamCounts {
  double total = 0;         // every parameter of the model
  double active_per_token = 0;  // matmul weights one token passes through (k experts)
  double dense_per_rank = 0;    // non-expert parameters this rank holds (after the tp split)
  double expert_per_rank = 0;   // expert parameters this rank holds (E/ep experts)
};

struct StepPrediction {
  PlanLayout layout;
  // Milliseconds per step, in the order printed. Compute phases are the busiest rank's.
  std::vector<std::pair<std::string, double>> breakdown_ms;
  double step_ms = 0;
  double tokens_per_sec = 0;   // global tokens / step time
  double model_tflops_per_rank = 0;  // 6 x active params + attention, per rank per second
  Volumes volumes;
  MemoryEstimate memory;
  ParamCounts params;
  bool fits = true;            // memory.total() <= the rank's memory
  double ms(const std::string& phase) const;  // 0 for an unknown phase
};

// moe-train's model and batch flags (Megatron names) writing into `work`, so that moe-plan and
// plan_calibrate read the same --config INI files as moe-train.
void add_workload_options(boost::program_options::options_description& desc, Workload& work);
// Reads `key = value` lines of an INI file into the options of `desc` that it names, ignoring
// the keys that only moe-train knows (lr, data-path...); flags already given win.
void read_workload_config(const std::string& path,
                          const boost::program_options::options_description& desc,
                          boost::program_options::variables_map& vm);

// Throws UsageError naming the first violated constraint (DESIGN.md, Parallel layout; the
// cluster's size).
void validate_plan(const Workload& work, const PlanLayout& layout, const Hardware& hw);

ParamCounts count_params(const ModelConfig& model, const PlanLayout& layout);

// Bytes per rank with the given element sizes (weights, gradients, optimizer per parameter,
// activations), for one micro-batch of activations.
MemoryEstimate estimate_memory(const Workload& work, const PlanLayout& layout, int param_bytes,
                               int grad_bytes, int optimizer_bytes, int act_bytes);

Volumes estimate_volumes(const Workload& work, const PlanLayout& layout, const Hardware& hw);

StepPrediction predict_step(const Workload& work, const PlanLayout& layout, const Hardware& hw);

// Every layout of `world` ranks that validate_plan accepts, predicted, fastest first; those that
// do not fit in memory come last.
std::vector<StepPrediction> rank_layouts(const Workload& work, const Hardware& hw);

// Sets the compute rates and the bandwidths of `hw` from benchmark JSON files of this
// machine: bench_step (sgemm_peak_gflops), plan_calibrate (attention_gflops, memory_gbps) and
// bench_alltoall (algbw of the largest plain size). Returns one line per value taken.
std::vector<std::string> calibrate(Hardware& hw, const std::vector<std::string>& json_paths);

// Named machines and models for projections: "h200" (hardware); "switch-base-128",
// "switch-c" (workloads). Throws UsageError for an unknown name.
Hardware preset_hardware(const std::string& name, int nodes, int ranks_per_node);
Workload preset_workload(const std::string& name);

}  // namespace moe
