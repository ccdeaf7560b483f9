// bench_alltoall: the project's all-to-all against a bare MPI call of the same bytes, in the
// conventions of nccl-tests (alltoall_perf), run under mpirun:
//
//   mpirun -np 2 bench_alltoall [-b 4M] [-e 4M] [-f 2] [-n 20] [-w 5] [-c 1] [--json FILE]
//   mpirun -np 2 bench_alltoall --moe [-b 4M] [-e 4M] [--hidden 256] [--experts 8]
//
// Plain mode, per size: `Communicator::alltoallv` (what the trainer calls) and a bare
// MPI_Alltoall of the same buffers. size = bytes each rank sends in total (count/n to every
// peer), time = median over -n iterations of the slowest rank's time (us), algbw = size / time
// (GB/s = 1e9 B/s), busbw = algbw * (n-1)/n. #wrong counts received elements that differ from
// the seeded values their sender wrote (a separate run into a poisoned buffer, -c 1).
//
// --moe mode, per size and routing case: each rank holds size/(4*hidden) tokens (rows of
// activations, fp32 on the CPU backend), routes them (uniform or Zipf-skewed, top-1 or top-2,
// dropless or with a capacity factor), and times ExpertDispatcher dispatch + combine, the
// trainer's token exchange, beside two bare MPI_Alltoallv calls (there and back) of the same
// counts; plan (the exchange of the counts that must precede it) is timed on its own and
// printed beside. size = the mean bytes a rank dispatches, time = there-and-back time,
// algbw = 2 * size / time.
//
// Both sides run alternately in one process (barrier before each), so both see the same load;
// the ratio line compares their medians.
#include <mpi.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdint>
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
#include "dist/communicator.h"
#include "dist/mpi_runtime.h"
#include "experts/capacity.h"
#include "experts/dispatcher.h"
#include "launcher/run_main.h"

namespace po = boost::program_options;

