#include "launcher/perf_model.h"

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moe {
namespace {

std::string format(const char* fmt, double a, double b = 0, double c = 0) {
  char text[256];
  std::snprintf(text, sizeof text, fmt, a, b, c);
  return text;
}

struct Shape {
  double L, C, F, E, K, V, T, NH, Tmax;
  double dense_layers, switch_layers;
};

Shape shape_of(const Workload& w) {
  const ModelConfig& m = w.model;
  const double switch_layers = m.num_switch_layers();
  return {double(m.num_layers), double(m.hidden_size), double(m.ffn_hidden_size),
          double(m.num_experts), double(m.moe_router_topk), double(m.vocab_size),
          double(w.seq_length), double(m.num_attention_heads),
          double(m.max_position_embeddings), m.num_layers - switch_layers, switch_layers};
}

int resolved_global_batch(const Workload& w, const PlanLayout& layout) {
  return w.global_batch_size > 0 ? w.global_batch_size : w.micro_batch_size * layout.dp;
}

// Kept choices per routed choice: a capacity factor below 1 drops at least 1 - cf of them;
// with cf >= 1 (or dropless) balanced routing keeps them all.
double kept_fraction(const Workload& w) {
  return w.capacity_factor > 0 ? std::min(1.0, w.capacity_factor) : 1.0;
}

// Rows a rank's experts can receive per routed token of one source rank: with a capacity
// factor each of its E/ep experts takes at most ceil(cf*S*k/E) rows from each of the ep
// sources, cf*S*k in all; dropless, up to every row of every source (ep*S*k).
double received_rows_bound(const Workload& w, const PlanLayout& layout) {
  return w.capacity_factor > 0 ? std::min<double>(layout.ep, w.capacity_factor) : layout.ep;
}

// Ring collectives over n ranks whose members span `span` consecutive world ranks: on one
// node when the span fits, across nodes otherwise.
struct Link {
  double gbps, latency_us;
};
Link link_for(const Hardware& hw, int span) {
  return span <= hw.ranks_per_node ? Link{hw.intra_gbps, hw.intra_latency_us}
                                   : Link{hw.inter_gbps, hw.inter_latency_us};
}

// Ring all-reduce: 2(n-1) steps, each rank sends 2(n-1)/n of the buffer.
double allreduce_ms(double bytes, int n, const Link& link) {
  if (n <= 1) return 0;
  return 2.0 * (n - 1) * link.latency_us * 1e-3 +
         2.0 * (n - 1) / n * bytes / (link.gbps * 1e9) * 1e3;
}

}  // namespace

void add_workload_options(boost::program_options::options_description& desc, Workload& w) {
  namespace po = boost::program_options;
  ModelConfig& m = w.model;
  desc.add_options()
      ("num-layers", po::value(&m.num_layers)->default_value(m.num_layers), "L")
      ("hidden-size", po::value(&m.hidden_size)->default_value(m.hidden_size), "C")
      ("num-attention-heads", po::value(&m.num_attention_heads)->default_value(m.num_attention_heads), "NH")
      ("ffn-hidden-size", po::value(&m.ffn_hidden_size)->default_value(m.ffn_hidden_size), "F")
      ("num-experts", po::value(&m.num_experts)->default_value(m.num_experts), "E (0: dense)")
      ("moe-layer-freq", po::value(&m.moe_layer_freq)->default_value(m.moe_layer_freq), "every freq-th layer is a Switch layer")
      ("moe-router-topk", po::value(&m.moe_router_topk)->default_value(m.moe_router_topk), "k")
      ("vocab-size", po::value(&m.vocab_size)->default_value(m.vocab_size), "V")
      ("max-position-embeddings", po::value(&m.max_position_embeddings)->default_value(m.max_position_embeddings), "Tmax")
      ("seq-length", po::value(&w.seq_length)->default_value(w.seq_length), "T")
      ("micro-batch-size", po::value(&w.micro_batch_size)->default_value(w.micro_batch_size), "sequences per micro-step per data-parallel rank")
      ("global-batch-size", po::value(&w.global_batch_size)->default_value(w.global_batch_size), "sequences per step (0: micro x dp)")
      ("moe-expert-capacity-factor", po::value(&w.capacity_factor)->default_value(w.capacity_factor), "0: dropless");
}

void read_workload_config(const std::string& path,
                          const boost::program_options::options_description& desc,
                          boost::program_options::variables_map& vm) {
  namespace po = boost::program_options;
  std::ifstream in(path);
  if (!in) throw UsageError("cannot read the config file " + path);
  try {
    po::store(po::parse_config_file(in, desc, /*allow_unregistered=*/true), vm);
  } catch (const po::error& e) {
    throw UsageError(path + ": " + e.what());
  }
}

std::string PlanLayout::str() const {
  return "tp" + std::to_string(tp) + " ep" + std::to_string(ep) + " dp" + std::to_string(dp);
}

std::vector<std::string> Hardware::describe() const {
  return {
      "hardware: " + name,
      format("ranks: %.0f nodes x %.0f ranks per node", nodes, ranks_per_node),
      format("GEMM rate (sustained, per rank): %.1f GFLOP/s", gemm_gflops),
      format("attention core rate (q k^T, causal softmax, att v): %.1f GFLOP/s",
             attention_gflops),
      format("memory bandwidth for elementwise ops: %.1f GB/s", memory_gbps),
      format("memory per rank: %.1f GiB", memory_gib),
      format("link on one node: %.1f GB/s per rank one way, %.1f us per step", intra_gbps,
             intra_latency_us),
      format("link across nodes: %.1f GB/s per rank one way, %.1f us per step", inter_gbps,
             inter_latency_us),
      format("bytes per element: weights %.0f, gradients %.0f, activations %.0f", param_bytes,
             grad_bytes, act_bytes),
      format("optimizer state: %.0f bytes per parameter (AdamW m, v)", optimizer_bytes) +
          (optimizer_bytes > 8 ? " and an fp32 master copy" : ""),
      format("busiest rank's expert rows / mean: %.2f", expert_imbalance),
      format("gradient all-reduce hidden under backward: %.0f%%", 100 * grad_overlap),
  };
}

double StepPrediction::ms(const std::string& phase) const {
  for (const auto& [name, value] : breakdown_ms)
    if (name == phase) return value;
  return 0;
}

void validate_plan(const Workload& w, const PlanLayout& layout, const Hardware& hw) {
  const ModelConfig& m = w.model;
  m.validate();
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw UsageError(what);
  };
  require(layout.tp >= 1 && layout.ep >= 1 && layout.dp >= 1, "tp, ep and dp must be positive");
  require(layout.world() == hw.nodes * hw.ranks_per_node,
          "the layout has " + std::to_string(layout.world()) + " ranks, the cluster " +
              std::to_string(hw.nodes * hw.ranks_per_node));
  require(m.num_attention_heads % layout.tp == 0,
          "tp " + std::to_string(layout.tp) + " does not divide the " +
              std::to_string(m.num_attention_heads) + " attention heads");
  require(m.ffn_hidden_size % layout.tp == 0,
          "tp " + std::to_string(layout.tp) + " does not divide the ffn size " +
              std::to_string(m.ffn_hidden_size));
  require(layout.dp % layout.ep == 0, "ep " + std::to_string(layout.ep) +
                                          " does not divide dp " + std::to_string(layout.dp));
  require(m.num_experts == 0 ? layout.ep == 1 : m.num_experts % layout.ep == 0,
          "ep " + std::to_string(layout.ep) + " does not divide the " +
              std::to_string(m.num_experts) + " experts");
  require(w.micro_batch_size >= 1 && w.seq_length >= 1, "micro-batch and sequence length must be positive");
  require(w.seq_length <= m.max_position_embeddings, "the sequence is longer than max positions");
  const int global = resolved_global_batch(w, layout);
  require(global % (w.micro_batch_size * layout.dp) == 0,
          "micro-batch " + std::to_string(w.micro_batch_size) + " x dp " +
              std::to_string(layout.dp) + " does not divide the global batch " +
              std::to_string(global));
}

