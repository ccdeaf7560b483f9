// plan_calibrate: the three rates moe-plan's performance model needs, measured on this
// machine with the model's own kernels through the CPU backend (one process, --threads):
//
//   gemm_gflops       the model's linear layers forward + backward (c_attn, c_proj, c_fc,
//                     c_proj, the tied logits; the Switch experts as one grouped GEMM with the
//                     balanced load), total FLOPs / total time, each layer weighted as often as
//                     one step runs it
//   attention_gflops  attention_forward + attention_backward, 12 B T^2 C FLOPs per call
//   memory_gbps       Backend::add over 64 MiB arrays (read two, write one)
//
//   plan_calibrate [--config configs/switch-small.ini] [--threads 1] [--rounds 7] [--json FILE]
//
// The kernels alternate within each round and the medians of the rounds are reported, because
// other jobs share the machine. The last line on stdout is one JSON object (moe-plan
// --calibrate reads it, or the --json file).
#include <omp.h>

#include <boost/program_options.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "benchmarks/common.h"
#include "core/backend.h"
#include "core/buffer.h"
#include "core/error.h"
#include "launcher/perf_model.h"

namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace moe::bench {
namespace {

// Random values in [-1, 1] (no denormals to slow a kernel down).
Buffer<float> random_buffer(Backend& backend, size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> host(n);
  for (float& x : host) x = uniform(rng);
  Buffer<float> buffer(backend, n);
  backend.copy_from_host(buffer.data(), host.data(), n * sizeof(float));
  return buffer;
}

// One kernel: what it does per call (FLOPs or bytes), how often one step calls it, its samples.
struct Kernel {
  std::string name;
  double work = 0;        // FLOPs (or bytes) of one call
  double per_step = 1;    // calls per training step (the weight in the mix)
  std::function<void()> run;
  std::vector<double> ms;
};

// A linear layer's forward and backward: 6 N IC OC FLOPs.
Kernel linear_kernel(Backend& backend, std::string name, int N, int IC, int OC, double per_step,
                     std::vector<Buffer<float>>& keep) {
  const size_t base = keep.size();
  keep.push_back(random_buffer(backend, size_t(N) * IC, 1));   // inp (N, IC)
  keep.push_back(random_buffer(backend, size_t(OC) * IC, 2));  // weight (OC, IC)
  keep.push_back(random_buffer(backend, OC, 3));               // bias (OC)
  keep.push_back(Buffer<float>(backend, size_t(N) * OC));      // out (N, OC), then dout
  keep.push_back(Buffer<float>(backend, size_t(N) * IC));      // dinp (N, IC)
  keep.push_back(Buffer<float>(backend, size_t(OC) * IC));     // dweight (OC, IC)
  keep.push_back(Buffer<float>(backend, OC));                  // dbias (OC)
  auto* b = &keep;
  return {std::move(name), 6.0 * N * IC * OC, per_step, [&backend, b, base, N, IC, OC] {
            auto& k = *b;
            backend.linear_forward(f32_act(k[base + 3].data()), f32_act(k[base].data()),
                                   k[base + 1].data(), k[base + 2].data(), N, IC, OC);
            backend.linear_backward(f32_act(k[base + 4].data()), k[base + 5].data(),
                                    k[base + 6].data(), f32_act(k[base + 3].data()),
                                    f32_act(k[base].data()), k[base + 1].data(), N, IC, OC);
          }, {}};
}

// The experts of one Switch layer as one grouped GEMM, `rows` rows for each of E experts.
Kernel grouped_kernel(Backend& backend, std::string name, int E, int rows, int IC, int OC,
                      double per_step, std::vector<Buffer<float>>& keep,
                      std::vector<std::vector<int>>& offsets_keep) {
  const size_t base = keep.size();
  const size_t R = size_t(E) * rows;
  keep.push_back(random_buffer(backend, R * IC, 4));              // inp (R, IC)
  keep.push_back(random_buffer(backend, size_t(E) * OC * IC, 5)); // weight (E, OC, IC)
  keep.push_back(random_buffer(backend, size_t(E) * OC, 6));      // bias (E, OC)
  keep.push_back(Buffer<float>(backend, R * OC));                 // out (R, OC)
  keep.push_back(Buffer<float>(backend, R * IC));                 // dinp (R, IC)
  keep.push_back(Buffer<float>(backend, size_t(E) * OC * IC));    // dweight (E, OC, IC)
  keep.push_back(Buffer<float>(backend, size_t(E) * OC));         // dbias (E, OC)
  std::vector<int> offsets(E + 1);                                // (E+1)
  for (int e = 0; e <= E; ++e) offsets[e] = e * rows;
  offsets_keep.push_back(std::move(offsets));
  const int* offsets_host = offsets_keep.back().data();
  auto* b = &keep;
  return {std::move(name), 6.0 * double(R) * IC * OC, per_step,
          [&backend, b, base, offsets_host, E, IC, OC] {
            auto& k = *b;
            backend.grouped_linear_forward(f32_act(k[base + 3].data()), f32_act(k[base].data()),
                                           k[base + 1].data(), k[base + 2].data(), offsets_host,
                                           E, IC, OC);
            backend.grouped_linear_backward(f32_act(k[base + 4].data()), k[base + 5].data(),
                                            k[base + 6].data(), f32_act(k[base + 3].data()),
                                            f32_act(k[base].data()), k[base + 1].data(),
                                            offsets_host, E, IC, OC);
          }, {}};
}

int run(int argc, char** argv) {
  Workload work;
  int threads = 1, rounds = 7;
  std::string config, json_path;
  const fs::path switch_small = fs::path(MOE_SOURCE_DIR) / "configs" / "switch-small.ini";
  po::options_description desc("usage: plan_calibrate [options]");
  desc.add_options()
      ("help,h", "print this help and exit")
      ("config", po::value(&config)->default_value(
           fs::exists(switch_small) ? switch_small.string() : std::string()),
       "model INI (moe-train keys; the others are ignored)")
      ("threads", po::value(&threads)->default_value(threads), "OpenMP threads")
      ("rounds", po::value(&rounds)->default_value(rounds), "timed rounds (medians)")
      ("json", po::value(&json_path), "also write the JSON object to this file");
  add_workload_options(desc, work);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(desc).run(), vm);
    if (vm.count("config") && !vm["config"].as<std::string>().empty())
      read_workload_config(vm["config"].as<std::string>(), desc, vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  if (vm.count("help")) {
    std::cout << desc << "\n";
    return 0;
  }
  if (threads < 1) throw UsageError("--threads must be at least 1");
  if (rounds < 1) throw UsageError("--rounds must be at least 1");
  work.model.validate();
  omp_set_num_threads(threads);

  // The CPU backend: its activations are fp32, so the fp32 buffers below are handed to its
  // ops as activations (f32_act).
  auto backend = make_cpu_backend();
  const ModelConfig& m = work.model;
  const int B = work.micro_batch_size, T = work.seq_length, N = B * T;
  const int C = m.hidden_size, F = m.ffn_hidden_size, E = m.num_experts, V = m.vocab_size;
  const int switch_layers = m.num_switch_layers(), dense_layers = m.num_layers - switch_layers;
  std::vector<Buffer<float>> keep;
  keep.reserve(64);
  std::vector<std::vector<int>> offsets_keep;
  offsets_keep.reserve(4);

  std::vector<Kernel> gemms;
  gemms.push_back(linear_kernel(*backend, "attn.c_attn", N, C, 3 * C, m.num_layers, keep));
  gemms.push_back(linear_kernel(*backend, "attn.c_proj", N, C, C, m.num_layers, keep));
  if (dense_layers > 0) {
    gemms.push_back(linear_kernel(*backend, "mlp.c_fc", N, C, F, dense_layers, keep));
    gemms.push_back(linear_kernel(*backend, "mlp.c_proj", N, F, C, dense_layers, keep));
  }
  gemms.push_back(linear_kernel(*backend, "logits", N, C, V, 1, keep));
  if (switch_layers > 0) {
    const int rows = std::max(1, N * m.moe_router_topk / E);  // balanced load per expert
    gemms.push_back(grouped_kernel(*backend, "experts.c_fc", E, rows, C, F, switch_layers, keep,
                                   offsets_keep));
    gemms.push_back(grouped_kernel(*backend, "experts.c_proj", E, rows, F, C, switch_layers,
                                   keep, offsets_keep));
  }

  const int NH = m.num_attention_heads;
  Buffer<float> qkv = random_buffer(*backend, size_t(N) * 3 * C, 7);  // (B, T, 3C)
  Buffer<float> att_out(*backend, size_t(N) * C);                     // (B, T, C)
  Buffer<float> lse(*backend, size_t(B) * NH * T);                    // (B, NH, T)
  Buffer<float> dqkv(*backend, size_t(N) * 3 * C);                    // (B, T, 3C)
  Kernel attention{"attention", 12.0 * B * double(T) * T * C, double(m.num_layers), [&] {
                     backend->attention_forward(f32_act(att_out.data()), lse.data(),
                                                f32_act(qkv.data()), B, T, C, NH);
                     backend->attention_backward(f32_act(dqkv.data()), f32_act(att_out.data()),
                                                 f32_act(att_out.data()), f32_act(qkv.data()),
                                                 lse.data(), B, T, C, NH);
                   }, {}};

  const size_t stream_n = size_t{16} << 20;  // 64 MiB per array: beyond the caches
  Buffer<float> sa = random_buffer(*backend, stream_n, 8), sb = random_buffer(*backend, stream_n, 9);
  Buffer<float> sc(*backend, stream_n);
  Kernel stream{"add (stream)", 3.0 * stream_n * sizeof(float), 1,
                [&] { backend->add(f32_act(sc.data()), f32_act(sa.data()), f32_act(sb.data()),
                                   stream_n); }, {}};

  // Untimed first calls: oneDNN builds its kernels, pages fault in.
  for (Kernel& k : gemms) k.run();
  attention.run();
  stream.run();
  for (int r = 0; r < rounds; ++r) {
    for (Kernel& k : gemms) k.ms.push_back(time_ms(k.run));
    attention.ms.push_back(time_ms(attention.run));
    stream.ms.push_back(time_ms(stream.run));
  }

  double gemm_flops = 0, gemm_ms = 0;
  nlohmann::json kernels = nlohmann::json::array();
  std::printf("plan_calibrate: L=%d C=%d F=%d E=%d k=%d V=%d B=%d T=%d threads=%d rounds=%d\n\n",
              m.num_layers, C, F, E, m.moe_router_topk, V, B, T, threads, rounds);
  std::printf("%-16s %10s %10s %10s\n", "kernel (fwd+bwd)", "per step", "ms", "GFLOP/s");
  for (const Kernel& k : gemms) {
    const double ms = median(k.ms);
    gemm_flops += k.per_step * k.work;
    gemm_ms += k.per_step * ms;
    std::printf("%-16s %10.0f %10.3f %10.1f\n", k.name.c_str(), k.per_step, ms,
                k.work / (ms * 1e6));
    kernels.push_back({{"name", k.name}, {"per_step", k.per_step}, {"ms", ms},
                       {"gflops", k.work / (ms * 1e6)}});
  }
  const double gemm_gflops = gemm_flops / (gemm_ms * 1e6);
  const double attention_gflops = attention.work / (median(attention.ms) * 1e6);
  const double memory_gbps = stream.work / (median(stream.ms) * 1e6);
  std::printf("%-16s %10s %10.3f %10.1f   (the mix, weighted by calls per step)\n", "GEMM", "",
              gemm_ms, gemm_gflops);
  std::printf("%-16s %10d %10.3f %10.1f\n", "attention", m.num_layers, median(attention.ms),
              attention_gflops);
  std::printf("%-16s %10s %10.3f %10.1f GB/s\n\n", "add (stream)", "", median(stream.ms),
              memory_gbps);
  const nlohmann::json result = {
      {"benchmark", "plan_calibrate"},
      {"threads", threads},
      {"rounds", rounds},
      {"gemm_gflops", gemm_gflops},
      {"attention_gflops", attention_gflops},
      {"memory_gbps", memory_gbps},
      {"kernels", kernels},
      {"model", {{"num_layers", m.num_layers}, {"hidden_size", C}, {"ffn_hidden_size", F},
                 {"num_experts", E}, {"vocab_size", V}, {"micro_batch_size", B},
                 {"seq_length", T}}},
  };
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << result.dump(1) << "\n";
    if (!out) throw RuntimeError("cannot write " + json_path);
  }
  print_json_line(result);
  return 0;
}

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) {
  try {
    return moe::bench::run(argc, argv);
  } catch (const moe::UsageError& e) {
    std::fprintf(stderr, "plan_calibrate: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "plan_calibrate: error: %s\n", e.what());
    return 1;
  }
}
