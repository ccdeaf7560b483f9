// bench_moe_layer: forward + backward of one Switch layer (experts/switch_layer.h) with its
// per-phase breakdown (router, permute, all-to-all, expert GEMM, combine), swept over the
// number of experts, the capacity factor and top-k; the expert-parallel size is the number of
// MPI ranks:
//
//   mpirun -np 2 bench_moe_layer [--tokens 2048] [--hidden 256] [--ffn 1024]
//       [--experts 8 16] [--capacity-factor 0 1.25] [--top-k 1 2] [--iters 10] [--warmup 2]
//       [--json FILE]
//
// Each rank routes --tokens tokens of random activations through random weights (init-scale
// truncated-normal-like values) and holds E/ep experts. A row's times are the medians over
// iterations of the slowest rank (the layer waits for it); "other" is the layer's time outside
// the five phases. dropped = choices over capacity, over all ranks.
#include <mpi.h>
#include <omp.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "benchmarks/common.h"
#include "core/backend.h"
#include "core/buffer.h"
#include "core/error.h"
#include "core/phase_times.h"
#include "dist/communicator.h"
#include "dist/mpi_runtime.h"
#include "experts/switch_layer.h"
#include "launcher/run_main.h"

namespace po = boost::program_options;

namespace moe::bench {
namespace {

struct LayerOptions {
  int tokens = 2048, hidden = 256, ffn = 1024;
  std::vector<int> experts = {8}, top_ks = {1, 2};
  std::vector<double> capacity_factors = {0.0, 1.25};
  int iters = 10, warmup = 2, threads = 1;
  std::string json_path;
};

std::optional<LayerOptions> parse_options(int argc, char** argv) {
  LayerOptions o;
  po::options_description desc(
      "usage: mpirun -np EP bench_moe_layer [options]\n"
      "Forward + backward of one Switch layer, per phase; ep = the number of ranks");
  desc.add_options()
      ("help,h", "print this help and exit")
      ("tokens", po::value(&o.tokens)->default_value(o.tokens), "tokens per rank (one routing group)")
      ("hidden", po::value(&o.hidden)->default_value(o.hidden), "D")
      ("ffn", po::value(&o.ffn)->default_value(o.ffn), "F, each expert's width")
      ("experts", po::value(&o.experts)->multitoken(), "E values to sweep (default 8)")
      ("capacity-factor", po::value(&o.capacity_factors)->multitoken(),
       "capacity factors to sweep, 0 = dropless (default 0 1.25)")
      ("top-k", po::value(&o.top_ks)->multitoken(), "top-k values to sweep (default 1 2)")
      ("iters", po::value(&o.iters)->default_value(o.iters), "timed iterations per row")
      ("warmup", po::value(&o.warmup)->default_value(o.warmup), "untimed iterations first")
      ("threads", po::value(&o.threads)->default_value(o.threads), "OpenMP threads per rank")
      ("json", po::value(&o.json_path), "also write every row as JSON to this file");
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(desc).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  if (vm.count("help")) {
    std::cout << desc << "\n";
    return std::nullopt;
  }
  if (o.tokens < 1 || o.hidden < 1 || o.ffn < 1) throw UsageError("--tokens, --hidden and --ffn must be positive");
  if (o.iters < 1 || o.warmup < 0 || o.threads < 1) throw UsageError("--iters and --threads must be at least 1, --warmup at least 0");
  for (double cf : o.capacity_factors)
    if (cf < 0) throw UsageError("--capacity-factor must not be negative");
  for (int e : o.experts)
    if (e < 1) throw UsageError("--experts must be positive");
  for (int k : o.top_ks)
    for (int e : o.experts)
      if (k < 1 || k > e) throw UsageError("--top-k must be between 1 and the number of experts");
  return o;
}

// Values like the trainer's initialization: uniform with the standard deviation sqrt(s/fan_in).
Buffer<float> random_buffer(Backend& backend, size_t n, double stddev, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const float bound = static_cast<float>(stddev * std::sqrt(3.0));
  std::uniform_real_distribution<float> uniform(-bound, bound);
  std::vector<float> host(n);
  for (float& x : host) x = uniform(rng);
  Buffer<float> buffer(backend, n);
  backend.copy_from_host(buffer.data(), host.data(), n * sizeof(float));
  return buffer;
}

// The same values as activations (the layer's input and output gradient).
ActBuffer random_activations(Backend& backend, size_t n, double stddev, uint64_t seed) {
  Buffer<float> values = random_buffer(backend, n, stddev, seed);
  std::vector<float> host(n);
  backend.copy_to_host(host.data(), values.data(), n * sizeof(float));
  ActBuffer buffer(backend, n);
  backend.copy_act_from_host(buffer.data(), host.data(), n);
  return buffer;
}

constexpr Phase kPhases[] = {Phase::kRouter, Phase::kPermute, Phase::kAllToAll,
                             Phase::kExpertGemm, Phase::kCombine};

struct RowResult {
  int experts, top_k;
  double capacity_factor;
  double total_ms, fwd_ms, bwd_ms;
  std::vector<double> phase_ms;  // kPhases order
  double other_ms;
  double dropped;
};

// The median over iterations of the slowest rank's time (element-wise max over ranks).
double slowest_median(const std::vector<double>& samples) {
  std::vector<double> all(samples);
  if (MPI_Allreduce(MPI_IN_PLACE, all.data(), static_cast<int>(all.size()), MPI_DOUBLE, MPI_MAX,
                    MPI_COMM_WORLD) != MPI_SUCCESS)
    throw RuntimeError("MPI all-reduce of the times failed");
  return median(all);
}

RowResult run_row(const LayerOptions& o, Backend& backend, Communicator& world,
                  Communicator& self, int E, int K, double cf) {
  const int ep = world.size(), D = o.hidden, F = o.ffn, T = o.tokens;
  if (E % ep != 0)
    throw UsageError(std::to_string(E) + " experts do not split over " + std::to_string(ep) +
                     " ranks");
  const int L = E / ep;
  const uint64_t seed = 1000u * E + 10u * K + world.rank();
  Buffer<float> router = random_buffer(backend, size_t(E) * D, std::sqrt(0.1 / D), 1);  // (E, D)
  Buffer<float> fc_w = random_buffer(backend, size_t(L) * F * D, std::sqrt(0.1 / D), seed + 2);  // (L, F, D)
  Buffer<float> fc_b(backend, size_t(L) * F);                                          // (L, F)
  Buffer<float> proj_w = random_buffer(backend, size_t(L) * D * F, std::sqrt(0.1 / F), seed + 3);  // (L, D, F)
  Buffer<float> proj_b(backend, size_t(L) * D);                                        // (L, D)
  Buffer<float> g_router(backend, size_t(E) * D), g_fc_w(backend, size_t(L) * F * D),
      g_fc_b(backend, size_t(L) * F), g_proj_w(backend, size_t(L) * D * F),
      g_proj_b(backend, size_t(L) * D);
  ActBuffer x = random_activations(backend, size_t(T) * D, 1.0, seed + 4);     // (T, D)
  ActBuffer dout = random_activations(backend, size_t(T) * D, 1e-3, seed + 5); // (T, D)
  ActBuffer out(backend, size_t(T) * D);                                        // (T, D)
  ActBuffer dx(backend, size_t(T) * D);                                         // (T, D)
  const SwitchWeights w{router.data(), fc_w.data(), fc_b.data(), proj_w.data(), proj_b.data()};
  const SwitchGrads g{g_router.data(), g_fc_w.data(), g_fc_b.data(), g_proj_w.data(),
                      g_proj_b.data()};

  PhaseTimes times;
  SwitchLayer layer(backend, SwitchShape{T, D, F, E, K, 0}, SwitchGroups{self, world, world},
                    times);
  RoutingOptions routing;
  routing.capacity_factor = cf;
  routing.seed = 1234;
  std::vector<double> total, fwd, bwd, other;
  std::vector<std::vector<double>> phases(std::size(kPhases));
  double dropped = 0;
  for (int i = 0; i < o.warmup + o.iters; ++i) {
    routing.iteration = i + 1;
    times.reset();
    world.barrier();
    const double f = time_ms([&] { layer.forward(out.data(), x.data(), w, T, routing); });
    const double b = time_ms([&] {
      layer.backward(dx.data(), g, dout.data(), x.data(), w, 0.01f, 0.001f);
    });
    dropped = layer.stats().dropped_fraction();
    if (i < o.warmup) continue;
    fwd.push_back(f);
    bwd.push_back(b);
    total.push_back(f + b);
    double in_phases = 0;
    for (size_t p = 0; p < std::size(kPhases); ++p) {
      phases[p].push_back(times.ms(kPhases[p]));
      in_phases += times.ms(kPhases[p]);
    }
    other.push_back(f + b - in_phases);
  }
  RowResult r{E, K, cf, slowest_median(total), slowest_median(fwd),
              slowest_median(bwd), {}, slowest_median(other), dropped};
  for (auto& samples : phases) r.phase_ms.push_back(slowest_median(samples));
  return r;
}

int run(int argc, char** argv) {
  std::optional<LayerOptions> parsed = parse_options(argc, argv);
  if (!parsed) return 0;
  const LayerOptions& o = *parsed;
  omp_set_num_threads(o.threads);
  auto backend = make_cpu_backend();
  std::unique_ptr<Communicator> world = make_mpi_world_communicator();
  std::unique_ptr<Communicator> self = make_self_communicator();
  const bool root = world->rank() == 0;
  if (root) {
    std::printf("# bench_moe_layer: ep %d (ranks), %d tokens per rank, D %d, F %d, %d threads, "
                "%d iterations (median of the slowest rank), %d warm-up\n",
                world->size(), o.tokens, o.hidden, o.ffn, o.threads, o.iters, o.warmup);
    std::printf("# %4s %3s %6s %10s %9s %9s %8s %8s %8s %8s %8s %8s %8s\n", "E", "k", "cf",
                "fwd+bwd ms", "fwd", "bwd", "router", "permute", "a2a", "expert", "combine",
                "other", "dropped");
  }
  nlohmann::json rows = nlohmann::json::array();
  for (int E : o.experts)
    for (int K : o.top_ks)
      for (double cf : o.capacity_factors) {
        const RowResult r = run_row(o, *backend, *world, *self, E, K, cf);
        if (root) {
          std::printf("  %4d %3d %6.2f %10.2f %9.2f %9.2f", r.experts, r.top_k,
                      r.capacity_factor, r.total_ms, r.fwd_ms, r.bwd_ms);
          for (double ms : r.phase_ms) std::printf(" %8.2f", ms);
          std::printf(" %8.2f %8.3f\n", r.other_ms, r.dropped);
          std::fflush(stdout);
        }
        nlohmann::json phase_json = nlohmann::json::object();
        for (size_t p = 0; p < std::size(kPhases); ++p)
          phase_json[phase_name(kPhases[p])] = r.phase_ms[p];
        phase_json["other"] = r.other_ms;
        rows.push_back({{"experts", r.experts}, {"top_k", r.top_k},
                        {"capacity_factor", r.capacity_factor}, {"ep", world->size()},
                        {"tokens_per_rank", o.tokens}, {"fwd_bwd_ms", r.total_ms},
                        {"fwd_ms", r.fwd_ms}, {"bwd_ms", r.bwd_ms}, {"phases_ms", phase_json},
                        {"dropped_fraction", r.dropped}});
      }
  const nlohmann::json result = {{"benchmark", "moe_layer"}, {"ep", world->size()},
                                 {"hidden", o.hidden}, {"ffn", o.ffn}, {"threads", o.threads},
                                 {"iters", o.iters}, {"rows", rows}};
  if (root) {
    if (!o.json_path.empty()) {
      std::ofstream out(o.json_path);
      out << result.dump(1) << "\n";
      if (!out) throw RuntimeError("cannot write " + o.json_path);
    }
    print_json_line(result);
  }
  return 0;
}

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) {
  moe::MpiRuntime mpi(&argc, &argv);
  return moe::run_main("bench_moe_layer", mpi, [&] { return moe::bench::run(argc, argv); });
}
