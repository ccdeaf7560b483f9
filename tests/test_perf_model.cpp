// moe-plan's performance model (launcher/perf_model.h): parameter counts against the model's
// own ParamLayout, collective volumes and memory by hand for switch-small, the scaling
// properties of the step prediction, layout validation and ranking, and calibration files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.h"
#include "launcher/perf_model.h"
#include "model/parameters.h"
#include "tests/expect_error.h"

namespace moe {
namespace {

using moe::testing::error_message;

// configs/switch-small.ini with global batch 32: L4 C256 NH4 F1024 E8 freq2 k1 V256 T128.
Workload switch_small() {
  Workload w;
  w.model.num_layers = 4;
  w.model.hidden_size = 256;
  w.model.num_attention_heads = 4;
  w.model.ffn_hidden_size = 1024;
  w.model.num_experts = 8;
  w.model.moe_layer_freq = 2;
  w.model.moe_router_topk = 1;
  w.model.vocab_size = 256;
  w.model.max_position_embeddings = 1024;
  w.seq_length = 128;
  w.micro_batch_size = 16;
  w.global_batch_size = 32;
  w.capacity_factor = 1.25;
  return w;
}

Hardware cpu_ranks(int ranks) {
  Hardware hw;
  hw.ranks_per_node = ranks;
  return hw;
}

// The counts must be exactly what the trainer allocates, on every tp rank and expert shard.
TEST(PerfModel, ParamCountsMatchTheModelsOwnLayout) {
  const ModelConfig model = switch_small().model;
  const ParamCounts whole = count_params(model, PlanLayout{});
  EXPECT_EQ(whole.total, static_cast<double>(ParamLayout(model).total_floats()));
  EXPECT_EQ(whole.dense_per_rank + whole.expert_per_rank, whole.total);
  for (int tp : {1, 2, 4})
    for (int ep : {1, 2, 4, 8}) {
      const ParamCounts rank = count_params(model, PlanLayout{tp, ep, ep});
      const int local = model.num_experts / ep;
      for (int tp_rank = 0; tp_rank < tp; ++tp_rank) {
        const ParamLayout layout(model, tp_rank, tp, local * (ep - 1), local);
        EXPECT_EQ(rank.dense_per_rank + rank.expert_per_rank,
                  static_cast<double>(layout.total_floats()))
            << "tp " << tp << " ep " << ep;
      }
    }
}

TEST(PerfModel, ActiveParametersCountTopKExperts) {
  Workload w = switch_small();
  const double C = 256, F = 1024, V = 256;
  // logits VC + 4 layers of attention 4C^2 + 2 dense FFNs 2CF + 2 Switch layers (k 2CF + EC)
  EXPECT_EQ(count_params(w.model, {}).active_per_token,
            V * C + 4 * 4 * C * C + 2 * 2 * C * F + 2 * (2 * C * F + 8 * C));
  w.model.moe_router_topk = 2;
  EXPECT_EQ(count_params(w.model, {}).active_per_token,
            V * C + 4 * 4 * C * C + 2 * 2 * C * F + 2 * (2 * 2 * C * F + 8 * C));
}

TEST(PerfModel, AllToAllVolumeByHand) {
  const Workload w = switch_small();
  const Hardware hw = cpu_ranks(2);
  // One rank: no exchange, no gradient reduction.
  const Volumes one = estimate_volumes(w, {1, 1, 1}, hw);
  EXPECT_EQ(one.alltoall, 0);
  EXPECT_EQ(one.tp_allreduce, 0);
  EXPECT_EQ(one.dp_allreduce, 0);
  EXPECT_EQ(one.expert_dp_allreduce, 0);
  // ep 2: 1 micro-step of 16 x 128 tokens per rank, all kept (cf 1.25 >= 1), 2 Switch layers,
  // 4 exchanges each, 256 fp32 per row, half of the rows leave the rank.
  const Volumes ep2 = estimate_volumes(w, {1, 2, 2}, hw);
  EXPECT_DOUBLE_EQ(ep2.alltoall, 2.0 * 4 * 2048 * 256 * 4 / 2);
  // Dense gradients: ring all-reduce over dp 2 sends 2(n-1)/n = 1 buffer; experts are not
  // replicated at ep = dp (expert-dp group of one).
  const ParamCounts p = count_params(w.model, {1, 2, 2});
  EXPECT_DOUBLE_EQ(ep2.dp_allreduce, p.dense_per_rank * 4);
  EXPECT_EQ(ep2.expert_dp_allreduce, 0);
  // dp 2 without ep: experts replicated, reduced over both ranks.
  const Volumes dp2 = estimate_volumes(w, {1, 1, 2}, hw);
  EXPECT_EQ(dp2.alltoall, 0);
  EXPECT_DOUBLE_EQ(dp2.expert_dp_allreduce, count_params(w.model, {1, 1, 2}).expert_per_rank * 4);
  // A capacity factor below 1 drops what does not fit: the volume shrinks with it.
  Workload tight = w;
  tight.capacity_factor = 0.5;
  EXPECT_DOUBLE_EQ(estimate_volumes(tight, {1, 2, 2}, hw).alltoall, ep2.alltoall * 0.5);
}

TEST(PerfModel, TensorParallelVolumeByHand) {
  const Workload w = switch_small();
  // tp 2, dp 1: 32 / 16 = 2 micro-steps, each with 12 all-reduces (attention 2 per block of
  // 4, dense FFN 2 per dense block of 2) moving 2(tp-1)/tp of a BTC buffer, and 4 all-gathers
  // (2 per Switch layer) moving (tp-1)/tp of one.
  const double buffer = 16.0 * 128 * 256 * 4;
  const Volumes v = estimate_volumes(w, {2, 1, 1}, cpu_ranks(2));
  EXPECT_DOUBLE_EQ(v.tp_allreduce, 2 * buffer * 0.5 * (2 * (8 + 4) + 4));
}

TEST(PerfModel, MemoryIsStateTimesParametersPlusLinearActivations) {
  const Workload w = switch_small();
  const PlanLayout layout{1, 2, 2};
  const ParamCounts p = count_params(w.model, layout);
  const MemoryEstimate m = estimate_memory(w, layout, 4, 4, 8, 4);
  const double params = p.dense_per_rank + p.expert_per_rank;
  EXPECT_DOUBLE_EQ(m.weights, params * 4);
  EXPECT_DOUBLE_EQ(m.grads, params * 4);
  EXPECT_DOUBLE_EQ(m.optimizer, params * 8);
  EXPECT_DOUBLE_EQ(m.total(), m.weights + m.grads + m.optimizer + m.activations);
  // Every activation buffer is proportional to the micro-batch.
  Workload twice = w;
  twice.micro_batch_size = 32;
  EXPECT_NEAR(estimate_memory(twice, layout, 4, 4, 8, 4).activations, 2 * m.activations,
              1e-6 * m.activations);
  // bf16 activations halve them; bf16 weights halve the weights only.
  EXPECT_DOUBLE_EQ(estimate_memory(w, layout, 2, 4, 8, 2).activations, m.activations / 2);
  // The logits alone, B T V floats, are a lower bound.
  EXPECT_GT(m.activations, 16.0 * 128 * 256 * 4);
  // Expert parallelism divides the expert weights.
  EXPECT_DOUBLE_EQ(count_params(w.model, {1, 1, 2}).expert_per_rank, 2 * p.expert_per_rank);
}

TEST(PerfModel, StepIsTheSumOfItsPhasesAndScalesWithTheRates) {
  const Workload w = switch_small();
  Hardware hw = cpu_ranks(2);
  const StepPrediction base = predict_step(w, {1, 2, 2}, hw);
  double sum = 0;
  for (const auto& [name, ms] : base.breakdown_ms) {
    EXPECT_GE(ms, 0) << name;
    sum += ms;
  }
  EXPECT_NEAR(base.step_ms, sum, 1e-9 * sum);
  EXPECT_NEAR(base.tokens_per_sec, 32 * 128 / (base.step_ms * 1e-3), 1e-6 * base.tokens_per_sec);
  EXPECT_GT(base.ms("all_to_all"), 0);
  hw.gemm_gflops *= 2;
  const StepPrediction faster = predict_step(w, {1, 2, 2}, hw);
  EXPECT_NEAR(faster.ms("dense_gemm"), base.ms("dense_gemm") / 2, 1e-9);
  EXPECT_NEAR(faster.ms("expert_gemm"), base.ms("expert_gemm") / 2, 1e-9);
  EXPECT_EQ(faster.ms("attention"), base.ms("attention"));
  // Two data-parallel ranks each do half the tokens of one rank.
  const StepPrediction one = predict_step(w, {1, 1, 1}, cpu_ranks(1));
  EXPECT_NEAR(base.ms("dense_gemm"), one.ms("dense_gemm") / 2, 1e-9);
  EXPECT_EQ(one.ms("all_to_all"), 0);
  EXPECT_EQ(one.ms("grad_allreduce"), 0);
}

TEST(PerfModel, ValidationNamesTheViolatedConstraint) {
  const Workload w = switch_small();
  EXPECT_NE(error_message<UsageError>([&] { validate_plan(w, {3, 1, 1}, cpu_ranks(3)); })
                .find("heads"),
            std::string::npos);
  EXPECT_NE(error_message<UsageError>([&] { validate_plan(w, {1, 3, 3}, cpu_ranks(3)); })
                .find("experts"),
            std::string::npos);
  EXPECT_NE(error_message<UsageError>([&] { validate_plan(w, {1, 4, 2}, cpu_ranks(2)); })
                .find("does not divide dp"),
            std::string::npos);
  EXPECT_NE(error_message<UsageError>([&] { validate_plan(w, {1, 1, 4}, cpu_ranks(2)); })
                .find("cluster"),
            std::string::npos);
  Workload odd = w;
  odd.global_batch_size = 24;
  EXPECT_NE(error_message<UsageError>([&] { validate_plan(odd, {1, 1, 2}, cpu_ranks(2)); })
                .find("global batch"),
            std::string::npos);
}

TEST(PerfModel, RankingPutsFittingLayoutsFirstFastestFirst) {
  const Workload w = preset_workload("switch-base-128");
  const std::vector<StepPrediction> ranked = rank_layouts(w, preset_hardware("h200", 2, 8));
  ASSERT_FALSE(ranked.empty());
  for (size_t i = 1; i < ranked.size(); ++i) {
    EXPECT_TRUE(ranked[i - 1].fits || !ranked[i].fits);
    if (ranked[i - 1].fits == ranked[i].fits) {
      EXPECT_LE(ranked[i - 1].step_ms, ranked[i].step_ms);
    }
    EXPECT_EQ(ranked[i].layout.world(), 16);
  }
  // A trillion parameters at 18 bytes each cannot fit on 8 GPUs of 141 GB, but do on 1024.
  const Workload c = preset_workload("switch-c");
  EXPECT_GT(count_params(c.model, {}).total, 1.4e12);
  for (const StepPrediction& p : rank_layouts(c, preset_hardware("h200", 1, 8)))
    EXPECT_FALSE(p.fits) << p.layout.str();
  const std::vector<StepPrediction> big = rank_layouts(c, preset_hardware("h200", 128, 8));
  ASSERT_FALSE(big.empty());
  EXPECT_TRUE(big.front().fits);
}

TEST(PerfModel, CalibrationReadsBenchmarkJson) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("perf_model_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string rates = (dir / "rates.json").string(), a2a = (dir / "a2a.json").string(),
                    bad = (dir / "bad.json").string();
  std::ofstream(rates) << "some text first\n{\"benchmark\": \"plan_calibrate\", \"threads\": 1, "
                          "\"gemm_gflops\": 123.5, \"attention_gflops\": 45.25, "
                          "\"memory_gbps\": 11.5}\n";
  std::ofstream(a2a) << R"({"benchmark": "alltoall", "nranks": 2, "rows": [
      {"ours": {"size": 1024, "time_us": 7.5, "busbw": 0.1}},
      {"ours": {"size": 4194304, "time_us": 200, "busbw": 10.5}}]})";
  std::ofstream(bad) << R"({"benchmark": "something else"})";
  Hardware hw;
  const std::vector<std::string> notes = calibrate(hw, {rates, a2a});
  EXPECT_EQ(notes.size(), 2u);
  EXPECT_EQ(hw.gemm_gflops, 123.5);
  EXPECT_EQ(hw.attention_gflops, 45.25);
  EXPECT_EQ(hw.memory_gbps, 11.5);
  EXPECT_EQ(hw.intra_gbps, 10.5);
  EXPECT_EQ(hw.intra_latency_us, 7.5);
  EXPECT_NE(error_message<UsageError>([&] { calibrate(hw, {bad}); }).find("bad.json"),
            std::string::npos);
  EXPECT_NE(error_message<UsageError>([&] { calibrate(hw, {(dir / "missing").string()}); })
                .find("cannot read"),
            std::string::npos);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe
