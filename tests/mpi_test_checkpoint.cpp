// Checkpoints: save-then-load against no interruption (DESIGN.md, tests in tiers). On the saving
// layout the resumed run is identical bit for bit; on another layout it agrees within 1e-4;
// every rank of every layout, and moe-eval's one-process model, assembles exactly the saved
// tensors; incomplete checkpoints and other models are refused; --keep-checkpoints prunes.
// Runs under mpiexec at 2 and 4 ranks and alone at 1; every rank runs every test in the same
// order (Trainers are collective), and every comparison prints the worst difference it saw.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "dist/communicator.h"
#include "launcher/trainer.h"
#include "model/checkpoint.h"
#include "model/safetensors.h"
#include "tests/expect_error.h"
#include "tests/mpi_testing.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

using moe::testing::world_rank;
using moe::testing::world_size;

void barrier() { MPI_Barrier(MPI_COMM_WORLD); }

// The largest value over every rank, printed once by rank 0.
double report_worst(const char* what, double mine) {
  double all = std::isnan(mine) ? INFINITY : mine;
  MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (world_rank() == 0)
    std::printf("  %-60s worst over %d ranks = %.3e\n", what, world_size(), all);
  return all;
}

struct Layout {
  const char* name;
  int tp, ep;
};

// Layouts that fit the running world (dp = world / tp).
std::vector<Layout> layouts() {
  switch (world_size()) {
    case 1:
      return {{"tp1", 1, 1}};
    case 2:
      return {{"ep2", 1, 2}, {"tp2", 2, 1}, {"dp2", 1, 1}};
    case 4:
      return {{"tp2xdp2xep2", 2, 2}, {"ep4", 1, 4}, {"dp4", 1, 1}};
    default:
      return {{"dp", 1, 1}};
  }
}

// A fresh directory for one test, shared by every rank (rank 0 creates it, the name is
// broadcast) and removed at the end.
class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char path[4096] = {};
    if (world_rank() == 0) {
      std::string pattern = ::testing::TempDir() + "moe_checkpoint_XXXXXX";
      ASSERT_NE(mkdtemp(pattern.data()), nullptr);
      std::snprintf(path, sizeof path, "%s", pattern.c_str());
      write_data((fs::path(path) / "data.txt").string());
    }
    MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
    dir_ = path;
  }
  void TearDown() override {
    barrier();
    if (world_rank() == 0) fs::remove_all(dir_);
  }

  // 6 KB of pseudo-text: enough windows that 6 iterations never repeat one.
  static void write_data(const std::string& path) {
    static const char* words[] = {"the ", "king ",  "of ",  "what ", "shall ", "we ",  "say, ",
                                  "my ",  "lord. ", "and ", "yet ",  "thou ",  "art\n"};
    std::ofstream out(path);
    uint32_t state = 12345;
    for (int i = 0; i < 1500; ++i) {
      state = state * 1664525u + 1013904223u;
      out << words[(state >> 16) % 13];
    }
  }

  // A tiny Switch model (2 layers, the second one 4 experts), dropless, 6 iterations of 8
  // windows. Jitter is on: its draws are pure functions of (seed, iteration), as resuming needs.
  TrainOptions options(const Layout& layout) const {
    TrainOptions o = moe::testing::tiny_train_options();
    o.micro_batch_size = 2;
    o.global_batch_size = 8;
    o.eval_capacity_factor = 0.0;
    o.jitter_eps = 0.01;
    o.train_iters = 6;
    o.schedule.lr = 1e-3;
    o.schedule.warmup_iters = 2;
    o.schedule.train_iters = o.train_iters;
    o.tensor_parallel = layout.tp;
    o.expert_parallel = layout.ep;
    o.data_path = (fs::path(dir_) / "data.txt").string();
    o.log_interval = 1000;
    return o;
  }

  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // Runs a Trainer to its end; returns this rank's final parameters.
  std::vector<float> train(const TrainOptions& o, int64_t expect_resumed = 0) {
    Trainer trainer(o, world_size(), world_rank());
    EXPECT_EQ(trainer.resumed_iteration(), expect_resumed);
    EXPECT_EQ(trainer.run(), 0);
    return trainer.host_params();
  }

  std::string dir_;
};