// Parameters (DESIGN.md, Formats: the tensors of the safetensors names). The tp split follows
// ParamLayout: c_attn (weight and bias) and c_fc by rows, the projections by columns (their
// biases replicated); embeddings, LayerNorms and the router replicated; experts whole on each
// rank of the expert-parallel shard (E/ep of them).
ParamCounts count_params(const ModelConfig& model, const PlanLayout& layout) {
  const double C = model.hidden_size, F = model.ffn_hidden_size, E = model.num_experts,
               V = model.vocab_size, Tmax = model.max_position_embeddings,
               K = model.moe_router_topk, tp = layout.tp;
  const double switch_layers = model.num_switch_layers();
  const double dense_layers = model.num_layers - switch_layers;
  const double expert = 2 * C * F + F + C;  // one expert: c_fc, c_proj and their biases
  ParamCounts p;
  const double embeddings = V * C + Tmax * C + 2 * C;  // wte, wpe, ln_f
  const double attention_block = 4 * C + 3 * C * C + 3 * C + C * C + C;  // ln_1, ln_2, attn
  p.total = embeddings + model.num_layers * attention_block + dense_layers * expert +
            switch_layers * (E * C + E * expert);
  p.active_per_token = V * C + model.num_layers * 4 * C * C + dense_layers * 2 * C * F +
                       switch_layers * (K * 2 * C * F + E * C);
  p.dense_per_rank = embeddings +
                     model.num_layers * (4 * C + (3 * C * C + 3 * C + C * C) / tp + C) +
                     dense_layers * ((2 * C * F + F) / tp + C) + switch_layers * E * C;
  p.expert_per_rank = switch_layers * (E / layout.ep) * expert;
  return p;
}

