#include "launcher/trainer.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "dist/device_groups.h"
#include "dist/watchdog.h"
#include "launcher/device.h"
#include "launcher/stop_signal.h"
#include "model/weights_io.h"

namespace moe {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The vocabulary: --vocab-size when given, else what the data format implies.
int resolve_vocab(int requested, const TokenStream& stream) {
  const int vocab = requested > 0 ? requested : stream.vocab_size;
  if (stream.max_token >= vocab)
    throw UsageError("--vocab-size " + std::to_string(vocab) + " is too small for " +
                     stream.source + ", which holds token " + std::to_string(stream.max_token));
  return vocab;
}

}  // namespace

Trainer::Trainer(const TrainOptions& options, int world_size, int world_rank)
    : options_(options), is_root_(world_rank == 0) {
  if (options_.threads > 0) omp_set_num_threads(options_.threads);
  if (world_size > 1)
    start_collective_watchdog(options_.distributed_timeout, "moe-train", world_rank);
  install_stop_signal_handlers();
  backend_ = make_backend(options_.device);

  TokenStream stream = load_tokens(options_.data_path, options_.data_format);
  options_.model.vocab_size = resolve_vocab(options_.model.vocab_size, stream);
  if (!options_.init_from.empty()) {
    // The file's __metadata__ defines the model's shape; the data must fit it.
    const ModelConfig stored = read_safetensors_config(options_.init_from);
    if (stored.max_position_embeddings < options_.seq_length)
      throw UsageError("--seq-length " + std::to_string(options_.seq_length) + " exceeds the " +
                       std::to_string(stored.max_position_embeddings) + " positions of " +
                       options_.init_from);
    if (stream.max_token >= stored.vocab_size)
      throw UsageError(options_.data_path + " holds token " + std::to_string(stream.max_token) +
                       ", outside the vocabulary of " + options_.init_from);
    options_.model = stored;
  }
  options_.model.validate();

  // The layout is checked once, before any work; every rank reaches the same verdict.
  const ModelConfig& m = options_.model;
  dims_ = ParallelDims::build(world_size, world_rank, options_.tensor_parallel,
                              options_.expert_parallel, m.num_attention_heads, m.ffn_hidden_size,
                              m.num_experts, options_.micro_batch_size, options_.global_batch_size);
  if ((options_.micro_batch_size * options_.seq_length) % dims_.tp != 0)
    throw UsageError("--tensor-model-parallel-size " + std::to_string(dims_.tp) +
                     " must divide the tokens of a micro-batch (" +
                     std::to_string(options_.micro_batch_size * options_.seq_length) + ")");
  options_.global_batch_size = dims_.global_batch_size;
  groups_ = world_size > 1 ? make_process_groups(dims_) : make_single_process_groups();
  // On GPUs the groups move device memory through NCCL (host memory still through MPI).
  if (options_.device == "cuda")
    groups_ = make_device_process_groups(std::move(groups_), options_.distributed_timeout);
  batch_.global_batch_size = dims_.global_batch_size;
  batch_.micro_batch_size = options_.micro_batch_size;
  batch_.dp_size = dims_.dp;
  batch_.dp_rank = dims_.dp_rank;
  batch_.validate();

  DataLoaderOptions data_options;
  data_options.seq_length = options_.seq_length;
  data_options.valid_fraction = options_.valid_fraction;
  data_options.order = options_.data_order;
  data_options.seed = options_.seed;
  data_ = std::make_unique<DataLoader>(std::move(stream), data_options);

  // --load: the checkpoint must be complete and match this run, checked before any work.
  std::string checkpoint_dir;
  CheckpointInfo checkpoint;
  if (!options_.load_dir.empty()) {
    if (!options_.init_from.empty())
      throw UsageError(
          "--load and --init-from exclude each other: a checkpoint holds its own weights");
    const CheckpointChoice choice = choose_checkpoint(options_.load_dir, *groups_.world);
    if (is_root_)
      for (const std::string& line : choice.refused)
        std::fprintf(stderr, "moe-train: %s; resuming from %s\n", line.c_str(),
                     choice.dir.c_str());
    checkpoint_dir = choice.dir;
    checkpoint = read_checkpoint_info(checkpoint_dir);
    check_resumable(checkpoint, options_.model, resume_options(), checkpoint_dir);
  }

  layout_ = std::make_unique<ParamLayout>(options_.model, dims_.tp_rank, dims_.tp,
                                          dims_.first_expert(m.num_experts),
                                          dims_.num_local_experts(m.num_experts));
  model_ = std::make_unique<GptModel>(*backend_, options_.model, *layout_,
                                      options_.micro_batch_size, options_.seq_length,
                                      ModelGroups{*groups_.tp, *groups_.ep, *groups_.world});
  optimizer_ = std::make_unique<AdamW>(*backend_, *layout_, options_.adamw);
  grad_sync_ = std::make_unique<GradientSync>(
      *backend_, *layout_, dims_, GradGroups{*groups_.dp, *groups_.world, *groups_.expert_dp});

  if (!checkpoint_dir.empty()) {
    resume_from(checkpoint_dir, checkpoint);
  } else {
    std::vector<float> initial(layout_->total_floats(), 0.0f);
    if (!options_.init_from.empty())
      import_safetensors(options_.init_from, *layout_, initial.data());
    else
      initialize_parameters(*layout_, options_.seed, options_.init_scale, initial.data());
    backend_->copy_from_host(model_->params(), initial.data(), initial.size() * sizeof(float));
  }

  inputs_.resize(static_cast<size_t>(options_.micro_batch_size) * options_.seq_length);
  targets_.resize(inputs_.size());
  if (is_root_ && !options_.metrics_file.empty()) {
    // A resumed run continues the file of the run it resumes.
    metrics_.open(options_.metrics_file, checkpoint_dir.empty() ? std::ios::trunc : std::ios::app);
    if (!metrics_) throw RuntimeError("--metrics-file: cannot write " + options_.metrics_file);
  }
}

