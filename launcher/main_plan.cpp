// moe-plan: predicts a training step of a Switch Transformer on a cluster (launcher/perf_model.h)
// and ranks the parallel layouts that fit in memory.
//
//   moe-plan --config configs/switch-small.ini --global-batch-size 32 --gpus-per-node 2
//            --expert-model-parallel-size 2 --calibrate rates.json --calibrate alltoall.json
//   moe-plan --model switch-c --hardware h200 --nodes 16 --gpus-per-node 8 --rank-layouts
//   moe-plan --projection          (Switch-Base-128- and Switch-C-like models on 8..1024 H200)
//
// Exit status 0, 2 on bad usage (one line on stderr), 1 on a runtime failure.
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "launcher/perf_model.h"

namespace po = boost::program_options;

namespace moe {
namespace {

constexpr double kGiB = 1024.0 * 1024 * 1024;

struct PlanOptions {
  Workload work;
  std::string config, model_preset, hardware = "cpu";
  int tp = 1, ep = 1, dp = 0;
  int nodes = 1, ranks_per_node = 1;
  std::vector<std::string> calibration_files;
  bool rank = false, projection = false, json = false;
  Hardware overrides;  // only the fields given on the command line are used
  po::variables_map vm;
};

std::optional<PlanOptions> parse_plan_options(int argc, char** argv) {
  PlanOptions o;
  Hardware& h = o.overrides;
  po::options_description desc(
      "usage: moe-plan [--config FILE | --model PRESET] [layout] [cluster] [--calibrate FILE...]\n"
      "Predicts step time, collective volumes and memory per rank of a training step");
  desc.add_options()
      ("help,h", "print this help and exit")
      ("config", po::value(&o.config), "model INI (moe-train keys; others are ignored)")
      ("model", po::value(&o.model_preset), "switch-base-128 | switch-c (a preset workload)")
      ("tensor-model-parallel-size", po::value(&o.tp)->default_value(o.tp), "tp")
      ("expert-model-parallel-size", po::value(&o.ep)->default_value(o.ep), "ep (divides dp)")
      ("data-parallel-size", po::value(&o.dp)->default_value(o.dp), "dp (0: ranks / tp)")
      ("nodes", po::value(&o.nodes)->default_value(o.nodes), "nodes")
      ("gpus-per-node", po::value(&o.ranks_per_node)->default_value(o.ranks_per_node),
       "GPUs (ranks) per node")
      ("hardware", po::value(&o.hardware)->default_value(o.hardware),
       "cpu (the defaults below, or --calibrate) | h200")
      ("calibrate", po::value(&o.calibration_files)->composing(),
       "benchmark JSON of this machine: plan_calibrate, bench_step, bench_alltoall (repeatable)")
      ("gemm-gflops", po::value(&h.gemm_gflops), "sustained GEMM rate per rank")
      ("attention-gflops", po::value(&h.attention_gflops), "attention core rate per rank")
      ("memory-gbps", po::value(&h.memory_gbps), "memory bandwidth per rank")
      ("memory-gib", po::value(&h.memory_gib), "memory per rank")
      ("intra-node-gbps", po::value(&h.intra_gbps), "per-rank link bandwidth on one node")
      ("inter-node-gbps", po::value(&h.inter_gbps), "per-rank link bandwidth across nodes")
      ("intra-node-latency-us", po::value(&h.intra_latency_us), "per step of a collective")
      ("inter-node-latency-us", po::value(&h.inter_latency_us), "per step of a collective")
      ("expert-imbalance", po::value(&h.expert_imbalance),
       "busiest rank's expert rows / the mean")
      ("grad-overlap", po::value(&h.grad_overlap),
       "fraction of the gradient all-reduce hidden under backward (0..1)")
      ("rank-layouts", po::bool_switch(&o.rank), "rank every valid layout of the cluster")
      ("projection", po::bool_switch(&o.projection),
       "the Switch-Base-128 and Switch-C projection tables on 8..1024 H200")
      ("json", po::bool_switch(&o.json), "end with one JSON line of the prediction");
  add_workload_options(desc, o.work);
  try {
    po::store(po::command_line_parser(argc, argv).options(desc).run(), o.vm);
    if (o.vm.count("config")) read_workload_config(o.vm["config"].as<std::string>(), desc, o.vm);
    po::notify(o.vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  if (o.vm.count("help")) {
    std::cout << desc << "\n";
    return std::nullopt;
  }
  if (o.vm.count("config") && o.vm.count("model"))
    throw UsageError("give --config or --model, not both");
  if (o.nodes < 1 || o.ranks_per_node < 1)
    throw UsageError("--nodes and --gpus-per-node must be at least 1");
  return o;
}

Hardware make_hardware(const PlanOptions& o, std::vector<std::string>& notes) {
  Hardware hw;
  if (o.hardware == "h200") {
    hw = preset_hardware("h200", o.nodes, o.ranks_per_node);
  } else if (o.hardware == "cpu") {
    hw.name = "CPU ranks (defaults; --calibrate measures this machine)";
    hw.nodes = o.nodes;
    hw.ranks_per_node = o.ranks_per_node;
    hw.grad_overlap = 0.0;  // MPI progresses a non-blocking all-reduce only inside MPI calls
  } else {
    throw UsageError("--hardware must be cpu or h200, not '" + o.hardware + "'");
  }
  notes = calibrate(hw, o.calibration_files);
  if (!o.calibration_files.empty()) hw.name = "this machine, calibrated";
  const Hardware& h = o.overrides;
  auto take = [&](const char* flag, double& field, double value) {
    if (o.vm.count(flag)) field = value;
  };
  take("gemm-gflops", hw.gemm_gflops, h.gemm_gflops);
  take("attention-gflops", hw.attention_gflops, h.attention_gflops);
  take("memory-gbps", hw.memory_gbps, h.memory_gbps);
  take("memory-gib", hw.memory_gib, h.memory_gib);
  take("intra-node-gbps", hw.intra_gbps, h.intra_gbps);
  take("inter-node-gbps", hw.inter_gbps, h.inter_gbps);
  take("intra-node-latency-us", hw.intra_latency_us, h.intra_latency_us);
  take("inter-node-latency-us", hw.inter_latency_us, h.inter_latency_us);
  take("expert-imbalance", hw.expert_imbalance, h.expert_imbalance);
  take("grad-overlap", hw.grad_overlap, h.grad_overlap);
  if (hw.gemm_gflops <= 0 || hw.attention_gflops <= 0 || hw.memory_gbps <= 0 ||
      hw.intra_gbps <= 0 || hw.inter_gbps <= 0 || hw.memory_gib <= 0)
    throw UsageError("rates, bandwidths and memory must be positive");
  if (hw.grad_overlap < 0 || hw.grad_overlap > 1)
    throw UsageError("--grad-overlap must be between 0 and 1");
  if (hw.expert_imbalance < 1) throw UsageError("--expert-imbalance must be at least 1");
  return hw;
}

void print_model(const Workload& w) {
  const ModelConfig& m = w.model;
  const ParamCounts p = count_params(m, PlanLayout{});
  std::printf("model: L=%d C=%d heads=%d F=%d E=%d freq=%d k=%d V=%d T=%d; micro-batch %d, "
              "global batch %d, capacity factor %.2f\n",
              m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size,
              m.num_experts, m.moe_layer_freq, m.moe_router_topk, m.vocab_size, w.seq_length,
              w.micro_batch_size, w.global_batch_size, w.capacity_factor);
  std::printf("parameters: %.4g total, %.4g matmul weights per token\n", p.total,
              p.active_per_token);
}

void print_assumptions(const Hardware& hw, const std::vector<std::string>& notes) {
  std::printf("assumptions:\n");
  for (const std::string& line : hw.describe()) std::printf("  %s\n", line.c_str());
  for (const std::string& line : notes) std::printf("  calibrated from %s\n", line.c_str());
  std::printf("  model: see launcher/perf_model.cpp (FLOPs, bytes and collectives per step)\n");
}

void print_prediction(const StepPrediction& p, const Hardware& hw) {
  std::printf("\nlayout %s (%d ranks): step %.2f ms, %.0f tokens/s, %.3f model TFLOP/s per rank\n",
              p.layout.str().c_str(), p.layout.world(), p.step_ms, p.tokens_per_sec,
              p.model_tflops_per_rank);
  std::printf("  %-16s %12s %7s\n", "phase", "ms/step", "share");
  for (const auto& [name, ms] : p.breakdown_ms)
    std::printf("  %-16s %12.3f %6.1f%%\n", name.c_str(), ms, 100 * ms / p.step_ms);
  std::printf("  bytes sent per rank per step: all-to-all %.4g, tp all-reduce %.4g, dp gradient "
              "all-reduce %.4g, expert gradient all-reduce %.4g\n",
              p.volumes.alltoall, p.volumes.tp_allreduce, p.volumes.dp_allreduce,
              p.volumes.expert_dp_allreduce);
  std::printf("  memory per rank: weights %.3f GiB, gradients %.3f, optimizer %.3f, activations "
              "%.3f, total %.3f of %.1f GiB: %s\n",
              p.memory.weights / kGiB, p.memory.grads / kGiB, p.memory.optimizer / kGiB,
              p.memory.activations / kGiB, p.memory.total() / kGiB, hw.memory_gib,
              p.fits ? "fits" : "DOES NOT FIT");
}

nlohmann::json prediction_json(const StepPrediction& p) {
  nlohmann::json breakdown = nlohmann::json::object();
  for (const auto& [name, ms] : p.breakdown_ms) breakdown[name] = ms;
  return {{"tp", p.layout.tp}, {"ep", p.layout.ep}, {"dp", p.layout.dp},
          {"step_ms", p.step_ms}, {"tokens_per_sec", p.tokens_per_sec},
          {"breakdown_ms", breakdown},
          {"volumes_bytes", {{"alltoall", p.volumes.alltoall},
                             {"tp_allreduce", p.volumes.tp_allreduce},
                             {"dp_allreduce", p.volumes.dp_allreduce},
                             {"expert_dp_allreduce", p.volumes.expert_dp_allreduce}}},
          {"memory_bytes", {{"weights", p.memory.weights}, {"grads", p.memory.grads},
                            {"optimizer", p.memory.optimizer},
                            {"activations", p.memory.activations},
                            {"total", p.memory.total()}}},
          {"fits", p.fits}};
}

void print_ranking(const std::vector<StepPrediction>& ranked, size_t limit) {
  std::printf("\n%4s %-18s %10s %12s %10s %10s %10s %s\n", "rank", "layout", "step ms",
              "tokens/s", "a2a ms", "mem GiB", "a2a MB", "");
  for (size_t i = 0; i < ranked.size() && i < limit; ++i) {
    const StepPrediction& p = ranked[i];
    std::printf("%4zu %-18s %10.2f %12.0f %10.2f %10.2f %10.1f %s\n", i + 1,
                p.layout.str().c_str(), p.step_ms, p.tokens_per_sec, p.ms("all_to_all"),
                p.memory.total() / kGiB, p.volumes.alltoall / 1e6, p.fits ? "" : "does not fit");
  }
  if (ranked.size() > limit) std::printf("     (%zu more)\n", ranked.size() - limit);
}

// The best fitting layout of each preset on 8..1024 H200 (8 per node), every assumption shown.
void print_projection() {
  std::printf("Projection: decoder-only analogues of the Switch Transformer models on H200 "
              "clusters (8 GPUs per node); the fastest layout that fits in memory.\n\n");
  print_assumptions(preset_hardware("h200", 1, 8), {});
  for (const char* preset : {"switch-base-128", "switch-c"}) {
    const Workload w = preset_workload(preset);
    std::printf("\n%s: ", preset);
    print_model(w);
    std::printf("\n| GPUs | best layout | step ms | tokens/s | TFLOP/s per GPU | MFU | "
                "all-to-all ms | grad all-reduce ms | memory GiB per GPU | layouts that fit |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (int gpus = 8; gpus <= 1024; gpus *= 2) {
      const Hardware hw = preset_hardware("h200", gpus / 8, 8);
      const std::vector<StepPrediction> ranked = rank_layouts(w, hw);
      int fitting = 0;
      for (const StepPrediction& p : ranked) fitting += p.fits ? 1 : 0;
      if (fitting == 0) {
        double least = 0;
        for (const StepPrediction& p : ranked)
          least = least == 0 ? p.memory.total() : std::min(least, p.memory.total());
        std::printf("| %d | none fits (least %.0f GiB per GPU) | | | | | | | | 0 of %zu |\n", gpus,
                    least / kGiB, ranked.size());
        continue;
      }
      const StepPrediction& best = ranked.front();
      std::printf("| %d | %s | %.1f | %.3g | %.0f | %.2f | %.1f | %.1f | %.1f | %d of %zu |\n",
                  gpus, best.layout.str().c_str(), best.step_ms, best.tokens_per_sec,
                  best.model_tflops_per_rank, best.model_tflops_per_rank / 989.0,
                  best.ms("all_to_all"), best.ms("grad_allreduce"),
                  best.memory.total() / kGiB, fitting, ranked.size());
    }
  }
  std::printf("\nMFU = model FLOPs (6 x matmul weights per token + 12 L T C attention) / "
              "(989 TFLOP/s bf16 dense peak).\n");
}

int run(int argc, char** argv) {
  std::optional<PlanOptions> parsed = parse_plan_options(argc, argv);
  if (!parsed) return 0;
  PlanOptions& o = *parsed;
  if (o.projection) {
    print_projection();
    return 0;
  }
  if (!o.model_preset.empty()) {
    const Workload preset = preset_workload(o.model_preset);
    // Flags given on the command line win over the preset.
    Workload given = o.work;
    o.work = preset;
    auto take = [&](const char* flag, auto& field, auto value) {
      if (!o.vm[flag].defaulted()) field = value;
    };
    take("micro-batch-size", o.work.micro_batch_size, given.micro_batch_size);
    take("global-batch-size", o.work.global_batch_size, given.global_batch_size);
    take("seq-length", o.work.seq_length, given.seq_length);
    take("moe-expert-capacity-factor", o.work.capacity_factor, given.capacity_factor);
  }
  std::vector<std::string> notes;
  const Hardware hw = make_hardware(o, notes);
  const int world = hw.nodes * hw.ranks_per_node;
  const PlanLayout layout{o.tp, o.ep, o.dp > 0 ? o.dp : world / o.tp};
  if (!o.rank) validate_plan(o.work, layout, hw);  // a bad layout is one line, before any output
  print_model(o.work);
  print_assumptions(hw, notes);
  if (o.rank) {
    const std::vector<StepPrediction> ranked = rank_layouts(o.work, hw);
    if (ranked.empty())
      throw UsageError("no valid layout of this model on " +
                       std::to_string(hw.nodes * hw.ranks_per_node) + " ranks");
    print_ranking(ranked, 20);
    if (o.json) {
      nlohmann::json all = nlohmann::json::array();
      for (const StepPrediction& p : ranked) all.push_back(prediction_json(p));
      std::cout << "\n" << nlohmann::json{{"plan", "rank_layouts"}, {"layouts", all}}.dump() << std::endl;
    }
    return 0;
  }
  const StepPrediction p = predict_step(o.work, layout, hw);
  print_prediction(p, hw);
  if (o.json) std::cout << "\n" << prediction_json(p).dump() << std::endl;
  return 0;
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  try {
    return moe::run(argc, argv);
  } catch (const moe::UsageError& e) {
    std::fprintf(stderr, "moe-plan: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-plan: error: %s\n", e.what());
    return 1;
  }
}