// Activations of one micro-batch, B = micro-batch, C' = C/tp, F' = F/tp, NH' = NH/tp, after
// GptModel's and SwitchLayer's buffers (gpt.h, switch_layer.h):
//   per block  ln_1, attn_proj, res2, ln_2, ffn_out, res3: 6BTC; LayerNorm stats 4BT;
//              qkv 3BTC', atty BTC'; att_lse B NH' T; dense FFN fch, fch_gelu 2BTF'
//   Switch     S = BT/tp routed tokens, R = S k kept rows, R_in = R x min(ep, cf) received
//              (ep x R dropless): router noise/input/logits/probs 2SC + 2SE; x_RD, y_RD 2RC;
//              x_LD, y_LD 2 R_in C; h_LF, a_LF 2 R_in F
//   once       embedding BTC, ln_f BTC + 2BT, logits BTV, losses BT
//   backward   dres, dln 2BTC; datty BTC'; dqkv 3BTC'; dfch BTF';
//              Switch scratch (shared by layers) 2RC + 2 R_in C + R_in F + 2SE
MemoryEstimate estimate_memory(const Workload& w, const PlanLayout& layout, int param_bytes,
                               int grad_bytes, int optimizer_bytes, int act_bytes) {
  const Shape s = shape_of(w);
  const double tp = layout.tp, B = w.micro_batch_size, T = s.T;
  const double Cl = s.C / tp, Fl = s.F / tp, NHl = s.NH / tp;
  const ParamCounts p = count_params(w.model, layout);
  const double params = p.dense_per_rank + p.expert_per_rank;
  MemoryEstimate m;
  m.weights = params * param_bytes;
  m.grads = params * grad_bytes;
  m.optimizer = params * optimizer_bytes;

  const double BT = B * T;
  const double block = 6 * BT * s.C + 4 * BT + 4 * BT * Cl + B * NHl * T;
  const double S = BT / tp, R = S * s.K, R_in = R * received_rows_bound(w, layout);
  const double switch_saved = 2 * S * s.C + 2 * S * s.E + 2 * R * s.C + 2 * R_in * s.C +
                              2 * R_in * s.F;
  double elements = s.L * block + s.dense_layers * 2 * BT * Fl + s.switch_layers * switch_saved;
  elements += BT * s.C + BT * s.C + 2 * BT + BT * s.V + BT;
  elements += 2 * BT * s.C + 4 * BT * Cl + BT * Fl;
  if (s.switch_layers > 0) elements += 2 * R * s.C + 2 * R_in * s.C + R_in * s.F + 2 * S * s.E;
  m.activations = elements * act_bytes;
  return m;
}

