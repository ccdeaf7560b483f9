// moe-eval --dump-routing FILE: which expert every evaluated token went to in every Switch
// layer, for studying what experts learn (benchmarks/quality/, study 5).
//
// The dump is a CSV with one row per token position of the evaluated windows:
//   position,token,layer1_expert,layer1_kept,layer3_expert,...
// position is the token's index in the data file (window w, offset t: w*T + t), token its id
// (the byte, for byte data), layerL_expert the expert the router chose in model layer L (before
// capacity) and layerL_kept 1 when capacity kept that choice, 0 when it was dropped. With
// top-k > 1 the columns are layerL_expert_kJ / layerL_kept_kJ for each choice J.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "experts/switch_layer.h"
#include "launcher/data.h"
#include "launcher/options.h"
#include "model/gpt.h"

namespace moe {

struct RoutingDump {
  std::vector<int> switch_layer_ids;  // (S) model layer of each Switch layer
  int top_k = 1;                      // K
  std::vector<int64_t> position;      // (N) index of the token in the data file
  std::vector<int32_t> token;         // (N) the token id (the byte, for byte data)
  std::vector<int> expert;            // (N, S, K) chosen expert, before capacity
  std::vector<uint8_t> kept;          // (N, S, K) 1 when capacity kept the choice
  double loss_sum = 0;                // cross-entropy summed over the evaluated targets
  double tokens = 0;                  // targets evaluated
};

// Runs the model over validation batches 0 .. batches-1 of `data` (every batch when
// batches <= 0) and records each token's routing. The model must have one rank's layout (tp 1).
RoutingDump collect_routing(GptModel& model, const DataLoader& data, int micro_batch_size,
                            int64_t batches, const RoutingOptions& routing);

// Writes the CSV described above; RuntimeError when the file cannot be written.
void write_routing_dump(const std::string& path, const RoutingDump& dump);

// moe-eval with --dump-routing: loads the model (open_evaluation), evaluates like
// run_evaluation, writes the dump, and prints the evaluation's JSON line (with "routing_dump").
int run_routing_dump(const EvalOptions& options);

}  // namespace moe
