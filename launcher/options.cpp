#include "launcher/options.h"

#include <boost/program_options.hpp>
#include <cctype>
#include <cmath>
#include <fstream>
#include <iostream>
#include <sstream>
#include <utility>

#include "core/error.h"

namespace po = boost::program_options;

namespace moe {

DropPolicy parse_drop_policy(const std::string& text) {
  if (text == "position") return DropPolicy::kPosition;
  if (text == "probs") return DropPolicy::kProbs;
  throw UsageError("--moe-token-drop-policy must be position or probs, not \"" + text + "\"");
}

namespace {

// Boost fills its error messages by replacing placeholders such as %value% until none is left,
// so an option or value that itself holds one ("--x%value%") would loop forever: such text is
// refused before Boost sees it.
void refuse_placeholders(const std::string& text, const std::string& where) {
  for (size_t open = text.find('%'); open != std::string::npos; open = text.find('%', open + 1)) {
    size_t end = open + 1;
    while (end < text.size() && (std::isalpha(static_cast<unsigned char>(text[end])) ||
                                 text[end] == '_'))
      ++end;
    if (end > open + 1 && end < text.size() && text[end] == '%')
      throw UsageError(where + ": \"" + text.substr(open, end + 1 - open) +
                       "\" is not allowed (a %name% pattern)");
  }
}

// Runs Boost's parser and turns each of its errors into one UsageError line.
template <typename Fn>
void parse_or_usage_error(Fn&& fn) {
  try {
    fn();
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
}

// Command line first, then the INI file: Boost keeps the first value stored for a key, so
// flags given on the command line win over the file.
bool parse_into(int argc, char** argv, const po::options_description& desc, const char* usage,
                po::variables_map& vm) {
  parse_or_usage_error([&] {
    for (int i = 1; i < argc; ++i) refuse_placeholders(argv[i], "command line");
    // No positional arguments: a stray word is an error, not silently ignored.
    const po::positional_options_description no_positionals;
    po::store(po::command_line_parser(argc, argv).options(desc).positional(no_positionals).run(),
              vm);
    if (vm.count("help")) return;
    if (vm.count("config")) {
      const std::string path = vm["config"].as<std::string>();
      std::ifstream file(path);
      if (!file) throw UsageError("--config: cannot open \"" + path + "\"");
      std::stringstream text;
      text << file.rdbuf();
      refuse_placeholders(text.str(), "--config " + path);
      try {
        const po::parsed_options parsed =
            po::parse_config_file(text, desc, /*allow_unregistered=*/false);
        // store() skips a key the command line already set without parsing its value: check
        // every value of the file on its own first, so a bad one is an error all the same.
        po::variables_map file_only;
        po::store(parsed, file_only);
        po::store(parsed, vm);
      } catch (const po::error& e) {
        throw UsageError("--config " + path + ": " + e.what());
      }
    }
    po::notify(vm);
  });
  if (vm.count("help")) {
    std::cout << usage << "\n" << desc << "\n";
    return false;
  }
  return true;
}

void require(bool ok, const std::string& message) {
  if (!ok) throw UsageError(message);
}

}  // namespace

std::optional<TrainOptions> parse_train_options(int argc, char** argv) {
  TrainOptions o;
  std::string drop_policy = "position", data_format = "auto", data_order = "shuffle",
              decay_style = "cosine";
  int max_positions = 0;
  int64_t seed = static_cast<int64_t>(o.seed);

  po::options_description general("General");
  general.add_options()
      ("help,h", "print this help and exit")
      ("config", po::value<std::string>(), "INI file of `key = value` lines, keys spelled as the "
       "flags without `--`; flags on the command line win");
  po::options_description model("Model");
  model.add_options()
      ("num-layers", po::value(&o.model.num_layers)->default_value(o.model.num_layers), "transformer blocks L")
      ("hidden-size", po::value(&o.model.hidden_size)->default_value(o.model.hidden_size), "model width C")
      ("num-attention-heads", po::value(&o.model.num_attention_heads)->default_value(o.model.num_attention_heads), "attention heads")
      ("ffn-hidden-size", po::value(&o.model.ffn_hidden_size)->default_value(o.model.ffn_hidden_size), "FFN width F (dense and each expert)")
      ("seq-length", po::value(&o.seq_length)->default_value(o.seq_length), "tokens per window T")
      ("max-position-embeddings", po::value(&max_positions)->default_value(0), "positions in wpe; 0: --seq-length")
      ("vocab-size", po::value(&o.model.vocab_size)->default_value(0), "vocabulary; 0: from the data (256 bytes, 50257 llm.c)")
      ("num-experts", po::value(&o.model.num_experts)->default_value(o.model.num_experts), "experts per Switch layer; 0: dense model")
      ("moe-layer-freq", po::value(&o.model.moe_layer_freq)->default_value(o.model.moe_layer_freq), "layer l is a Switch layer iff l % freq == freq-1")
      ("moe-router-topk", po::value(&o.model.moe_router_topk)->default_value(o.model.moe_router_topk), "experts per token k")
      ("moe-expert-capacity-factor", po::value(&o.capacity_factor)->default_value(o.capacity_factor), "capacity ceil(cf*S*k/E); 0: dropless")
      ("moe-eval-capacity-factor", po::value(&o.eval_capacity_factor)->default_value(o.eval_capacity_factor), "capacity factor in evaluation; 0: dropless")
      ("moe-token-drop-policy", po::value(&drop_policy)->default_value(drop_policy), "position | probs")
      ("moe-aux-loss-coeff", po::value(&o.aux_loss_coeff)->default_value(o.aux_loss_coeff), "load-balancing loss coefficient")
      ("moe-z-loss-coeff", po::value(&o.z_loss_coeff)->default_value(o.z_loss_coeff), "router z-loss coefficient")
      ("moe-input-jitter-eps", po::value(&o.jitter_eps)->default_value(o.jitter_eps), "router input jitter U[1-eps,1+eps] in training")
      ("init-scale", po::value(&o.init_scale)->default_value(o.init_scale), "weights ~ truncnormal(sqrt(s/fan_in))")
      ("seed", po::value(&seed)->default_value(seed), "seed of the initialization, shuffle and jitter");
  po::options_description training("Training");
  training.add_options()
      ("micro-batch-size", po::value(&o.micro_batch_size)->default_value(o.micro_batch_size), "windows per micro-step per rank")
      ("global-batch-size", po::value(&o.global_batch_size)->default_value(0), "windows per iteration; 0: micro x data-parallel")
      ("train-iters", po::value(&o.train_iters)->default_value(o.train_iters), "iterations")
      ("lr", po::value(&o.schedule.lr)->default_value(3e-4), "peak learning rate")
      ("min-lr", po::value(&o.schedule.min_lr)->default_value(0.0), "learning rate at the end of the decay")
      ("lr-warmup-iters", po::value(&o.schedule.warmup_iters)->default_value(0), "linear warmup iterations")
      ("lr-decay-style", po::value(&decay_style)->default_value(decay_style), "constant | linear | cosine")
      ("weight-decay", po::value(&o.adamw.weight_decay)->default_value(o.adamw.weight_decay), "AdamW decoupled decay (2-D tensors)")
      ("adam-beta1", po::value(&o.adamw.beta1)->default_value(o.adamw.beta1), "")
      ("adam-beta2", po::value(&o.adamw.beta2)->default_value(o.adamw.beta2), "")
      ("adam-eps", po::value(&o.adamw.eps)->default_value(o.adamw.eps), "")
      ("clip-grad", po::value(&o.clip_grad)->default_value(o.clip_grad), "global gradient-norm clip; 0: off")
      ("tensor-model-parallel-size", po::value(&o.tensor_parallel)->default_value(1), "tp")
      ("expert-model-parallel-size", po::value(&o.expert_parallel)->default_value(1), "ep");
  po::options_description data("Data");
  data.add_options()
      ("data-path", po::value(&o.data_path), "file, or glob of llm.c shards")
      ("data-format", po::value(&data_format)->default_value(data_format), "auto | bytes | llmc | uint16")
      ("data-order", po::value(&data_order)->default_value(data_order), "shuffle | sequential")
      ("valid-fraction", po::value(&o.valid_fraction)->default_value(o.valid_fraction), "last fraction of windows held out")
      ("eval-interval", po::value(&o.eval_interval)->default_value(0), "evaluate every N iterations; 0: at the end only")
      ("eval-iters", po::value(&o.eval_iters)->default_value(0), "micro-batches per evaluation; 0: all held-out windows")
      ("log-interval", po::value(&o.log_interval)->default_value(o.log_interval), "progress line every N iterations");
  po::options_description files("Checkpoints and files");
  files.add_options()
      ("save", po::value(&o.save_dir), "checkpoint directory to write")
      ("load", po::value(&o.load_dir), "checkpoint directory to resume from")
      ("save-interval", po::value(&o.save_interval)->default_value(0), "checkpoint every N iterations")
      ("exit-interval", po::value(&o.exit_interval)->default_value(0), "stop after iteration N, as if interrupted")
      ("keep-checkpoints", po::value(&o.keep_checkpoints)->default_value(0), "keep the newest N checkpoints; 0: all")
      ("init-from", po::value(&o.init_from), "initial weights from a safetensors file")
      ("export-safetensors", po::value(&o.export_safetensors), "write the final weights here")
      ("metrics-file", po::value(&o.metrics_file), "JSONL, one object per iteration");
  po::options_description runtime("Runtime");
  runtime.add_options()
      ("device", po::value(&o.device)->default_value(o.device), "cpu | cuda")
      ("threads", po::value(&o.threads)->default_value(0), "OpenMP threads per rank; 0: default")
      ("distributed-timeout", po::value(&o.distributed_timeout)->default_value(60.0), "seconds before a stuck collective is an error")
      ("max-skipped-iters", po::value(&o.max_skipped_iters)->default_value(o.max_skipped_iters), "stop after N non-finite steps in a row")
      ("inject-nan-at", po::value(&o.inject_nan_iterations)->multitoken(), "testing: make the last rank's gradient NaN at these iterations");
  po::options_description all;
  all.add(general).add(model).add(training).add(data).add(files).add(runtime);

  po::variables_map vm;
  if (!parse_into(argc, argv, all, "usage: moe-train [options]   (mpirun -np N moe-train ...)", vm))
    return std::nullopt;

  o.seed = static_cast<uint64_t>(seed);
  o.drop_policy = parse_drop_policy(drop_policy);
  o.data_format = parse_data_format(data_format);
  o.data_order = parse_data_order(data_order);
  o.schedule.decay_style = parse_lr_decay_style(decay_style);
  o.schedule.train_iters = o.train_iters;
  o.model.max_position_embeddings = max_positions > 0 ? max_positions : o.seq_length;

  // Boost reads "inf" as a number; no setting below means anything at infinity (a capacity
  // factor of inf would even overflow the int capacity).
  const std::pair<const char*, double> reals[] = {
      {"--moe-expert-capacity-factor", o.capacity_factor},
      {"--moe-eval-capacity-factor", o.eval_capacity_factor},
      {"--moe-aux-loss-coeff", o.aux_loss_coeff}, {"--moe-z-loss-coeff", o.z_loss_coeff},
      {"--init-scale", o.init_scale}, {"--lr", o.schedule.lr}, {"--min-lr", o.schedule.min_lr},
      {"--weight-decay", o.adamw.weight_decay}, {"--adam-eps", o.adamw.eps},
      {"--clip-grad", o.clip_grad}};
  for (const auto& [flag, value] : reals)
    require(std::isfinite(value), std::string(flag) + " must be a finite number");
  require(!o.data_path.empty(), "--data-path is required (a text file, or llm.c shards)");
  require(o.seq_length >= 1, "--seq-length must be at least 1");
  require(o.seq_length <= o.model.max_position_embeddings,
          "--seq-length (" + std::to_string(o.seq_length) + ") exceeds --max-position-embeddings (" +
              std::to_string(o.model.max_position_embeddings) + ")");
  require(o.capacity_factor >= 0, "--moe-expert-capacity-factor must not be negative");
  require(o.eval_capacity_factor >= 0, "--moe-eval-capacity-factor must not be negative");
  require(o.aux_loss_coeff >= 0, "--moe-aux-loss-coeff must not be negative");
  require(o.z_loss_coeff >= 0, "--moe-z-loss-coeff must not be negative");
  require(o.jitter_eps >= 0 && o.jitter_eps < 1, "--moe-input-jitter-eps must be in [0, 1)");
  require(o.init_scale > 0, "--init-scale must be positive");
  require(o.micro_batch_size >= 1, "--micro-batch-size must be at least 1");
  require(o.global_batch_size >= 0, "--global-batch-size must not be negative");
  require(o.train_iters >= 0, "--train-iters must not be negative");
  require(o.schedule.lr >= 0 && o.schedule.min_lr >= 0, "--lr and --min-lr must not be negative");
  require(o.schedule.warmup_iters >= 0, "--lr-warmup-iters must not be negative");
  require(o.adamw.beta1 >= 0 && o.adamw.beta1 < 1, "--adam-beta1 must be in [0, 1)");
  require(o.adamw.beta2 >= 0 && o.adamw.beta2 < 1, "--adam-beta2 must be in [0, 1)");
  require(o.adamw.eps > 0, "--adam-eps must be positive");
  require(o.adamw.weight_decay >= 0, "--weight-decay must not be negative");
  require(o.clip_grad >= 0, "--clip-grad must not be negative");
  require(o.tensor_parallel >= 1, "--tensor-model-parallel-size must be at least 1");
  require(o.expert_parallel >= 1, "--expert-model-parallel-size must be at least 1");
  require(o.valid_fraction >= 0 && o.valid_fraction < 1, "--valid-fraction must be in [0, 1)");
  require(o.eval_interval >= 0 && o.eval_iters >= 0, "--eval-interval and --eval-iters must not be negative");
  require(o.log_interval >= 1, "--log-interval must be at least 1");
  require(o.save_interval >= 0 && o.exit_interval >= 0, "--save-interval and --exit-interval must not be negative");
  require(o.keep_checkpoints >= 0, "--keep-checkpoints must not be negative");
  require(o.device == "cpu" || o.device == "cuda", "--device must be cpu or cuda, not \"" + o.device + "\"");
  require(o.threads >= 0, "--threads must not be negative");
  require(o.distributed_timeout > 0, "--distributed-timeout must be positive");
  require(o.max_skipped_iters >= 0, "--max-skipped-iters must not be negative");
  for (int64_t iteration : o.inject_nan_iterations)
    require(iteration >= 1, "--inject-nan-at takes iteration numbers from 1");
  // The model's own checks (heads divide hidden, top-k within the experts); the vocabulary is
  // checked once the data is known.
  ModelConfig check = o.model;
  if (check.vocab_size == 0) check.vocab_size = 256;
  check.validate();
  return o;
}

std::optional<EvalOptions> parse_eval_options(int argc, char** argv) {
  EvalOptions o;
  std::string data_format = "auto", drop_policy = "position";
  po::options_description desc("moe-eval options");
  desc.add_options()
      ("help,h", "print this help and exit")
      ("config", po::value<std::string>(), "INI file with the same keys")
      ("model", po::value(&o.model_path), "weights to evaluate (safetensors)")
      ("load", po::value(&o.load_dir), "or: a checkpoint directory written by moe-train --save")
      ("data-path", po::value(&o.data_path), "file, or glob of llm.c shards; every window is evaluated")
      ("data-format", po::value(&data_format)->default_value(data_format), "auto | bytes | llmc | uint16")
      ("seq-length", po::value(&o.seq_length)->default_value(0), "tokens per window; 0: the model's positions")
      ("micro-batch-size", po::value(&o.micro_batch_size)->default_value(o.micro_batch_size), "windows per forward")
      ("eval-iters", po::value(&o.eval_iters)->default_value(0), "batches to evaluate; 0: every window")
      ("moe-eval-capacity-factor", po::value(&o.eval_capacity_factor)->default_value(o.eval_capacity_factor), "0: dropless")
      ("moe-token-drop-policy", po::value(&drop_policy)->default_value(drop_policy), "position | probs")
      ("threads", po::value(&o.threads)->default_value(0), "OpenMP threads; 0: default")
      ("device", po::value(&o.device)->default_value(o.device), "cpu | cuda")
      ("dump-routing", po::value(&o.dump_routing), "write a CSV: each token's expert in every Switch layer");
  po::variables_map vm;
  if (!parse_into(argc, argv, desc, "usage: moe-eval --model FILE.safetensors --data-path FILE [options]", vm))
    return std::nullopt;
  o.data_format = parse_data_format(data_format);
  o.drop_policy = parse_drop_policy(drop_policy);
  require(!o.model_path.empty() || !o.load_dir.empty(), "moe-eval needs --model FILE.safetensors or --load DIR");
  require(!o.data_path.empty(), "--data-path is required");
  require(o.seq_length >= 0, "--seq-length must not be negative");
  require(o.micro_batch_size >= 1, "--micro-batch-size must be at least 1");
  require(o.eval_iters >= 0, "--eval-iters must not be negative");
  require(std::isfinite(o.eval_capacity_factor) && o.eval_capacity_factor >= 0,
          "--moe-eval-capacity-factor must be a finite number, not negative");
  require(o.threads >= 0, "--threads must not be negative");
  return o;
}

}  // namespace moe