// Bytes sent per rank per step (m micro-steps of B x T tokens on each data-parallel rank).
Volumes estimate_volumes(const Workload& w, const PlanLayout& layout, const Hardware& hw) {
  const Shape s = shape_of(w);
  const double micro_steps =
      double(resolved_global_batch(w, layout)) / (w.micro_batch_size * layout.dp);
  const double BT = double(w.micro_batch_size) * s.T;
  Volumes v;
  // Dispatch and combine in forward, their reverses in backward: four exchanges of the kept
  // rows of this rank's S = BT/tp routed tokens, of which (ep-1)/ep leave the rank.
  const double rows = BT / layout.tp * s.K * kept_fraction(w);
  v.alltoall = micro_steps * s.switch_layers * 4 * rows * s.C * hw.act_bytes *
               (layout.ep - 1) / layout.ep;
  // Per block: an all-reduce after attention's row-parallel projection (forward) and one
  // after its column-parallel input (backward); the same for a dense FFN; a Switch layer
  // all-gathers its outputs and its input gradients instead. An all-reduce sends 2(tp-1)/tp
  // of a BTC buffer, an all-gather (tp-1)/tp.
  const double buffer = BT * s.C * hw.act_bytes;
  const double ring = double(layout.tp - 1) / layout.tp;
  const double allreduces = 2 * s.L + 2 * s.dense_layers, allgathers = 2 * s.switch_layers;
  v.tp_allreduce = micro_steps * buffer * ring * (2 * allreduces + allgathers);
  const ParamCounts p = count_params(w.model, layout);
  v.dp_allreduce = p.dense_per_rank * hw.grad_bytes * 2.0 * (layout.dp - 1) / layout.dp;
  const int expert_dp = layout.tp * (layout.dp / layout.ep);
  v.expert_dp_allreduce =
      p.expert_per_rank * hw.grad_bytes * 2.0 * (expert_dp - 1) / expert_dp;
  return v;
}