// (1) Interrupted at iteration 3 and resumed on the same layout: the run is the uninterrupted
// one, bit for bit, on every rank.
TEST_F(CheckpointTest, SameLayoutResumeIsBitIdentical) {
  for (const Layout& layout : layouts()) {
    const std::vector<float> uninterrupted = train(options(layout));

    TrainOptions first = options(layout);
    first.save_dir = path(std::string("save_") + layout.name);
    first.exit_interval = 3;
    train(first);
    TrainOptions second = options(layout);
    second.load_dir = first.save_dir;
    const std::vector<float> resumed = train(second, /*expect_resumed=*/3);

    ASSERT_EQ(resumed.size(), uninterrupted.size());
    double worst = 0;
    for (size_t i = 0; i < resumed.size(); ++i)
      worst = std::max(worst, std::fabs(double(resumed[i]) - uninterrupted[i]));
    const bool identical =
        std::memcmp(resumed.data(), uninterrupted.data(), resumed.size() * sizeof(float)) == 0;
    EXPECT_TRUE(identical) << layout.name << ": rank " << world_rank() << " differs by " << worst;
    const std::string what = std::string(layout.name) + ": resumed vs uninterrupted |diff|";
    EXPECT_EQ(report_worst(what.c_str(), worst), 0.0);
  }
}

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