Trainer::~Trainer() = default;

std::vector<float> Trainer::host_params() {
  std::vector<float> values(layout_->total_floats());
  backend_->copy_to_host(values.data(), model_->params(), values.size() * sizeof(float));
  return values;
}

std::map<std::string, std::string> Trainer::resume_options() const {
  // Which windows an iteration reads and every random draw are pure functions of these and
  // the iteration (DESIGN.md, Data and Router), so a checkpoint stores no data position or
  // RNG state: a run that changed one of them would not continue the saved one.
  return {{"seed", std::to_string(options_.seed)},
          {"global_batch_size", std::to_string(dims_.global_batch_size)},
          {"seq_length", std::to_string(options_.seq_length)},
          {"data_order", std::string(data_order_name(options_.data_order))},
          {"train_windows", std::to_string(data_->num_train_windows())}};
}

void Trainer::write_checkpoint(int64_t iteration) {
  const size_t n = layout_->total_floats();
  std::vector<float> params = host_params(), exp_avg(n), exp_avg_sq(n);
  backend_->copy_to_host(exp_avg.data(), optimizer_->m(), n * sizeof(float));
  backend_->copy_to_host(exp_avg_sq.data(), optimizer_->v(), n * sizeof(float));
  CheckpointInfo info;
  info.iteration = iteration;
  info.optimizer_steps = optimizer_steps_;
  info.config = options_.model;
  info.training = resume_options();
  save_checkpoint(options_.save_dir, info, *layout_, dims_,
                  {params.data(), exp_avg.data(), exp_avg_sq.data()}, *groups_.world,
                  options_.keep_checkpoints);
  last_saved_ = options_.save_dir + "/" + checkpoint_name(iteration);
  if (is_root_) {
    std::printf("saved checkpoint %s\n", last_saved_.c_str());
    std::fflush(stdout);
  }
}

void Trainer::resume_from(const std::string& checkpoint_dir, const CheckpointInfo& info) {
  const size_t n = layout_->total_floats();
  std::vector<float> params(n, 0.0f), exp_avg(n, 0.0f), exp_avg_sq(n, 0.0f);
  load_checkpoint(checkpoint_dir, info, *layout_, dims_,
                  {params.data(), exp_avg.data(), exp_avg_sq.data()}, *groups_.world);
  backend_->copy_from_host(model_->params(), params.data(), n * sizeof(float));
  backend_->copy_from_host(optimizer_->m(), exp_avg.data(), n * sizeof(float));
  backend_->copy_from_host(optimizer_->v(), exp_avg_sq.data(), n * sizeof(float));
  optimizer_steps_ = info.optimizer_steps;
  resumed_iteration_ = info.iteration;
  if (is_root_) {
    std::printf("resumed from %s at iteration %lld (%lld optimizer steps; saved with tp %d, "
                "dp %d, ep %d)\n",
                checkpoint_dir.c_str(), static_cast<long long>(info.iteration),
                static_cast<long long>(info.optimizer_steps), info.tp, info.dp, info.ep);
    std::fflush(stdout);
  }
}

