#include "launcher/evaluation.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"
#include "dist/device_groups.h"
#include "launcher/device.h"
#include "model/checkpoint.h"
#include "model/weights_io.h"

namespace moe {

EvalSession open_evaluation(const EvalOptions& options) {
  if (options.threads > 0) omp_set_num_threads(options.threads);
  if (!options.model_path.empty() && !options.load_dir.empty())
    throw UsageError("moe-eval takes --model or --load, not both");
  std::string checkpoint_dir;
  CheckpointInfo checkpoint;
  ModelConfig config;
  if (options.model_path.empty()) {
    checkpoint_dir = find_checkpoint(options.load_dir);
    checkpoint = read_checkpoint_info(checkpoint_dir);
    config = checkpoint.config;
  } else {
    config = read_safetensors_config(options.model_path);
  }
  EvalSession session;
  const int T = session.seq_length =
      options.seq_length > 0 ? options.seq_length : config.max_position_embeddings;
  if (T > config.max_position_embeddings)
    throw UsageError("--seq-length " + std::to_string(T) + " exceeds the model's " +
                     std::to_string(config.max_position_embeddings) + " positions");
  TokenStream stream = load_tokens(options.data_path, options.data_format);
  if (stream.max_token >= config.vocab_size)
    throw UsageError(options.data_path + " holds token " + std::to_string(stream.max_token) +
                     ", outside the model's vocabulary of " + std::to_string(config.vocab_size));
  session.data = std::make_unique<DataLoader>(DataLoader::for_evaluation(std::move(stream), T));

  session.backend = make_backend(options.device);
  // On a GPU the Switch layers' row exchange copies device memory: the device group of one
  // process (cudaMemcpy, no NCCL), not the host copy of make_self_communicator.
  session.self = options.device == "cuda"
                     ? std::move(make_device_process_groups(make_single_process_groups(),
                                                            /*timeout_seconds=*/60.0)
                                     .ep)  // (a group of one never waits: no watchdog runs)
                     : make_self_communicator();
  session.layout = std::make_unique<ParamLayout>(config);
  Communicator& self = *session.self;
  session.model = std::make_unique<GptModel>(*session.backend, config, *session.layout,
                                             options.micro_batch_size, T,
                                             ModelGroups{self, self, self});
  std::vector<float> values(session.layout->total_floats(), 0.0f);  // (total_floats)
  if (checkpoint_dir.empty())
    import_safetensors(options.model_path, *session.layout, values.data());
  else
    load_checkpoint(checkpoint_dir, checkpoint, *session.layout, ParallelDims{}, {values.data()},
                    self);
  session.backend->copy_from_host(session.model->params(), values.data(),
                                  values.size() * sizeof(float));
  session.routing.capacity_factor = options.eval_capacity_factor;
  session.routing.drop_policy = options.drop_policy;
  return session;
}

int run_evaluation(const EvalOptions& options) {
  EvalSession session = open_evaluation(options);
  const int T = session.seq_length, B = options.micro_batch_size;
  const DataLoader& data = *session.data;
  std::vector<int32_t> inputs(static_cast<size_t>(B) * T), targets(inputs.size());  // (B, T)
  int64_t batches = data.num_valid_batches(B);
  if (options.eval_iters > 0) batches = std::min(batches, options.eval_iters);
  double loss_sum = 0, tokens = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t batch = 0; batch < batches; ++batch) {
    const int rows = data.fill_valid_batch(inputs.data(), targets.data(), batch, B);
    const ForwardLosses losses =
        session.model->forward(inputs.data(), targets.data(), rows, T, session.routing);
    loss_sum += losses.lm_loss * rows * T;
    tokens += static_cast<double>(rows) * T;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const nlohmann::json result = {{"loss", tokens > 0 ? loss_sum / tokens : 0.0},
                                 {"tokens", static_cast<int64_t>(tokens)},
                                 {"windows", data.num_valid_windows()},
                                 {"seq_length", T},
                                 {"tokens_per_sec", seconds > 0 ? tokens / seconds : 0.0}};
  std::cout << result.dump() << std::endl;
  return 0;
}

}  // namespace moe
