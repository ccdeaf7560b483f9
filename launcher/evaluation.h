// moe-eval: a trained model on one process (the weights of --model FILE.safetensors, or of a
// checkpoint's rank files assembled into the full model with --load) and the windows of a file.
#pragma once

#include <memory>

#include "core/backend.h"
#include "dist/communicator.h"
#include "launcher/data.h"
#include "launcher/options.h"
#include "model/gpt.h"
#include "model/parameters.h"

namespace moe {

struct EvalSession {
  int seq_length = 0;  // T
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Communicator> self;
  std::unique_ptr<ParamLayout> layout;
  std::unique_ptr<GptModel> model;  // uses backend, self and layout: declared after them
  std::unique_ptr<DataLoader> data;  // every window of the file, for evaluation
  RoutingOptions routing;            // evaluation capacity factor and drop policy
};

// Checks the options against the model (sequence length, vocabulary) before loading it:
// UsageError or RuntimeError naming what does not fit.
EvalSession open_evaluation(const EvalOptions& options);

// Mean cross-entropy per target token over every window of a file; prints one JSON line with
// `loss`, `tokens`, `windows`, `seq_length` and `tokens_per_sec`.
int run_evaluation(const EvalOptions& options);

}  // namespace moe
