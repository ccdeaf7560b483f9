#include "launcher/routing_dump.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "launcher/evaluation.h"

namespace moe {

RoutingDump collect_routing(GptModel& model, const DataLoader& data, int micro_batch_size,
                            int64_t batches, const RoutingOptions& routing) {
  const int T = data.seq_length();
  const int K = model.config().moe_router_topk;
  const int num_switch = static_cast<int>(model.switch_layers().size());
  RoutingDump dump;
  dump.switch_layer_ids = model.switch_layer_ids();
  dump.top_k = K;
  int64_t num_batches = data.num_valid_batches(micro_batch_size);
  if (batches > 0) num_batches = std::min(num_batches, batches);
  // Evaluation windows count from the first validation window; its tokens start at n_train*T.
  const int64_t first_window = data.num_train_windows();
  std::vector<int32_t> inputs(static_cast<size_t>(micro_batch_size) * T);  // (B, T)
  std::vector<int32_t> targets(inputs.size());                             // (B, T)
  for (int64_t batch = 0; batch < num_batches; ++batch) {
    const int rows = data.fill_valid_batch(inputs.data(), targets.data(), batch, micro_batch_size);
    const ForwardLosses losses = model.forward(inputs.data(), targets.data(), rows, T, routing);
    dump.loss_sum += losses.lm_loss * rows * T;
    dump.tokens += static_cast<double>(rows) * T;
    const int num_tokens = rows * T;  // N
    const size_t base = dump.token.size();
    for (int i = 0; i < num_tokens; ++i) {
      dump.position.push_back((first_window + batch * micro_batch_size) * T + i);
      dump.token.push_back(inputs[i]);
    }
    dump.expert.resize(dump.token.size() * num_switch * K);
    dump.kept.resize(dump.expert.size());
    for (int s = 0; s < num_switch; ++s) {
      const SwitchLayer& layer = model.switch_layers()[s];
      const std::vector<int>& expert_idx_TK = layer.expert_idx_host();  // (N, K)
      const std::vector<int>& row_TK = layer.row_host();                // (N, K), -1 dropped
      MOE_CHECK(expert_idx_TK.size() >= static_cast<size_t>(num_tokens) * K,
                "routing dump needs the whole micro-batch routed on this rank (tp 1)");
      for (int i = 0; i < num_tokens; ++i)
        for (int k = 0; k < K; ++k) {
          const size_t at = ((base + i) * num_switch + s) * K + k;
          dump.expert[at] = expert_idx_TK[static_cast<size_t>(i) * K + k];
          dump.kept[at] = row_TK[static_cast<size_t>(i) * K + k] >= 0 ? 1 : 0;
        }
    }
  }
  return dump;
}

void write_routing_dump(const std::string& path, const RoutingDump& dump) {
  std::ofstream out(path, std::ios::trunc);
  if (!out) throw RuntimeError("--dump-routing: cannot write " + path);
  const int num_switch = static_cast<int>(dump.switch_layer_ids.size());
  const int K = dump.top_k;
  out << "position,token";
  for (int layer : dump.switch_layer_ids)
    for (int k = 0; k < K; ++k) {
      const std::string suffix = K > 1 ? "_k" + std::to_string(k) : "";
      out << ",layer" << layer << "_expert" << suffix << ",layer" << layer << "_kept" << suffix;
    }
  out << "\n";
  for (size_t i = 0; i < dump.token.size(); ++i) {
    out << dump.position[i] << ',' << dump.token[i];
    for (int s = 0; s < num_switch; ++s)
      for (int k = 0; k < K; ++k) {
        const size_t at = (i * num_switch + s) * K + k;
        out << ',' << dump.expert[at] << ',' << static_cast<int>(dump.kept[at]);
      }
    out << '\n';
  }
  out.flush();
  if (!out) throw RuntimeError("--dump-routing: writing " + path + " failed");
}

int run_routing_dump(const EvalOptions& options) {
  // An unwritable dump fails before the evaluation, not after it.
  if (!std::ofstream(options.dump_routing, std::ios::trunc))
    throw RuntimeError("--dump-routing: cannot write " + options.dump_routing);
  EvalSession session = open_evaluation(options);
  const int T = session.seq_length;
  const DataLoader& data = *session.data;
  const auto start = std::chrono::steady_clock::now();
  const RoutingDump dump =
      collect_routing(*session.model, data, options.micro_batch_size, options.eval_iters,
                      session.routing);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  write_routing_dump(options.dump_routing, dump);
  const nlohmann::json result = {
      {"loss", dump.tokens > 0 ? dump.loss_sum / dump.tokens : 0.0},
      {"tokens", static_cast<int64_t>(dump.tokens)},
      {"windows", data.num_valid_windows()},
      {"seq_length", T},
      {"tokens_per_sec", seconds > 0 ? dump.tokens / seconds : 0.0},
      {"routing_dump", options.dump_routing},
      {"switch_layers", dump.switch_layer_ids}};
  std::cout << result.dump() << std::endl;
  return 0;
}

}  // namespace moe
