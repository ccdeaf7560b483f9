// The training loop of moe-train: data, model, optimizer, evaluation, logs and metrics.
//
// One iteration: for each micro-step, read this rank's micro-batch, forward (routing
// statistics summed over the data-parallel group), backward with each loss scaled by
// 1/num_micro; then average gradients over data-parallel ranks, take the global gradient
// norm, clip, and apply AdamW at the scheduled learning rate.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <string>
#include <vector>

#include "core/backend.h"
#include "dist/communicator.h"
#include "dist/parallel_dims.h"
#include "dist/process_groups.h"
#include "launcher/data.h"
#include "launcher/options.h"
#include "model/checkpoint.h"
#include "model/gpt.h"
#include "model/grad_sync.h"
#include "model/optimizer.h"

namespace moe {

// What one iteration measured (DESIGN.md, Formats: the metrics JSONL).
struct IterationMetrics {
  int64_t iteration = 0;
  double lm_loss = 0;              // mean over micro-steps and ranks
  double load_balancing_loss = 0;  // summed over layers, mean over micro-steps
  double z_loss = 0;
  double grad_norm = 0;            // before clipping
  double lr = 0;
  double tokens_per_sec = 0;
  double ms_per_iter = 0;
  double dropped_fraction = 0;
  std::vector<std::vector<double>> expert_load;  // (Switch layers, E) choices per expert
  bool skipped = false;            // a non-finite loss or gradient on any rank: no update
  int stop_signal = 0;             // SIGTERM/SIGINT seen by some rank (agreed by all), or 0
  int stop_signal_rank = -1;       // the highest world rank that saw it
  std::vector<std::pair<std::string, double>> time_breakdown_ms;  // per phase, then "rest"
};

class Trainer {
 public:
  // Builds the parallel layout from the world (ParallelDims validates it) and its groups;
  // with --load, resumes from the checkpoint (on this layout or any other).
  Trainer(const TrainOptions& options, int world_size, int world_rank);
  ~Trainer();
  // Trains from the iteration after the loaded one to --train-iters (or --exit-interval),
  // saving checkpoints with --save; returns the process exit status.
  int run();
  // The iteration the loaded checkpoint ended at (0 without --load), and AdamW's step count.
  int64_t resumed_iteration() const { return resumed_iteration_; }
  int64_t optimizer_steps() const { return optimizer_steps_; }

  // One training iteration (1-based), for tests.
  IterationMetrics train_iteration(int64_t iteration);
  // Mean cross-entropy per target token over the held-out windows (or --eval-iters batches).
  double evaluate();
  GptModel& model() { return *model_; }
  const ParallelDims& dims() const { return dims_; }
  const ParamLayout& layout() const { return *layout_; }
  // The parameters on the host.  (layout.total_floats())
  std::vector<float> host_params();

 private:
  void log_progress(const IterationMetrics& m) const;
  void write_metrics(const IterationMetrics& m);
  void write_eval_metrics(int64_t iteration, double val_loss);
  // The options a resumed run must share with the saving one (see checkpoint.h).
  std::map<std::string, std::string> resume_options() const;
  void write_checkpoint(int64_t iteration);
  void resume_from(const std::string& checkpoint_dir, const CheckpointInfo& info);

  TrainOptions options_;
  ParallelDims dims_;
  ProcessGroups groups_;
  bool is_root_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<DataLoader> data_;
  BatchLayout batch_;
  std::unique_ptr<ParamLayout> layout_;
  std::unique_ptr<GptModel> model_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<GradientSync> grad_sync_;
  int64_t optimizer_steps_ = 0;
  int64_t resumed_iteration_ = 0;
  std::string last_saved_;  // the newest checkpoint this run wrote, "" before the first
  std::ofstream metrics_;
  std::vector<int32_t> inputs_, targets_;  // (micro_batch, T) host staging
};


}  // namespace moe