// One step on the busiest rank:
//   dense GEMMs   6 x tokens x [L 4C^2/tp + dense 2CF/tp + VC]      at the GEMM rate
//   router        6 x tokens/tp x switch EC                        at the GEMM rate
//   expert GEMMs  6 x rows x switch 2CF, rows = tokens/tp k kept x imbalance
//   attention     tokens x L x 12 T C/tp (q k^T and att v over whole T x T blocks, x3 for
//                 backward)                                         at the attention rate
//   elementwise   bytes below / memory bandwidth; optimizer: 10 fp32 passes over the rank's
//                 parameters (AdamW reads p, g, m, v and writes p, m, v; zeroing, norm, check)
//   all-to-all    per exchange: latency + max(bytes to this node's peers / intra bandwidth,
//                 bytes to other nodes / inter bandwidth)
//   tp all-reduce ring over tp consecutive ranks; gradient all-reduce: ring over dp (dense)
//                 and over tp x dp/ep (experts), (1 - overlap) of it exposed after backward
StepPrediction predict_step(const Workload& w, const PlanLayout& layout, const Hardware& hw) {
  validate_plan(w, layout, hw);
  const Shape s = shape_of(w);
  const double tp = layout.tp;
  const double global = resolved_global_batch(w, layout);
  const double tokens = global * s.T / layout.dp;  // per data-parallel rank per step
  const double micro_steps = global / (w.micro_batch_size * layout.dp);
  StepPrediction out;
  out.layout = layout;
  out.params = count_params(w.model, layout);

  const double gemm = hw.gemm_gflops * 1e9 / 1e3;  // FLOP per ms
  const double dense_flops =
      6 * tokens * (s.L * 4 * s.C * s.C / tp + s.dense_layers * 2 * s.C * s.F / tp + s.V * s.C);
  const double router_flops = 6 * tokens / tp * s.switch_layers * s.E * s.C;
  const double rows = tokens / tp * s.K * kept_fraction(w) * hw.expert_imbalance;
  const double expert_flops = 6 * rows * s.switch_layers * 2 * s.C * s.F;
  const double attention_flops = tokens * s.L * 12 * s.T * s.C / tp;

  // Elementwise traffic per token, in elements (see the comment above estimate_memory for the
  // buffers): per block LayerNorms 2 x (2C forward + 4C backward), residual adds 12C, attention
  // softmax 7 NH' T (forward 3 passes, backward 4), biases and the qkv split 4C'; a dense FFN's
  // GELU 5F'; a Switch layer's permute, dispatch reorder and combine 14kC, the experts' GELU
  // 5kF and the router 10E; once: embedding 5C, ln_f 6C, cross-entropy 4V.
  const double Cl = s.C / tp, Fl = s.F / tp, NHl = s.NH / tp;
  const double per_token = s.L * (24 * s.C + 7 * NHl * s.T + 4 * Cl) + s.dense_layers * 5 * Fl +
                           s.switch_layers * (s.K * kept_fraction(w) * (14 * s.C + 5 * s.F) / tp +
                                              10 * s.E / tp) +
                           11 * s.C + 4 * s.V;
  const double elementwise_bytes = tokens * per_token * hw.act_bytes;
  const double params_here = out.params.dense_per_rank + out.params.expert_per_rank;
  const double optimizer_bytes = params_here * 10 * 4;
  const double memory = hw.memory_gbps * 1e9 / 1e3;  // bytes per ms

  out.volumes = estimate_volumes(w, layout, hw);
  // All-to-all: ep group members are consecutive dp ranks, world ranks tp apart.
  double alltoall_ms = 0;
  if (layout.ep > 1 && s.switch_layers > 0) {
    const int on_node = std::clamp(hw.ranks_per_node / layout.tp, 1, layout.ep);
    const double per_exchange = out.volumes.alltoall / (micro_steps * s.switch_layers * 4) *
                                layout.ep / (layout.ep - 1);  // bytes of the kept rows
    const double intra = per_exchange * (on_node - 1) / layout.ep / (hw.intra_gbps * 1e6);
    const double inter = per_exchange * (layout.ep - on_node) / layout.ep / (hw.inter_gbps * 1e6);
    const double latency =
        (on_node < layout.ep ? hw.inter_latency_us : hw.intra_latency_us) * 1e-3;
    alltoall_ms = micro_steps * s.switch_layers * 4 * (latency + std::max(intra, inter));
  }
  double tp_ms = 0;
  if (layout.tp > 1) {
    const double one = allreduce_ms(double(w.micro_batch_size) * s.T * s.C * hw.act_bytes,
                                    layout.tp, link_for(hw, layout.tp));
    const double allreduces = 2 * s.L + 2 * s.dense_layers, allgathers = 2 * s.switch_layers;
    tp_ms = micro_steps * (allreduces + 0.5 * allgathers) * one;  // an all-gather: half a ring
  }
  const int expert_dp = layout.tp * (layout.dp / layout.ep);
  const double grad_ms =
      allreduce_ms(out.params.dense_per_rank * hw.grad_bytes, layout.dp,
                   link_for(hw, layout.world())) +
      allreduce_ms(out.params.expert_per_rank * hw.grad_bytes, expert_dp,
                   link_for(hw, layout.world()));

  out.breakdown_ms = {
      {"dense_gemm", dense_flops / gemm},
      {"attention", attention_flops / (hw.attention_gflops * 1e9 / 1e3)},
      {"elementwise", elementwise_bytes / memory},
      {"router", router_flops / gemm},
      {"expert_gemm", expert_flops / gemm},
      {"all_to_all", alltoall_ms},
      {"tp_allreduce", tp_ms},
      {"grad_allreduce", grad_ms * (1 - hw.grad_overlap)},
      {"optimizer", optimizer_bytes / memory},
  };
  for (const auto& [name, ms] : out.breakdown_ms) out.step_ms += ms;
  out.tokens_per_sec = global * s.T / (out.step_ms * 1e-3);
  const double model_flops =
      global * s.T * (6 * out.params.active_per_token + 12 * s.L * s.T * s.C);
  out.model_tflops_per_rank = model_flops / layout.world() / (out.step_ms * 1e-3) / 1e12;
  out.memory = estimate_memory(w, layout, hw.param_bytes, hw.grad_bytes, hw.optimizer_bytes,
                               hw.act_bytes);
  out.fits = out.memory.total() <= hw.memory_gib * 1024.0 * 1024 * 1024;
  return out;
}

