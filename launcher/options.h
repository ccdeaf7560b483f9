// moe-train and moe-eval command lines (DESIGN.md, Command line): Megatron-LM flag names,
// parsed by Boost.Program_options; `--config FILE` reads the same keys from an INI file and
// flags on the command line win.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/backend.h"
#include "launcher/data.h"
#include "model/config.h"
#include "model/optimizer.h"

namespace moe {

struct TrainOptions {
  ModelConfig model;
  int seq_length = 128;

  // router and losses
  double capacity_factor = 1.25;       // --moe-expert-capacity-factor; 0 = dropless
  double eval_capacity_factor = 2.0;   // --moe-eval-capacity-factor; 0 = dropless
  DropPolicy drop_policy = DropPolicy::kPosition;
  double aux_loss_coeff = 0.01;
  double z_loss_coeff = 0.001;
  double jitter_eps = 0.0;
  double init_scale = 0.1;
  uint64_t seed = 1234;

  // batch and schedule
  int micro_batch_size = 16;
  int global_batch_size = 0;  // 0: micro-batch x data-parallel size
  int64_t train_iters = 100;
  LrSchedule schedule;
  AdamWHyper adamw;
  double clip_grad = 1.0;

  // parallel layout
  int tensor_parallel = 1;
  int expert_parallel = 1;

  // data
  std::string data_path;
  DataFormat data_format = DataFormat::kAuto;
  DataOrder data_order = DataOrder::kShuffle;
  double valid_fraction = 0.1;
  int64_t eval_interval = 0;  // 0: evaluate at the end only
  int64_t eval_iters = 0;     // micro-batches per evaluation; 0: every validation window
  int64_t log_interval = 10;

  // files
  std::string save_dir;
  std::string load_dir;
  int64_t save_interval = 0;
  int64_t exit_interval = 0;
  std::string init_from;
  std::string export_safetensors;
  std::string metrics_file;
  int keep_checkpoints = 0;  // 0 keeps all

  // runtime
  std::string device = "cpu";
  int threads = 0;  // 0: OpenMP's default
  double distributed_timeout = 60.0;
  int max_skipped_iters = 5;

  // fault injection, for the fault-tolerance tests: at these iterations the last rank's
  // gradient turns non-finite after its reduction, as a rank-local overflow would.
  std::vector<int64_t> inject_nan_iterations;
};

struct EvalOptions {
  std::string model_path;  // --model FILE.safetensors
  std::string load_dir;    // --load DIR
  std::string data_path;
  DataFormat data_format = DataFormat::kAuto;
  int seq_length = 0;  // 0: the model's max positions
  int micro_batch_size = 8;
  int64_t eval_iters = 0;  // 0: every window
  double eval_capacity_factor = 2.0;
  DropPolicy drop_policy = DropPolicy::kPosition;
  int threads = 0;
  std::string device = "cpu";  // cpu | cuda
  std::string dump_routing;  // --dump-routing FILE: per-token expert choices (launcher/routing_dump.h)
};

// Parse and validate; nullopt after printing --help. UsageError (exit 2) on a bad flag, an
// unknown config key, a value that is not a number, or an inconsistent combination.
std::optional<TrainOptions> parse_train_options(int argc, char** argv);
std::optional<EvalOptions> parse_eval_options(int argc, char** argv);

DropPolicy parse_drop_policy(const std::string& text);

}  // namespace moe
