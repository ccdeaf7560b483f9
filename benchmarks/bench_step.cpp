// bench_step: training throughput of one rank through Trainer (configs/switch-small.ini by
// default) and its model FLOPs utilization (MFU) against the rate dnnl_sgemm reaches on the
// model's own GEMM shapes, both measured in this process with the same OpenMP threads.
//
//   bench_step [--threads 2] [--iters 20] [--warmup 3] [--json] [--data-path FILE]
//              [--config FILE] [any other moe-train flag, e.g. --num-experts 16]
//
// Model FLOPs per iteration (PaLM's convention, appendix B: forward + backward = 3 x forward,
// no discount for the causal mask; tokens dropped at capacity are not subtracted):
//   flops_per_iter = tokens * (6 * P_tok + 12 * L * T * C)
//   P_tok = sum over layers of [4C^2 attention + (dense: 2CF | Switch: k*2CF + E*C router)]
//           + V*C logits                      (the matmul weights one token passes through)
// achieved GFLOP/s = flops_per_iter / median iteration time;
// MFU = achieved / the best of the per-shape median sgemm rates ("measured sgemm peak").
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "benchmarks/common.h"
#include "core/cuda_gemm_rate.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "launcher/options.h"
#include "launcher/perf_model.h"
#include "launcher/trainer.h"

namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace moe::bench {
namespace {

constexpr const char* kFlopsFormula =
    "flops_per_iter = tokens * (6 * P_tok + 12 * L * T * C); P_tok = sum over layers of "
    "[4C^2 + (dense: 2CF | Switch: k*2CF + E*C)] + V*C (PaLM convention: fwd+bwd, no causal "
    "discount, capacity drops not subtracted)";

struct BenchOptions {
  int threads = 2;
  int iters = 20;
  int warmup = 3;
  bool json = false;
  std::string data_path;   // empty: tinyshakespeare from ../shared/data, else random bytes
  std::string data_label;  // what the output calls the data
  std::string config;      // empty: TrainOptions' defaults
  std::string data_order = "sequential";
  std::vector<std::string> train_args;  // moe-train flags passed through to the trainer
};

std::optional<BenchOptions> parse_bench_options(int argc, char** argv) {
  BenchOptions o;
  const fs::path switch_small = fs::path(MOE_SOURCE_DIR) / "configs" / "switch-small.ini";
  po::options_description desc(
      "usage: bench_step [options] [moe-train flags]\n"
      "Flags not listed here (e.g. --num-experts 16) go to the trainer as moe-train flags");
  desc.add_options()
      ("help,h", "print this help and exit")
      ("threads", po::value(&o.threads)->default_value(o.threads),
       "OpenMP threads for both the sgemm and the training step; 0: OpenMP's default")
      ("iters", po::value(&o.iters)->default_value(o.iters), "timed training iterations")
      ("warmup", po::value(&o.warmup)->default_value(o.warmup), "untimed iterations first")
      ("json", po::bool_switch(&o.json), "end with one JSON line of every result")
      ("data-path", po::value(&o.data_path),
       "training data; default ../shared/data/tinyshakespeare.txt beside the source tree, "
       "else 1 MiB of random bytes")
      ("config", po::value(&o.config)->default_value(
           fs::exists(switch_small) ? switch_small.string() : std::string()),
       "model and training INI (moe-train keys); flags given here win")
      ("data-order", po::value(&o.data_order)->default_value(o.data_order),
       "shuffle | sequential (sequential reads the windows as torch_baseline.py does)");
  po::variables_map vm;
  try {
    const po::parsed_options parsed =
        po::command_line_parser(argc, argv).options(desc).allow_unregistered().run();
    po::store(parsed, vm);
    po::notify(vm);
    o.train_args = po::collect_unrecognized(parsed.options, po::include_positional);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  if (vm.count("help")) {
    std::cout << desc << "\n";
    return std::nullopt;
  }
  if (o.threads < 0) throw UsageError("--threads must not be negative");
  if (o.iters < 1) throw UsageError("--iters must be at least 1");
  if (o.warmup < 0) throw UsageError("--warmup must not be negative");
  return o;
}

// The trainer's options, parsed by moe-train's own parser from a synthesized command line so
// that every moe-train flag and INI key means here what it means there.
TrainOptions make_train_options(const BenchOptions& bench) {
  std::vector<std::string> args = {"bench_step"};
  args.insert(args.end(), bench.train_args.begin(), bench.train_args.end());
  args.insert(args.end(), {"--threads", std::to_string(bench.threads),
                           "--data-path", bench.data_path,
                           "--data-order", bench.data_order,
                           // The LR schedule spans the run (the rate does not change the speed).
                           "--train-iters", std::to_string(bench.warmup + bench.iters)});
  if (!bench.config.empty()) args.insert(args.end(), {"--config", bench.config});
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  std::optional<TrainOptions> options =
      parse_train_options(static_cast<int>(argv.size()), argv.data());
  if (!options) throw UsageError("--help is bench_step's own flag");
  return *options;
}

// A file of random bytes (a fixed seed) that is removed with this object.
class RandomBytesFile {
 public:
  explicit RandomBytesFile(size_t num_bytes)
      : path_(fs::temp_directory_path() / ("bench_step_" + std::to_string(getpid()) + ".bytes")) {
    std::mt19937_64 rng(1234);
    std::vector<char> bytes(num_bytes);
    for (char& b : bytes) b = static_cast<char>(rng() & 0xff);
    std::ofstream out(path_, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw RuntimeError("cannot write random data to " + path_.string());
  }
  ~RandomBytesFile() {
    std::error_code ignored;
    fs::remove(path_, ignored);
  }
  RandomBytesFile(const RandomBytesFile&) = delete;
  RandomBytesFile& operator=(const RandomBytesFile&) = delete;
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

// One GEMM shape of the model, called as linear_forward calls it:
// out (m,n) = inp (m,k) @ weight^T (k,n), row-major, through dnnl_sgemm.
struct GemmCase {
  std::string name;
  int m, n, k;
  std::vector<float> a, b, c;  // (m,k), (n,k), (m,n)
  std::vector<double> ms;      // one sample per round

  GemmCase(std::string name_, int m_, int n_, int k_) : name(std::move(name_)), m(m_), n(n_), k(k_) {
    // Values in [-1, 1]: no denormals or overflow to slow the kernel down.
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    a.resize(static_cast<size_t>(m) * k);
    b.resize(static_cast<size_t>(n) * k);
    c.resize(static_cast<size_t>(m) * n);
    for (float& x : a) x = uniform(rng);
    for (float& x : b) x = uniform(rng);
  }
  double flops() const { return 2.0 * m * n * k; }
  double gflops() const { return flops() / (median(ms) * 1e6); }

  double run_ms() {
    return time_ms([&] {
      const dnnl_status_t status = dnnl_sgemm('N', 'T', m, n, k, 1.0f, a.data(), k, b.data(), k,
                                              0.0f, c.data(), n);
      if (status != dnnl_success)
        throw RuntimeError("dnnl_sgemm failed with status " + std::to_string(status) + " on " +
                           name);
    });
  }
};

// The dense GEMMs every layer runs on the micro-batch's tokens, and the expert GEMMs of a
// Switch layer with each expert filled to capacity (to the mean load when dropless).
std::vector<GemmCase> model_gemms(const ModelConfig& c, int tokens, double capacity_factor) {
  const int C = c.hidden_size, F = c.ffn_hidden_size;
  std::vector<GemmCase> gemms;
  gemms.emplace_back("attn.c_attn", tokens, 3 * C, C);
  gemms.emplace_back("attn.c_proj", tokens, C, C);
  gemms.emplace_back("mlp.c_fc", tokens, F, C);
  gemms.emplace_back("mlp.c_proj", tokens, C, F);
  gemms.emplace_back("logits", tokens, c.vocab_size, C);
  if (c.num_switch_layers() > 0) {
    const double mean_load = static_cast<double>(tokens) * c.moe_router_topk / c.num_experts;
    const double capacity = capacity_factor > 0 ? capacity_factor * mean_load : mean_load;
    const int rows = std::min(tokens, static_cast<int>(std::ceil(capacity)));
    gemms.emplace_back("expert.c_fc", rows, F, C);
    gemms.emplace_back("expert.c_proj", rows, C, F);
  }
  return gemms;
}

// Matmul weights one token passes through (P_tok of the formula above).
// Peak resident memory of this process so far (getrusage's ru_maxrss is in KiB on Linux), and
// the resident memory now (/proc/self/statm, in pages).
double peak_resident_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss * 1024.0;
}
double resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  double size_pages = 0, resident_pages = 0;
  statm >> size_pages >> resident_pages;
  return resident_pages * static_cast<double>(sysconf(_SC_PAGESIZE));
}

double matmul_params_per_token(const ModelConfig& c) {
  const double C = c.hidden_size, F = c.ffn_hidden_size;
  double params = c.vocab_size * C;  // logits against the tied wte
  for (int l = 0; l < c.num_layers; ++l) {
    params += 4 * C * C;  // c_attn 3C^2 + c_proj C^2
    params += c.is_switch_layer(l) ? c.moe_router_topk * 2 * C * F + c.num_experts * C : 2 * C * F;
  }
  return params;
}

int run(int argc, char** argv) {
  std::optional<BenchOptions> bench = parse_bench_options(argc, argv);
  if (!bench) return 0;
  std::optional<RandomBytesFile> random_data;
  if (bench->data_path.empty()) {
    const fs::path shakespeare =
        fs::path(MOE_SOURCE_DIR) / ".." / "shared" / "data" / "tinyshakespeare.txt";
    if (fs::exists(shakespeare)) {
      bench->data_path = fs::weakly_canonical(shakespeare).string();
    } else {
      random_data.emplace(size_t{1} << 20);
      bench->data_path = random_data->path();
      bench->data_label = "random bytes (1 MiB, seed 1234)";
    }
  }
  if (bench->data_label.empty()) bench->data_label = bench->data_path;
  const TrainOptions options = make_train_options(*bench);
  const double resident_before_trainer = resident_bytes();  // libraries, runtime, no model
  Trainer trainer(options, /*world_size=*/1, /*world_rank=*/0);  // sets the OpenMP threads that the sgemm runs on too
  random_data.reset();               // the trainer holds the tokens in memory now

  const ModelConfig& config = trainer.model().config();
  const int T = options.seq_length;
  const int global_batch =
      options.global_batch_size > 0 ? options.global_batch_size : options.micro_batch_size;
  const double tokens_per_iter = static_cast<double>(global_batch) * T;
  const double params_per_token = matmul_params_per_token(config);
  const double attention_per_token = 12.0 * config.num_layers * T * config.hidden_size;
  const double flops_per_iter = tokens_per_iter * (6 * params_per_token + attention_per_token);
  std::vector<GemmCase> gemms =
      model_gemms(config, options.micro_batch_size * T, options.capacity_factor);

  // --device cuda: the peak is the bf16 cuBLASLt rate of the same shapes, measured after the
  // step (below) instead of the CPU sgemm.
  const bool on_gpu = options.device == "cuda";
  // Untimed: oneDNN generates a kernel on the first call of each shape, and the first
  // iterations fault in the trainer's buffers.
  if (!on_gpu)
    for (GemmCase& g : gemms) g.run_ms();
  int64_t iteration = 0;
  for (int i = 0; i < bench->warmup; ++i) trainer.train_iteration(++iteration);

  // sgemm rounds and training iterations alternate, so both see the same load from other jobs.
  std::vector<double> step_ms;
  int skipped = 0;
  IterationMetrics last;
  for (int i = 0; i < bench->iters; ++i) {
    if (!on_gpu)
      for (GemmCase& g : gemms) g.ms.push_back(g.run_ms());
    last = trainer.train_iteration(++iteration);
    step_ms.push_back(last.ms_per_iter);
    skipped += last.skipped ? 1 : 0;
  }

  if (on_gpu)
    for (GemmCase& g : gemms) g.ms = {measure_cuda_gemm_rate(g.m, g.n, g.k, 50).median_ms};
  double peak = 0;
  for (const GemmCase& g : gemms) peak = std::max(peak, g.gflops());
  const double ms_per_iter = median(step_ms);
  const double tokens_per_sec = tokens_per_iter / (ms_per_iter * 1e-3);
  const double achieved = flops_per_iter / (ms_per_iter * 1e6);
  const double mfu = achieved / peak;
  const int threads = omp_get_max_threads();

  std::printf("bench_step: L=%d C=%d heads=%d F=%d E=%d k=%d freq=%d V=%d T=%d batch=%d "
              "threads=%d\n",
              config.num_layers, config.hidden_size, config.num_attention_heads,
              config.ffn_hidden_size, config.num_experts, config.moe_router_topk,
              config.moe_layer_freq, config.vocab_size, T, global_batch, threads);
  std::printf("data: %s (%s)\n\n", bench->data_label.c_str(), bench->data_order.c_str());
  std::printf("%-14s %6s %6s %6s %9s %9s\n", on_gpu ? "bf16 cuBLASLt" : "sgemm N,T", "M", "N",
              "K", "ms", "GFLOP/s");
  for (const GemmCase& g : gemms)
    std::printf("%-14s %6d %6d %6d %9.3f %9.1f\n", g.name.c_str(), g.m, g.n, g.k, median(g.ms),
                g.gflops());
  std::printf("%-14s %32.1f   (best median of %d)\n\n", "peak", peak, bench->iters);
  std::printf("%-22s %12.2f   (median of %d after %d warm-up)\n", "ms/iter", ms_per_iter,
              bench->iters, bench->warmup);
  std::printf("%-22s %12.0f\n", "tokens/s", tokens_per_sec);
  std::printf("%-22s %12.3f   (P_tok = %.0f, attention %.0f per token)\n", "model GFLOP/iter",
              flops_per_iter * 1e-9, params_per_token, attention_per_token);
  std::printf("%-22s %12.1f\n", "achieved GFLOP/s", achieved);
  std::printf("%-22s %12.3f   (achieved / %s peak)\n", "MFU", mfu,
              on_gpu ? "bf16 cuBLASLt" : "sgemm");
  std::printf("%-22s %12.4f   (last iteration)\n", "lm_loss", last.lm_loss);
  std::printf("flops: %s\n", kFlopsFormula);
  // Peak memory against moe-plan's analytic estimate (launcher/perf_model.cpp): fp32 weights
  // and gradients, AdamW m and v, one micro-batch of activations. The data tokens and oneDNN's
  // scratch are in the measurement, not in the estimate.
  Workload work{config, T, options.micro_batch_size, global_batch, options.capacity_factor};
  const MemoryEstimate estimate = estimate_memory(work, PlanLayout{}, 4, 4, 8, 4);
  const double peak_bytes = peak_resident_bytes();
  const double measured_bytes = peak_bytes - resident_before_trainer;
  std::printf("%-22s %12.1f MiB   (getrusage maxrss; %.1f MiB resident before the trainer)\n",
              "peak memory", peak_bytes / 1048576, resident_before_trainer / 1048576);
  std::printf("%-22s %12.1f MiB   (weights %.1f + grads %.1f + AdamW %.1f + activations %.1f)\n",
              "analytic estimate", estimate.total() / 1048576, estimate.weights / 1048576,
              estimate.grads / 1048576, estimate.optimizer / 1048576,
              estimate.activations / 1048576);
  std::printf("%-22s %12.3f   (peak - before trainer) / estimate\n", "memory ratio",
              measured_bytes / estimate.total());
  if (skipped > 0) std::printf("warning: %d timed iterations were skipped (non-finite)\n", skipped);

  if (bench->json) {
    nlohmann::json sgemm = nlohmann::json::array();
    for (const GemmCase& g : gemms)
      sgemm.push_back({{"name", g.name}, {"m", g.m}, {"n", g.n}, {"k", g.k},
                       {"ms", median(g.ms)}, {"gflops", g.gflops()}});
    std::cout << "\n";
    print_json_line({
        {"benchmark", "step"},
        {"tokens_per_sec", tokens_per_sec},
        {"ms_per_iter", ms_per_iter},
        {"gflops", achieved},
        {"sgemm_peak_gflops", peak},
        {"mfu", mfu},
        {"threads", threads},
        {"flops_per_iter", flops_per_iter},
        {"iters", bench->iters},
        {"warmup", bench->warmup},
        {"tokens_per_iter", tokens_per_iter},
        {"matmul_params_per_token", params_per_token},
        {"flops_formula", kFlopsFormula},
        {"sgemm", sgemm},
        {"model", {{"num_layers", config.num_layers}, {"hidden_size", config.hidden_size},
                   {"num_attention_heads", config.num_attention_heads},
                   {"ffn_hidden_size", config.ffn_hidden_size},
                   {"num_experts", config.num_experts}, {"moe_layer_freq", config.moe_layer_freq},
                   {"moe_router_topk", config.moe_router_topk}, {"vocab_size", config.vocab_size},
                   {"seq_length", T}, {"micro_batch_size", options.micro_batch_size},
                   {"global_batch_size", global_batch},
                   {"capacity_factor", options.capacity_factor}}},
        {"data", bench->data_label},
        {"final_lm_loss", last.lm_loss},
        {"skipped_iters", skipped},
        {"memory", {{"peak_rss_bytes", peak_bytes},
                    {"rss_before_trainer_bytes", resident_before_trainer},
                    {"estimate_bytes", estimate.total()},
                    {"estimate_weights_bytes", estimate.weights},
                    {"estimate_grads_bytes", estimate.grads},
                    {"estimate_optimizer_bytes", estimate.optimizer},
                    {"estimate_activations_bytes", estimate.activations},
                    {"ratio", measured_bytes / estimate.total()}}},
    });
  }
  return 0;
}

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) {
  try {
    return moe::bench::run(argc, argv);
  } catch (const moe::UsageError& e) {
    std::fprintf(stderr, "bench_step: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_step: error: %s\n", e.what());
    return 1;
  }
}