std::vector<StepPrediction> rank_layouts(const Workload& w, const Hardware& hw) {
  const int world = hw.nodes * hw.ranks_per_node;
  std::vector<StepPrediction> all;
  for (int tp = 1; tp <= world; ++tp) {
    if (world % tp != 0) continue;
    const int dp = world / tp;
    for (int ep = 1; ep <= dp; ++ep) {
      if (dp % ep != 0) continue;
      const PlanLayout layout{tp, ep, dp};
      try {
        validate_plan(w, layout, hw);
      } catch (const UsageError&) {
        continue;  // not a valid layout of this model on this cluster
      }
      all.push_back(predict_step(w, layout, hw));
    }
  }
  std::stable_sort(all.begin(), all.end(), [](const StepPrediction& a, const StepPrediction& b) {
    if (a.fits != b.fits) return a.fits;
    return a.step_ms < b.step_ms;
  });
  return all;
}

std::vector<std::string> calibrate(Hardware& hw, const std::vector<std::string>& json_paths) {
  std::vector<std::string> taken;
  for (const std::string& path : json_paths) {
    std::ifstream in(path);
    if (!in) throw UsageError("--calibrate: cannot read " + path);
    nlohmann::json j;
    try {
      // The JSON object is the file, or the last line of a benchmark's stdout.
      std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      const size_t last_open = text.rfind("\n{");
      if (nlohmann::json::accept(text)) j = nlohmann::json::parse(text);
      else if (last_open != std::string::npos) j = nlohmann::json::parse(text.substr(last_open + 1));
      else j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw UsageError("--calibrate: " + path + " is not benchmark JSON: " + e.what());
    }
    const std::string kind = j.value("benchmark", "");
    if (kind == "plan_calibrate") {
      hw.gemm_gflops = j.at("gemm_gflops").get<double>();
      hw.attention_gflops = j.at("attention_gflops").get<double>();
      hw.memory_gbps = j.at("memory_gbps").get<double>();
      taken.push_back(path + ": GEMM " + format("%.1f", hw.gemm_gflops) + " GFLOP/s, attention " +
                      format("%.1f", hw.attention_gflops) + " GFLOP/s, memory " +
                      format("%.1f", hw.memory_gbps) + " GB/s (" +
                      std::to_string(j.value("threads", 0)) + " threads)");
    } else if (kind == "step") {
      hw.gemm_gflops = j.at("sgemm_peak_gflops").get<double>();
      taken.push_back(path + ": GEMM " + format("%.1f", hw.gemm_gflops) +
                      " GFLOP/s (bench_step's sgemm peak)");
    } else if (kind == "alltoall") {
      const auto& rows = j.at("rows");
      if (rows.empty()) throw UsageError("--calibrate: " + path + " has no rows");
      // Bandwidth: bytes leaving a rank per second at the largest size (busbw); latency: the
      // time of the smallest size.
      const auto& largest = rows.back().at("ours");
      const auto& smallest = rows.front().at("ours");
      const int n = j.at("nranks").get<int>();
      if (n < 2) throw UsageError("--calibrate: " + path + " was measured on one rank");
      hw.intra_gbps = largest.at("busbw").get<double>();
      hw.intra_latency_us = smallest.at("time_us").get<double>();
      taken.push_back(path + ": link " + format("%.2f", hw.intra_gbps) + " GB/s (busbw at " +
                      format("%.0f", largest.at("size").get<double>()) + " B), latency " +
                      format("%.1f", hw.intra_latency_us) + " us (at " +
                      format("%.0f", smallest.at("size").get<double>()) + " B), " +
                      std::to_string(n) + " ranks");
    } else {
      throw UsageError("--calibrate: " + path + " is not plan_calibrate, bench_step or "
                       "bench_alltoall output (\"benchmark\": \"" + kind + "\")");
    }
  }
  return taken;
}