// ||a - b|| / ||b||.
double relative_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    norm += double(b[i]) * b[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

// (2) Saved on one layout, resumed on another (tp, ep and dp change): every rank assembles its
// shards from the saved ones, and the run continues as the uninterrupted one within 1e-4.
TEST_F(CheckpointTest, OtherLayoutResumeContinues) {
  if (world_size() == 1) GTEST_SKIP() << "one rank has one layout";
  const std::vector<Layout> all = layouts();
  // Each pair in both directions: ep2 <-> tp2 at 2 ranks, tp2xdp2xep2 <-> ep4 at 4.
  for (const auto& [from, to] : {std::pair{all[0], all[1]}, std::pair{all[1], all[0]}}) {
    const std::string tag = std::string(from.name) + "_to_" + to.name;
    // The load-balancing loss is a nonlinear function of each micro-step's tokens, and the
    // number of micro-steps follows dp (DESIGN.md, Losses): only without it do two layouts
    // with different dp train the same model. The z-loss is a mean over tokens and stays on.
    auto base = [&](const Layout& layout) {
      TrainOptions o = options(layout);
      o.aux_loss_coeff = 0.0;
      return o;
    };
    TrainOptions reference = base(from);
    reference.metrics_file = path(tag + "_reference.jsonl");
    reference.export_safetensors = path(tag + "_reference.safetensors");
    train(reference);

    TrainOptions first = base(from);
    first.save_dir = path("save_" + tag);
    first.exit_interval = 3;
    train(first);
    TrainOptions second = base(to);
    second.load_dir = first.save_dir;
    second.metrics_file = path(tag + "_resumed.jsonl");
    second.export_safetensors = path(tag + "_resumed.safetensors");
    train(second, /*expect_resumed=*/3);

    double worst_loss = 0, worst_weight = 0, worst_tensor = 0;
    if (world_rank() == 0) {
      const auto want = read_metrics(reference.metrics_file);
      const auto got = read_metrics(second.metrics_file);
      ASSERT_EQ(want.size(), 6u);
      ASSERT_EQ(got.size(), 3u);  // iterations 4, 5, 6
      for (size_t i = 0; i < got.size(); ++i) {
        const auto& w = want[3 + i];
        ASSERT_EQ(got[i]["iteration"], w["iteration"]);
        const double a = got[i]["lm_loss"], b = w["lm_loss"];
        const double relative = std::fabs(a - b) / std::fabs(b);
        worst_loss = std::max(worst_loss, relative);
        EXPECT_LT(relative, 1e-4) << tag << " iteration " << w["iteration"] << ": lm_loss " << a
                                  << " vs " << b;
      }
      // Weights: relative L2 over the whole model within 1e-4, and per tensor within 1e-3 (a
      // misplaced shard is off by O(1)). Per tensor is looser because the key bias of c_attn
      // has an exactly zero gradient (softmax ignores a constant per query), so its gradient is
      // rounding noise, which the layout changes and Adam scales up to O(lr) steps.
      const SafetensorsFile want_weights(reference.export_safetensors);
      const SafetensorsFile got_weights(second.export_safetensors);
      ASSERT_EQ(got_weights.tensors().size(), want_weights.tensors().size());
      std::vector<float> got_all, want_all;
      for (const auto& [name, tensor] : want_weights.tensors()) {
        const std::vector<float>& got = got_weights.expect(name, tensor.shape);
        const double relative = relative_l2(got, tensor.data);
        worst_tensor = std::max(worst_tensor, relative);
        EXPECT_LT(relative, 1e-3) << tag << ": final " << name;
        got_all.insert(got_all.end(), got.begin(), got.end());
        want_all.insert(want_all.end(), tensor.data.begin(), tensor.data.end());
      }
      worst_weight = relative_l2(got_all, want_all);
      EXPECT_LT(worst_weight, 1e-4) << tag << ": final weights";
    }
    report_worst((tag + ": lm_loss after resume, relative").c_str(), worst_loss);
    report_worst((tag + ": final weights, relative L2").c_str(), worst_weight);
    report_worst((tag + ": worst tensor, relative L2").c_str(), worst_tensor);
  }
}

// Every rank of every layout (and the one-process model moe-eval loads) assembles exactly the
// saved values: parameters equal the gathered export, moments equal the one-process load.
TEST_F(CheckpointTest, ReshardedLoadOfEveryLayoutIsExact) {
  const Layout saving = layouts().front();
  TrainOptions o = options(saving);
  o.train_iters = o.schedule.train_iters = 2;
  o.save_dir = path("save");
  o.export_safetensors = path("export.safetensors");
  train(o);
  barrier();  // the export is written by rank 0

  const std::string checkpoint_dir = find_checkpoint(o.save_dir);
  const CheckpointInfo info = read_checkpoint_info(checkpoint_dir);
  EXPECT_EQ(info.iteration, 2);
  EXPECT_EQ(info.optimizer_steps, 2);
  auto self = make_self_communicator();

  // The unsharded model, as moe-eval --load reads it.
  const ParamLayout full(info.config);
  const size_t n = full.total_floats();
  std::vector<float> full_params(n), full_m(n), full_v(n);
  load_checkpoint(checkpoint_dir, info, full, ParallelDims{},
                  {full_params.data(), full_m.data(), full_v.data()}, *self);
  const SafetensorsFile exported(o.export_safetensors);
  double worst_full = 0;
  for (const ParamEntry& entry : full.entries()) {
    const std::vector<float>& want = exported.expect(entry.name, entry.shape);
    for (size_t i = 0; i < entry.numel; ++i)
      worst_full = std::max(worst_full, std::fabs(double(full_params[entry.offset + i]) - want[i]));
  }
  EXPECT_EQ(report_worst("one-process load vs gathered export", worst_full), 0.0);

  // Every rank of these layouts, dealt round-robin over the real ranks.
  struct Target {
    int world, tp, ep;
  };
  const Target targets[] = {{1, 1, 1}, {2, 2, 1}, {2, 1, 2}, {2, 1, 1}, {4, 4, 1},
                            {4, 2, 2}, {4, 1, 4}, {8, 2, 4}, {8, 4, 2}};
  const ModelConfig& c = info.config;
  double worst = 0;
  int job = 0, loads = 0;
  for (const Target& t : targets)
    for (int r = 0; r < t.world; ++r) {
      if (job++ % world_size() != world_rank()) continue;
      const ParallelDims dims = ParallelDims::build(t.world, r, t.tp, t.ep, c.num_attention_heads,
                                                    c.ffn_hidden_size, c.num_experts, 1, 8);
      const ParamLayout layout(c, dims.tp_rank, dims.tp, dims.first_expert(c.num_experts),
                               dims.num_local_experts(c.num_experts));
      const size_t local = layout.total_floats();
      std::vector<float> params(local), m(local), v(local);
      load_checkpoint(checkpoint_dir, info, layout, dims, {params.data(), m.data(), v.data()},
                      *self);
      ++loads;
      for (const ParamEntry& entry : layout.entries()) {
        const ParamEntry& whole = *full.find(entry.name);
        for (size_t i = 0; i < entry.numel; ++i) {
          const size_t at = whole.offset + entry.full_index(i);
          worst = std::max({worst, std::fabs(double(params[entry.offset + i]) - full_params[at]),
                            std::fabs(double(m[entry.offset + i]) - full_m[at]),
                            std::fabs(double(v[entry.offset + i]) - full_v[at])});
        }
      }
    }
  EXPECT_GT(loads, 0);
  EXPECT_EQ(report_worst("every rank of 9 layouts vs the one-process load", worst), 0.0);
}

// Flips one byte in the middle of a file, as a bad disk or a damaged copy would.
void flip_a_byte(const fs::path& file) {
  std::fstream io(file, std::ios::in | std::ios::out | std::ios::binary);
  const auto middle = static_cast<std::streamoff>(fs::file_size(file) / 2);
  io.seekg(middle);
  char byte = 0;
  io.read(&byte, 1);
  byte = static_cast<char>(byte ^ 0x5a);
  io.seekp(middle);
  io.write(&byte, 1);
}

// (3) The newest checkpoint incomplete (no COMPLETE marker) or damaged (a flipped byte, a
// truncated file): --load says why in one line and resumes from the previous one. Named
// directly, a damaged checkpoint is an error; so are a missing directory and another model.
TEST_F(CheckpointTest, IncompleteOrDamagedNewestCheckpointFallsBackToThePreviousOne) {
  TrainOptions o = options(layouts().front());
  o.save_dir = path("save");
  o.save_interval = 1;
  o.exit_interval = 2;
  train(o);
  barrier();
  const fs::path first = fs::path(o.save_dir) / "iter_0000001";
  const fs::path second = fs::path(o.save_dir) / "iter_0000002";
  auto world = make_mpi_world_communicator();
  auto expect_fallback = [&](const std::string& why) {
    const CheckpointChoice choice = choose_checkpoint(o.save_dir, *world);
    EXPECT_EQ(choice.dir, first.string());
    ASSERT_EQ(choice.refused.size(), 1u);
    if (world_rank() == 0) std::printf("  refused: %s\n", choice.refused[0].c_str());
    EXPECT_NE(choice.refused[0].find(second.string()), std::string::npos) << choice.refused[0];
    EXPECT_NE(choice.refused[0].find(why), std::string::npos) << choice.refused[0];
    EXPECT_EQ(choice.refused[0].find('\n'), std::string::npos);
  };
  EXPECT_EQ(choose_checkpoint(o.save_dir, *world).dir, second.string());

  barrier();
  if (world_rank() == 0) fs::remove(second / "COMPLETE");
  barrier();
  expect_fallback("incomplete");
  TrainOptions resume = options(layouts().front());
  resume.load_dir = o.save_dir;
  {
    Trainer trainer(resume, world_size(), world_rank());
    EXPECT_EQ(trainer.resumed_iteration(), 1);
  }

  barrier();
  const std::string last_rank_file =
      read_checkpoint_info(first.string()).ranks.back().file;  // checked on the last rank
  if (world_rank() == 0) {
    std::ofstream(second / "COMPLETE").flush();
    flip_a_byte(second / last_rank_file);
  }
  barrier();
  expect_fallback(last_rank_file + " does not match its xxh64 checksum");
  const std::string damaged =
      testing::error_message<RuntimeError>([&] { choose_checkpoint(second.string(), *world); });
  EXPECT_NE(damaged.find("damaged"), std::string::npos) << damaged;

  barrier();
  if (world_rank() == 0) {
    flip_a_byte(second / last_rank_file);  // undone
    fs::resize_file(second / "metadata.json", fs::file_size(second / "metadata.json") - 3);
  }
  barrier();
  expect_fallback("metadata.json has ");

  resume.load_dir = path("nowhere");
  std::string message =
      testing::error_message<RuntimeError>([&] { Trainer t(resume, world_size(), world_rank()); });
  EXPECT_NE(message.find(resume.load_dir), std::string::npos) << message;

  resume.load_dir = o.save_dir;
  resume.model.num_layers = 3;
  message =
      testing::error_message<UsageError>([&] { Trainer t(resume, world_size(), world_rank()); });
  if (world_rank() == 0) std::printf("  other model: %s\n", message.c_str());
  EXPECT_NE(message.find("num_layers 2, this run has 3"), std::string::npos) << message;
}

// --keep-checkpoints 2 leaves the newest two; `latest` names the last.
TEST_F(CheckpointTest, KeepCheckpointsPrunesTheOldest) {
  TrainOptions o = options(layouts().front());
  o.train_iters = o.schedule.train_iters = 4;
  o.save_dir = path("save");
  o.save_interval = 1;
  o.keep_checkpoints = 2;
  train(o);
  barrier();
  std::vector<std::string> names;
  for (const auto& item : fs::directory_iterator(o.save_dir))
    names.push_back(item.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"iter_0000003", "iter_0000004", "latest"}));
  std::ifstream latest(fs::path(o.save_dir) / "latest");
  int64_t iteration = 0;
  latest >> iteration;
  EXPECT_EQ(iteration, 4);
  const CheckpointInfo info = read_checkpoint_info(find_checkpoint(o.save_dir));
  EXPECT_EQ(info.iteration, 4);
  EXPECT_EQ(static_cast<int>(info.ranks.size()), world_size());
  for (int r = 0; r < world_size(); ++r)
    EXPECT_TRUE(fs::exists(fs::path(o.save_dir) / "iter_0000004" / info.ranks[r].file));
}

}  // namespace
}  // namespace moe