namespace moe::bench {
namespace {

struct AlltoallOptions {
  size_t min_bytes = size_t{4} << 20;
  size_t max_bytes = size_t{4} << 20;
  double step_factor = 2.0;
  int iters = 20;
  int warmup = 5;
  int check = 1;
  std::string json_path;
  bool moe = false;
  int hidden = 256;         // D, floats per token row
  int experts = 8;          // E
  double zipf_s = 1.2;      // skew exponent of the Zipf routing
  std::vector<std::string> routings = {"uniform", "zipf"};
  std::vector<int> top_ks = {1, 2};
  std::vector<double> capacity_factors = {0.0, 1.25};
  uint64_t seed = 1234;
};

// "4M", "512K", "1G", "4096": bytes.
size_t parse_size(const std::string& text) {
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw UsageError("not a size: '" + text + "' (e.g. 4096, 512K, 4M, 1G)");
  }
  const std::string suffix = text.substr(pos);
  double scale = 1;
  if (suffix == "K" || suffix == "k") scale = 1024.0;
  else if (suffix == "M" || suffix == "m") scale = 1024.0 * 1024;
  else if (suffix == "G" || suffix == "g") scale = 1024.0 * 1024 * 1024;
  else if (!suffix.empty()) throw UsageError("not a size: '" + text + "' (e.g. 4096, 512K, 4M, 1G)");
  if (value <= 0) throw UsageError("sizes must be positive: '" + text + "'");
  return static_cast<size_t>(value * scale);
}

std::optional<AlltoallOptions> parse_options(int argc, char** argv) {
  AlltoallOptions o;
  std::string min_text = "4M", max_text = "4M";
  po::options_description desc(
      "usage: mpirun -np N bench_alltoall [options]\n"
      "Times Communicator::alltoallv (or, with --moe, ExpertDispatcher dispatch+combine)\n"
      "beside a bare MPI call of the same bytes; nccl-tests columns");
  desc.add_options()
      ("help,h", "print this help and exit")
      ("minbytes,b", po::value(&min_text)->default_value(min_text), "smallest size per rank")
      ("maxbytes,e", po::value(&max_text)->default_value(max_text), "largest size per rank")
      ("stepfactor,f", po::value(&o.step_factor)->default_value(o.step_factor),
       "multiply the size by this between rows")
      ("iters,n", po::value(&o.iters)->default_value(o.iters), "timed iterations per size")
      ("warmup_iters,w", po::value(&o.warmup)->default_value(o.warmup), "untimed iterations first")
      ("check,c", po::value(&o.check)->default_value(o.check),
       "1: check the received data against the seeded values (#wrong); 0: skip")
      ("json", po::value(&o.json_path), "also write every row as JSON to this file")
      ("moe", po::bool_switch(&o.moe), "time the dispatch and combine of routed tokens")
      ("hidden", po::value(&o.hidden)->default_value(o.hidden), "--moe: floats per token")
      ("experts", po::value(&o.experts)->default_value(o.experts), "--moe: number of experts")
      ("zipf-s", po::value(&o.zipf_s)->default_value(o.zipf_s),
       "--moe: Zipf exponent; expert i is chosen with weight 1/(i+1)^s")
      ("routing", po::value(&o.routings)->multitoken(), "--moe: uniform and/or zipf (default both)")
      ("top-k", po::value(&o.top_ks)->multitoken(), "--moe: 1 and/or 2 (default both)")
      ("capacity-factor", po::value(&o.capacity_factors)->multitoken(),
       "--moe: capacity factors, 0 = dropless (default 0 1.25)")
      ("seed", po::value(&o.seed)->default_value(o.seed), "seed of the data and the routing");
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
  o.min_bytes = parse_size(min_text);
  o.max_bytes = parse_size(max_text);
  if (o.max_bytes < o.min_bytes) throw UsageError("-e (maxbytes) is below -b (minbytes)");
  if (!(o.step_factor > 1.0)) throw UsageError("-f (stepfactor) must be above 1");
  if (o.iters < 1) throw UsageError("-n (iters) must be at least 1");
  if (o.warmup < 0) throw UsageError("-w (warmup_iters) must not be negative");
  if (o.check != 0 && o.check != 1) throw UsageError("-c (check) must be 0 or 1");
  if (o.hidden < 1) throw UsageError("--hidden must be at least 1");
  if (o.experts < 1) throw UsageError("--experts must be at least 1");
  if (o.zipf_s < 0) throw UsageError("--zipf-s must not be negative");
  for (const std::string& r : o.routings)
    if (r != "uniform" && r != "zipf") throw UsageError("--routing must be uniform or zipf, not '" + r + "'");
  for (int k : o.top_ks)
    if (k < 1 || k > o.experts) throw UsageError("--top-k must be between 1 and --experts");
  for (double cf : o.capacity_factors)
    if (cf < 0) throw UsageError("--capacity-factor must not be negative");
  return o;
}

// The value the sender `src` writes at element i of its block for `dst`: exact in fp32.
float seeded_value(uint64_t seed, int src, int dst, int64_t i) {
  const uint64_t h = (seed * 0x9E3779B97F4A7C15ull) ^ (static_cast<uint64_t>(src) * 1000003u) ^
                     (static_cast<uint64_t>(dst) * 7919u) ^ static_cast<uint64_t>(i);
  return static_cast<float>((h * 2654435761u) % 65521u);
}

// The MPI type of one activation element: the bare side only moves the bytes.
MPI_Datatype mpi_element(ActType type) {
  return type == ActType::kF32 ? MPI_FLOAT : MPI_UINT16_T;
}

// An activation type as nccl-tests names it in the type column.
const char* nccl_type_name(ActType type) { return type == ActType::kF32 ? "float" : "bfloat16"; }

void check_mpi(int code, const char* what) {
  if (code != MPI_SUCCESS) throw RuntimeError(std::string("MPI ") + what + " failed");
}

// Times of one side, one sample per iteration (the slowest rank's).
struct Samples {
  std::vector<double> us;
  void add(double ms) { us.push_back(ms * 1e3); }
  // Element-wise max over ranks: an iteration lasts until its slowest rank is done.
  void reduce_max(MPI_Comm comm) {
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, us.data(), static_cast<int>(us.size()), MPI_DOUBLE,
                            MPI_MAX, comm),
              "all-reduce (times)");
  }
  double median_us() const { return median(us); }
};

struct Row {
  size_t bytes;     // size (B) per rank
  size_t count;     // elements per rank
  double time_us;   // median
  double algbw;     // GB/s
  double busbw;     // GB/s
  long long wrong;  // -1: not checked
};

nlohmann::json row_json(const Row& r) {
  return {{"size", r.bytes}, {"count", r.count}, {"time_us", r.time_us}, {"algbw", r.algbw},
          {"busbw", r.busbw}, {"wrong", r.wrong}};
}

// One side's columns: time algbw busbw #wrong.
void print_side(const Row& r) {
  std::printf(" %10.1f %7.2f %7.2f %6s", r.time_us, r.algbw, r.busbw,
              r.wrong < 0 ? "N/A" : std::to_string(r.wrong).c_str());
}

void print_header(const char* left, const char* right) {
  std::printf("#%54s%-33s %s\n", "", left, right);
  std::printf("# %10s %12s %8s %6s %6s %10s %7s %7s %6s %10s %7s %7s %6s %7s\n", "size", "count",
              "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw",
              "busbw", "#wrong", "ratio");
  std::printf("# %10s %12s %8s %6s %6s %10s %7s %7s %6s %10s %7s %7s %6s %7s\n", "(B)",
              "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)",
              "(GB/s)", "", "algbw");
}

std::vector<size_t> size_sweep(const AlltoallOptions& o, size_t granule) {
  std::vector<size_t> sizes;
  for (double s = static_cast<double>(o.min_bytes); s <= static_cast<double>(o.max_bytes) * 1.0001;
       s *= o.step_factor) {
    const size_t rounded = std::max(granule, static_cast<size_t>(s) / granule * granule);
    if (sizes.empty() || sizes.back() != rounded) sizes.push_back(rounded);
  }
  return sizes;
}

// ---------------------------------------------------------------- plain all-to-all

struct PlainResult {
  Row ours, bare;
};

PlainResult run_plain_size(const AlltoallOptions& o, Communicator& comm, size_t bytes) {
  const int n = comm.size(), me = comm.rank();
  const size_t per_peer = bytes / sizeof(float) / n;  // floats to each peer
  const size_t count = per_peer * n;
  std::vector<float> send(count), recv(count);  // (n, per_peer) each
  for (int p = 0; p < n; ++p)
    for (size_t i = 0; i < per_peer; ++i) send[p * per_peer + i] = seeded_value(o.seed, me, p, i);
  const std::vector<int64_t> counts(n, static_cast<int64_t>(per_peer));

  auto ours = [&] { comm.alltoallv(recv.data(), counts, send.data(), counts); };
  auto bare = [&] {
    check_mpi(MPI_Alltoall(send.data(), static_cast<int>(per_peer), MPI_FLOAT, recv.data(),
                           static_cast<int>(per_peer), MPI_FLOAT, MPI_COMM_WORLD),
              "Alltoall");
  };
  // #wrong: receive into a poisoned buffer and compare with what each sender wrote.
  auto count_wrong = [&](auto&& exchange) -> long long {
    if (!o.check) return -1;
    std::fill(recv.begin(), recv.end(), -1.0f);
    comm.barrier();
    exchange();
    long long wrong = 0;
    for (int s = 0; s < n; ++s)
      for (size_t i = 0; i < per_peer; ++i)
        wrong += recv[s * per_peer + i] != seeded_value(o.seed, s, me, i);
    comm.allreduce_sum(&wrong, 1);
    return wrong;
  };

  for (int i = 0; i < o.warmup; ++i) {
    comm.barrier();
    ours();
    comm.barrier();
    bare();
  }
  Samples ours_t, bare_t;
  for (int i = 0; i < o.iters; ++i) {
    // Alternate which side goes first, so neither always follows the other's cache state.
    for (int side = 0; side < 2; ++side) {
      const bool ours_side = (side == 0) == (i % 2 == 0);
      comm.barrier();
      if (ours_side) ours_t.add(time_ms(ours));
      else bare_t.add(time_ms(bare));
    }
  }
  ours_t.reduce_max(MPI_COMM_WORLD);
  bare_t.reduce_max(MPI_COMM_WORLD);
  const size_t real_bytes = count * sizeof(float);
  auto make_row = [&](const Samples& t, long long wrong) {
    const double time_us = t.median_us();
    const double algbw = real_bytes / (time_us * 1e-6) / 1e9;
    return Row{real_bytes, count, time_us, algbw, algbw * (n - 1) / n, wrong};
  };
  PlainResult result;
  result.ours = make_row(ours_t, count_wrong(ours));
  result.bare = make_row(bare_t, count_wrong(bare));
  return result;
}