// Published peaks times the efficiency we assume a good trainer reaches; each is printed.
Hardware preset_hardware(const std::string& name, int nodes, int ranks_per_node) {
  Hardware hw;
  if (name == "h200") {
    hw.name = "NVIDIA H200 SXM (HGX, NVLink 4 + 400 Gb/s InfiniBand per GPU)";
    hw.gemm_gflops = 989e3 * 0.5;       // bf16 dense peak 989 TFLOP/s at 50% MFU
    hw.attention_gflops = 989e3 * 0.4;  // fused attention at 40% of peak
    hw.memory_gbps = 4800 * 0.7;        // HBM3e 4.8 TB/s at 70%
    hw.memory_gib = 141e9 / (1024.0 * 1024 * 1024) * 0.9;  // 141 GB, 10% for the runtime
    hw.intra_gbps = 450 * 0.8;          // NVLink 900 GB/s bidirectional, 80% of one way
    hw.inter_gbps = 50 * 0.8;           // one 400 Gb/s NIC per GPU at 80%
    hw.intra_latency_us = 10;
    hw.inter_latency_us = 20;
    hw.param_bytes = 2;                 // bf16 weights
    hw.grad_bytes = 4;                  // fp32 gradients
    hw.optimizer_bytes = 12;            // fp32 master weights + AdamW m, v
    hw.act_bytes = 2;                   // bf16 activations and all-to-all payloads
    hw.expert_imbalance = 1.25;         // the busiest rank as full as capacity 1.25 allows
    hw.grad_overlap = 0.8;
  } else {
    throw UsageError("unknown hardware preset '" + name + "' (known: h200)");
  }
  hw.nodes = nodes;
  hw.ranks_per_node = ranks_per_node;
  return hw;
}

// Decoder-only analogues of the Switch Transformer paper's models (Fedus et al. 2021, table 9):
// the same widths, experts and Switch-layer frequency, encoder and decoder layers counted as
// one stack of causal blocks, T5's 32k vocabulary.
Workload preset_workload(const std::string& name) {
  Workload w;
  ModelConfig& m = w.model;
  m.vocab_size = 32128;
  m.max_position_embeddings = 2048;
  w.seq_length = 1024;
  w.micro_batch_size = 1;
  w.global_batch_size = 1024;  // 1M tokens per step
  w.capacity_factor = 1.25;
  m.moe_router_topk = 1;
  if (name == "switch-base-128") {
    m.num_layers = 24;  // 12 encoder + 12 decoder
    m.hidden_size = 768;
    m.num_attention_heads = 12;
    m.ffn_hidden_size = 3072;
    m.num_experts = 128;
    m.moe_layer_freq = 2;
  } else if (name == "switch-c") {
    m.num_layers = 30;  // 15 encoder + 15 decoder
    m.hidden_size = 2080;
    m.num_attention_heads = 32;
    m.ffn_hidden_size = 6144;
    m.num_experts = 2048;
    m.moe_layer_freq = 1;
  } else {
    throw UsageError("unknown model preset '" + name + "' (known: switch-base-128, switch-c)");
  }
  return w;
}

}  // namespace moe