IterationMetrics Trainer::train_iteration(int64_t iteration) {
  const auto start = Clock::now();
  const int num_micro = batch_.num_micro_steps();
  const int T = options_.seq_length, B = options_.micro_batch_size;
  const int num_switch = options_.model.num_switch_layers(), E = options_.model.num_experts;

  IterationMetrics m;
  m.iteration = iteration;
  m.expert_load.assign(num_switch, std::vector<double>(E, 0.0));
  double kept = 0, choices = 0;
  const LossScales scales{1.0f / num_micro, static_cast<float>(options_.aux_loss_coeff / num_micro),
                          static_cast<float>(options_.z_loss_coeff / num_micro)};
  model_->phase_times().reset();  // evaluation forwards since the last iteration don't count
  model_->zero_grads();
  for (int micro = 0; micro < num_micro; ++micro) {
    data_->fill_train_batch(inputs_.data(), targets_.data(), iteration, batch_, micro);
    RoutingOptions routing;
    routing.capacity_factor = options_.capacity_factor;
    routing.drop_policy = options_.drop_policy;
    routing.jitter_eps = options_.jitter_eps;
    routing.seed = options_.seed;
    routing.iteration = iteration;
    // Global index of the first token: the window's place in the iteration's global batch.
    const int64_t first_window = static_cast<int64_t>(batch_.dp_rank) * batch_.windows_per_rank() +
                                 static_cast<int64_t>(micro) * B;
    routing.first_token = first_window * T;
    const ForwardLosses losses = model_->forward(inputs_.data(), targets_.data(), B, T, routing);
    // On the last micro-step each block's gradients are final as soon as its backward ends:
    // their reduction starts then and overlaps the rest of backward.
    if (micro + 1 == num_micro)
      model_->backward(scales, [&](int layer) { grad_sync_->start_block(model_->grads(), layer); });
    else
      model_->backward(scales);
    m.lm_loss += losses.lm_loss / num_micro;
    m.load_balancing_loss += losses.load_balancing_loss / num_micro;
    m.z_loss += losses.z_loss / num_micro;
    for (int s = 0; s < num_switch; ++s) {
      const RouterStats& stats = model_->switch_layers()[s].stats();
      for (int e = 0; e < E; ++e) {
        m.expert_load[s][e] += stats.choices[e];
        kept += stats.kept[e];
        choices += stats.choices[e];
      }
    }
  }
  // lm_loss is a mean over data-parallel replicas (tp ranks of a replica agree); the routing
  // statistics were already global.
  groups_.dp->allreduce_sum(&m.lm_loss, 1);
  m.lm_loss /= dims_.dp;
  m.dropped_fraction = choices > 0 ? 1.0 - kept / choices : 0.0;

  const size_t n = layout_->total_floats();
  {
    ScopedPhase phase(model_->phase_times(), Phase::kGradReduce);
    grad_sync_->finish(model_->grads());
  }
  const bool inject_nan =
      dims_.world_rank == dims_.world - 1 &&
      std::count(options_.inject_nan_iterations.begin(), options_.inject_nan_iterations.end(),
                 iteration) > 0;
  if (inject_nan) {
    const float nan = std::nanf("");
    backend_->copy_from_host(model_->grads(), &nan, sizeof nan);
  }
  m.grad_norm = grad_sync_->global_norm(model_->grads());
  m.lr = options_.schedule.at(iteration);
  // Every rank must take the same two decisions: skip this update (a non-finite value on any
  // rank; the norm alone would miss one in a tensor this rank does not hold canonically) and
  // stop after this iteration (a signal on any rank). One small all-reduce settles both.
  const int signal_here = received_stop_signal();
  int agreed[3] = {!std::isfinite(m.grad_norm) || !std::isfinite(m.lm_loss) ||
                       !backend_->all_finite(model_->grads(), n),
                   signal_here, signal_here != 0 ? dims_.world_rank : -1};
  groups_.world->allreduce_max(agreed, 3);
  m.skipped = agreed[0] != 0;
  m.stop_signal = agreed[1];
  m.stop_signal_rank = agreed[2];
  if (!m.skipped) {
    const double factor = clip_factor(m.grad_norm, options_.clip_grad);
    if (factor < 1.0) backend_->scale(model_->grads(), static_cast<float>(factor), n);
    optimizer_->update(model_->params(), model_->grads(), m.lr, ++optimizer_steps_);
  }
  backend_->synchronize();
  const double seconds = seconds_since(start);
  m.ms_per_iter = seconds * 1e3;
  // Where the iteration went; "rest" is attention, dense layers, embeddings and the optimizer.
  double phases_ms = 0;
  for (int p = 0; p < static_cast<int>(Phase::kCount); ++p) {
    const double ms = model_->phase_times().ms(static_cast<Phase>(p));
    m.time_breakdown_ms.emplace_back(phase_name(static_cast<Phase>(p)), ms);
    phases_ms += ms;
  }
  m.time_breakdown_ms.emplace_back("rest", m.ms_per_iter - phases_ms);
  model_->phase_times().reset();
  m.tokens_per_sec = static_cast<double>(batch_.global_batch_size) * T / seconds;
  return m;
}