// ---------------------------------------------------------------- --moe: routed tokens

struct MoeCase {
  std::string routing;     // uniform | zipf
  int top_k;
  double capacity_factor;  // 0 = dropless
  std::string label() const {
    char text[96];
    if (capacity_factor > 0)
      std::snprintf(text, sizeof text, "%s top-%d cf=%.2f", routing.c_str(), top_k,
                    capacity_factor);
    else
      std::snprintf(text, sizeof text, "%s top-%d dropless", routing.c_str(), top_k);
    return text;
  }
};

// This rank's top-k expert choices for T tokens (distinct experts per token), seeded by rank.
std::vector<int> route_tokens(const AlltoallOptions& o, const MoeCase& c, int tokens, int rank) {
  std::mt19937_64 rng(o.seed * 1000003u + static_cast<uint64_t>(rank) * 7919u + c.top_k);
  std::vector<double> weight(o.experts, 1.0);
  if (c.routing == "zipf")
    for (int e = 0; e < o.experts; ++e) weight[e] = 1.0 / std::pow(e + 1.0, o.zipf_s);
  std::vector<int> expert_idx_TK(static_cast<size_t>(tokens) * c.top_k);  // (T, K)
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> w = weight;
    for (int k = 0; k < c.top_k; ++k) {
      std::discrete_distribution<int> pick(w.begin(), w.end());
      const int e = pick(rng);
      expert_idx_TK[t * c.top_k + k] = e;
      w[e] = 0.0;  // the next choice is another expert
    }
  }
  return expert_idx_TK;
}

// Kept rows per expert (E) after capacity, first choices before second ones (position policy).
std::vector<int> kept_counts(const std::vector<int>& expert_idx_TK, int tokens, int num_experts,
                             const MoeCase& c) {
  const int capacity = c.capacity_factor > 0
                           ? expert_capacity(c.capacity_factor, tokens, c.top_k, num_experts)
                           : tokens * c.top_k;
  std::vector<int> counts_E(num_experts, 0);
  for (int k = 0; k < c.top_k; ++k)
    for (int t = 0; t < tokens; ++t) {
      int& count = counts_E[expert_idx_TK[t * c.top_k + k]];
      if (count < capacity) ++count;
    }
  return counts_E;
}

struct MoeResult {
  Row ours, bare;
  double dropped_fraction;
  double max_over_mean;  // the busiest rank's received rows / the mean: the skew's cost
  double plan_us;        // ExpertDispatcher::plan alone (the counts' exchange)
};