double Trainer::evaluate() {
  const int B = options_.micro_batch_size, T = options_.seq_length;
  RoutingOptions routing;
  routing.capacity_factor = options_.eval_capacity_factor;
  routing.drop_policy = options_.drop_policy;
  // Validation batches are dealt round-robin over data-parallel replicas. Every rank runs the
  // same number of forwards (expert parallelism exchanges tokens in each): a replica with no
  // batch left repeats batch 0 and ignores the result.
  int64_t batches = data_->num_valid_batches(B);
  if (options_.eval_iters > 0) batches = std::min(batches, options_.eval_iters);
  const int64_t rounds = (batches + dims_.dp - 1) / dims_.dp;
  double sums[2] = {0.0, 0.0};  // loss sum, target tokens
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t batch = round * dims_.dp + dims_.dp_rank;
    const bool real = batch < batches;
    const int rows = data_->fill_valid_batch(inputs_.data(), targets_.data(), real ? batch : 0, B);
    const ForwardLosses losses = model_->forward(inputs_.data(), targets_.data(), rows, T, routing);
    if (!real) continue;
    sums[0] += losses.lm_loss * rows * T;
    sums[1] += static_cast<double>(rows) * T;
  }
  groups_.dp->allreduce_sum(sums, 2);
  return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
}

void Trainer::log_progress(const IterationMetrics& m) const {
  // The least and most loaded expert over all Switch layers, relative to a perfect share.
  double least = 0, most = 0;
  bool first = true;
  for (const auto& layer : m.expert_load) {
    double total = 0;
    for (double x : layer) total += x;
    if (total <= 0) continue;
    const double mean = total / layer.size();
    for (double x : layer) {
      least = first ? x / mean : std::min(least, x / mean);
      most = first ? x / mean : std::max(most, x / mean);
      first = false;
    }
  }
  std::printf("iter %6lld/%lld | lm %.4f | lb %.4f z %.4f | lr %.3e | gnorm %.3f | %8.0f tok/s | "
              "%7.1f ms | drop %5.2f%% | load min %.2fx max %.2fx%s\n",
              static_cast<long long>(m.iteration), static_cast<long long>(options_.train_iters),
              m.lm_loss, m.load_balancing_loss, m.z_loss, m.lr, m.grad_norm, m.tokens_per_sec,
              m.ms_per_iter, 100.0 * m.dropped_fraction, least, most,
              m.skipped ? " | SKIPPED (non-finite)" : "");
  std::fflush(stdout);
}

void Trainer::write_metrics(const IterationMetrics& m) {
  if (!metrics_.is_open()) return;
  nlohmann::json breakdown = nlohmann::json::object();
  for (const auto& [phase, ms] : m.time_breakdown_ms) breakdown[phase] = ms;
  nlohmann::json line = {{"iteration", m.iteration},
                         {"lm_loss", m.lm_loss},
                         {"load_balancing_loss", m.load_balancing_loss},
                         {"z_loss", m.z_loss},
                         {"grad_norm", m.grad_norm},
                         {"lr", m.lr},
                         {"tokens_per_sec", m.tokens_per_sec},
                         {"ms_per_iter", m.ms_per_iter},
                         {"time_breakdown_ms", breakdown},
                         {"dropped_fraction", m.dropped_fraction},
                         {"expert_load", m.expert_load},
                         {"skipped", m.skipped}};
  metrics_ << line.dump() << "\n";
  metrics_.flush();
}

void Trainer::write_eval_metrics(int64_t iteration, double val_loss) {
  if (is_root_) {
    std::printf("eval at iter %lld | val loss %.4f\n", static_cast<long long>(iteration), val_loss);
    std::fflush(stdout);
  }
  if (!metrics_.is_open()) return;
  metrics_ << nlohmann::json{{"iteration", iteration}, {"val_loss", val_loss}}.dump() << "\n";
  metrics_.flush();
}

int Trainer::run() {
  if (is_root_) {
    std::printf("moe-train: %d layers (%d Switch, %d experts, top-%d), hidden %d, %zu parameters, "
                "%lld train / %lld valid windows of %d tokens, %d rank(s), %d thread(s)\n",
                options_.model.num_layers, options_.model.num_switch_layers(),
                options_.model.num_experts, options_.model.moe_router_topk,
                options_.model.hidden_size, layout_->total_floats(),
                static_cast<long long>(data_->num_train_windows()),
                static_cast<long long>(data_->num_valid_windows()), options_.seq_length,
                dims_.world, omp_get_max_threads());
    std::fflush(stdout);
  }
  int skipped_in_a_row = 0;
  const int64_t last = options_.exit_interval > 0
                           ? std::min(options_.exit_interval, options_.train_iters)
                           : options_.train_iters;
  for (int64_t iteration = resumed_iteration_ + 1; iteration <= last; ++iteration) {
    const IterationMetrics m = train_iteration(iteration);
    if (is_root_) {
      write_metrics(m);
      if (iteration % options_.log_interval == 0 || iteration == 1 || iteration == last ||
          m.skipped)
        log_progress(m);
    }
    skipped_in_a_row = m.skipped ? skipped_in_a_row + 1 : 0;
    if (skipped_in_a_row > options_.max_skipped_iters)
      throw RuntimeError(
          std::to_string(skipped_in_a_row) +
          " iterations in a row had a non-finite loss or gradient (--max-skipped-iters " +
          std::to_string(options_.max_skipped_iters) + "); stopping at iteration " +
          std::to_string(iteration) +
          (last_saved_.empty() ? std::string(" with no checkpoint written")
                               : "; the last checkpoint is " + last_saved_));
    if (options_.eval_interval > 0 && iteration % options_.eval_interval == 0 &&
        data_->num_valid_windows() > 0)
      write_eval_metrics(iteration, evaluate());
    // The last iteration is the end of training or --exit-interval: save either way.
    const bool at_interval =
        options_.save_interval > 0 && iteration % options_.save_interval == 0;
    const bool saved = !options_.save_dir.empty() && (at_interval || iteration == last);
    if (saved) write_checkpoint(iteration);
    if (m.stop_signal != 0) {
      if (!options_.save_dir.empty() && !saved) write_checkpoint(iteration);
      if (is_root_) {
        std::printf("moe-train: %s on rank %d: stopping after iteration %lld, %s\n",
                    stop_signal_name(m.stop_signal), m.stop_signal_rank,
                    static_cast<long long>(iteration),
                    options_.save_dir.empty()
                        ? "without a checkpoint (no --save directory)"
                        : ("checkpoint " + last_saved_ + " saved; resume with --load " +
                           options_.save_dir)
                              .c_str());
        std::fflush(stdout);
      }
      return 0;
    }
  }
  const bool evaluated_last = options_.eval_interval > 0 && last % options_.eval_interval == 0;
  if (data_->num_valid_windows() > 0 && !evaluated_last && last > 0)
    write_eval_metrics(last, evaluate());
  if (!options_.export_safetensors.empty()) {
    std::vector<float> values = host_params();
    export_safetensors_gathered(options_.export_safetensors, options_.model, *layout_,
                                values.data(), dims_, *groups_.world);
    if (is_root_) std::printf("wrote %s\n", options_.export_safetensors.c_str());
  }
  return 0;
}

}  // namespace moe