MoeResult run_moe_size(const AlltoallOptions& o, Communicator& comm, Backend& backend,
                       const MoeCase& c, size_t bytes) {
  const int n = comm.size(), me = comm.rank(), D = o.hidden;
  if (o.experts % n != 0)
    throw UsageError("--experts " + std::to_string(o.experts) + " is not divisible by the " +
                     std::to_string(n) + " ranks");
  // Rows travel in the backend's activation type: the bare side moves the same bytes.
  const ActType type = backend.activation_type();
  const MPI_Datatype element = mpi_element(type);
  const int tokens = std::max<int>(1, static_cast<int>(bytes / (act_bytes(type) * D)));
  const std::vector<int> expert_idx_TK = route_tokens(o, c, tokens, me);
  const std::vector<int> counts_E = kept_counts(expert_idx_TK, tokens, o.experts, c);
  int rows = 0;
  for (int count : counts_E) rows += count;

  ExpertDispatcher dispatcher(backend, comm, o.experts);
  const DispatchHandle handle = dispatcher.plan(counts_E.data());
  // Rows in global expert order; row r of expert e carries the seeded values of (me -> owner).
  const int L = o.experts / n;
  const size_t rows_D = static_cast<size_t>(std::max(rows, 1)) * D;
  const size_t local_rows_D = static_cast<size_t>(std::max(handle.num_local_rows, 1)) * D;
  ActBuffer x_RD(backend, rows_D);           // (R, D)
  ActBuffer y_RD(backend, rows_D);           // (R, D)
  ActBuffer x_local(backend, local_rows_D);  // (R_local, D)
  {
    std::vector<float> host(static_cast<size_t>(rows) * D);
    int row = 0;
    for (int e = 0; e < o.experts; ++e)
      for (int j = 0; j < counts_E[e]; ++j, ++row)
        for (int d = 0; d < D; ++d)
          host[static_cast<size_t>(row) * D + d] = seeded_value(o.seed, me, e / L, row * D + d);
    backend.copy_act_from_host(x_RD.data(), host.data(), host.size());
  }

  // The bare side: the same counts there and back, no planning and no reordering.
  std::vector<int> send_counts(n), recv_counts(n), send_displs(n), recv_displs(n);
  for (int p = 0, soff = 0, roff = 0; p < n; ++p) {
    send_counts[p] = static_cast<int>(handle.send_rows[p] * D);
    recv_counts[p] = static_cast<int>(handle.recv_rows[p] * D);
    send_displs[p] = soff;
    recv_displs[p] = roff;
    soff += send_counts[p];
    roff += recv_counts[p];
  }
  ActBuffer bare_recv(backend, local_rows_D);  // (R_local, D)
  ActBuffer bare_back(backend, rows_D);        // (R, D)

  auto ours = [&] {
    dispatcher.dispatch(handle, x_local.data(), x_RD.data(), D);
    dispatcher.combine(handle, y_RD.data(), x_local.data(), D);
  };
  auto plan = [&] { (void)dispatcher.plan(counts_E.data()); };
  auto bare = [&] {
    check_mpi(MPI_Alltoallv(x_RD.data(), send_counts.data(), send_displs.data(), element,
                            bare_recv.data(), recv_counts.data(), recv_displs.data(), element,
                            MPI_COMM_WORLD),
              "Alltoallv");
    check_mpi(MPI_Alltoallv(bare_recv.data(), recv_counts.data(), recv_displs.data(), element,
                            bare_back.data(), send_counts.data(), send_displs.data(), element,
                            MPI_COMM_WORLD),
              "Alltoallv");
  };
  // #wrong: every row must come back to its own place unchanged (combine inverts dispatch),
  // and every row a rank's experts received must carry the values its sender wrote for it.
  auto count_wrong = [&](bool ours_side) -> long long {
    if (!o.check) return -1;
    std::vector<float> back(static_cast<size_t>(rows) * D, -1.0f);
    std::vector<float> sent(static_cast<size_t>(rows) * D);
    backend.copy_act_to_host(sent.data(), x_RD.data(), sent.size());
    // Poison the side's output (-1 everywhere), exchange, read it back.
    ActBuffer& out = ours_side ? y_RD : bare_back;
    backend.copy_act_from_host(out.data(), back.data(), back.size());
    comm.barrier();
    if (ours_side) ours();
    else bare();
    backend.copy_act_to_host(back.data(), out.data(), back.size());
    long long wrong = 0;
    for (size_t i = 0; i < back.size(); ++i) wrong += back[i] != sent[i];
    comm.allreduce_sum(&wrong, 1);
    return wrong;
  };

  for (int i = 0; i < o.warmup; ++i) {
    comm.barrier();
    ours();
    comm.barrier();
    bare();
  }
  Samples ours_t, bare_t, plan_t;
  for (int i = 0; i < o.iters; ++i) {
    for (int side = 0; side < 2; ++side) {
      const bool ours_side = (side == 0) == (i % 2 == 0);
      comm.barrier();
      if (ours_side) ours_t.add(time_ms(ours));
      else bare_t.add(time_ms(bare));
    }
    comm.barrier();
    plan_t.add(time_ms(plan));
  }
  ours_t.reduce_max(MPI_COMM_WORLD);
  bare_t.reduce_max(MPI_COMM_WORLD);
  plan_t.reduce_max(MPI_COMM_WORLD);

  // Sizes and skew over the group: the mean bytes dispatched per rank, the most received.
  int dropped = tokens * c.top_k - rows;
  long long kept_rows = rows;
  comm.allreduce_sum(&kept_rows, 1);
  long long dropped_all = dropped;
  comm.allreduce_sum(&dropped_all, 1);
  int most_received = handle.num_local_rows;
  comm.allreduce_max(&most_received, 1);
  const double mean_rows = static_cast<double>(kept_rows) / n;
  const size_t mean_bytes = static_cast<size_t>(mean_rows * D * act_bytes(type));
  auto make_row = [&](const Samples& t, long long wrong) {
    const double time_us = t.median_us();
    const double algbw = 2.0 * mean_bytes / (time_us * 1e-6) / 1e9;
    return Row{mean_bytes, static_cast<size_t>(mean_rows * D), time_us, algbw,
               algbw * (n - 1) / n, wrong};
  };
  MoeResult result;
  result.ours = make_row(ours_t, count_wrong(true));
  result.bare = make_row(bare_t, count_wrong(false));
  result.dropped_fraction =
      static_cast<double>(dropped_all) / (static_cast<double>(tokens) * c.top_k * n);
  result.max_over_mean = mean_rows > 0 ? most_received / mean_rows : 0.0;
  result.plan_us = plan_t.median_us();
  return result;
}

int run(const MpiRuntime& mpi, int argc, char** argv) {
  std::optional<AlltoallOptions> parsed = parse_options(argc, argv);
  if (!parsed) return 0;
  const AlltoallOptions& o = *parsed;
  std::unique_ptr<Communicator> comm = make_mpi_world_communicator();
  const int n = comm->size();
  const bool root = comm->rank() == 0;
  nlohmann::json json = {{"benchmark", o.moe ? "alltoall_moe" : "alltoall"},
                         {"nranks", n},
                         {"iters", o.iters},
                         {"warmup", o.warmup},
                         {"type", "float"},
                         {"statistic", "median over iterations of the slowest rank's time"}};
  nlohmann::json rows = nlohmann::json::array();
  double busbw_sum = 0;
  int busbw_rows = 0;
  long long wrong_total = 0;
  std::vector<double> ratios;

  if (root) {
    std::printf("# bench_alltoall: %d ranks, %d iterations (median), %d warm-up, check %d\n", n,
                o.iters, o.warmup, o.check);
    std::printf("# ratio = our algbw / the bare MPI algbw of the same bytes, same run\n#\n");
  }
  if (!o.moe) {
    if (root) print_header("Communicator::alltoallv", "bare MPI_Alltoall");
    for (size_t bytes : size_sweep(o, sizeof(float) * n)) {
      const PlainResult r = run_plain_size(o, *comm, bytes);
      const double ratio = r.ours.algbw / r.bare.algbw;
      if (root) {
        std::printf("  %10zu %12zu %8s %6s %6d", r.ours.bytes, r.ours.count, "float", "none", -1);
        print_side(r.ours);
        print_side(r.bare);
        std::printf(" %7.3f\n", ratio);
        std::fflush(stdout);
      }
      rows.push_back({{"ours", row_json(r.ours)}, {"bare_mpi_alltoall", row_json(r.bare)},
                      {"ratio_algbw", ratio}});
      busbw_sum += r.ours.busbw;
      ++busbw_rows;
      wrong_total += std::max(0LL, r.ours.wrong) + std::max(0LL, r.bare.wrong);
      ratios.push_back(ratio);
    }
  } else {
    auto backend = make_cpu_backend();
    // Token rows are activations: their element decides the tokens a size holds.
    const size_t element_bytes = act_bytes(backend->activation_type());
    const char* element_name = nccl_type_name(backend->activation_type());
    json["type"] = element_name;
    std::vector<MoeCase> cases;
    for (const std::string& routing : o.routings)
      for (int k : o.top_ks)
        for (double cf : o.capacity_factors) cases.push_back({routing, k, cf});
    json["hidden"] = o.hidden;
    json["experts"] = o.experts;
    json["zipf_s"] = o.zipf_s;
    json["size_meaning"] =
        "size = mean bytes dispatched per rank; tokens per rank = requested size / (element "
        "bytes*hidden), 4*hidden in fp32; "
        "time = dispatch+combine (ours; plan_us alone) or two MPI_Alltoallv (bare); algbw = 2*size/time";
    for (size_t bytes : size_sweep(o, element_bytes * o.hidden)) {
      if (root) {
        std::printf("# --moe: %zu tokens per rank of %d %s, %d experts\n",
                    bytes / (element_bytes * o.hidden), o.hidden, element_name, o.experts);
        print_header("ExpertDispatcher dispatch+combine", "bare MPI_Alltoallv x2");
      }
      for (const MoeCase& c : cases) {
        const MoeResult r = run_moe_size(o, *comm, *backend, c, bytes);
        const double ratio = r.ours.algbw / r.bare.algbw;
        if (root) {
          std::printf("  %10zu %12zu %8s %6s %6d", r.ours.bytes, r.ours.count, element_name,
                      "none", -1);
          print_side(r.ours);
          print_side(r.bare);
          std::printf(" %7.3f   %s, dropped %.3f, busiest rank %.2fx mean, plan %.1f us\n",
                      ratio, c.label().c_str(), r.dropped_fraction, r.max_over_mean, r.plan_us);
          std::fflush(stdout);
        }
        rows.push_back({{"routing", c.routing}, {"top_k", c.top_k},
                        {"capacity_factor", c.capacity_factor},
                        {"tokens_per_rank", bytes / (element_bytes * o.hidden)},
                        {"dropped_fraction", r.dropped_fraction},
                        {"busiest_rank_over_mean", r.max_over_mean},
                        {"plan_us", r.plan_us},
                        {"ours", row_json(r.ours)}, {"bare_mpi_alltoallv", row_json(r.bare)},
                        {"ratio_algbw", ratio}});
        busbw_sum += r.ours.busbw;
        ++busbw_rows;
        wrong_total += std::max(0LL, r.ours.wrong) + std::max(0LL, r.bare.wrong);
        ratios.push_back(ratio);
      }
    }
  }
  const double avg_busbw = busbw_sum / std::max(1, busbw_rows);
  if (root) {
    std::printf("# Out of bounds values : %lld %s\n", wrong_total, wrong_total == 0 ? "OK" : "FAILED");
    std::printf("# Avg bus bandwidth    : %g \n", avg_busbw);
    std::printf("# Median algbw ratio (ours / bare MPI) : %.3f\n#\n", median(ratios));
  }
  json["rows"] = rows;
  json["avg_busbw"] = avg_busbw;
  json["wrong"] = wrong_total;
  json["median_ratio_algbw"] = median(ratios);
  if (root && !o.json_path.empty()) {
    std::ofstream out(o.json_path);
    out << json.dump(1) << "\n";
    if (!out) throw RuntimeError("cannot write " + o.json_path);
  }
  return wrong_total == 0 ? 0 : 1;
}

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) {
  moe::MpiRuntime mpi(&argc, &argv);
  return moe::run_main("bench_alltoall", mpi, [&] { return moe::bench::run(mpi, argc, argv); });
}
