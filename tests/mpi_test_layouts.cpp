// N ranks against one rank (DESIGN.md, Parallel layout): the expert-parallel token exchange,
// one Switch layer, and whole training runs must not depend on the layout.
//
//   ExpertDispatcher  dispatch delivers exactly the rows destined to this rank's experts, in
//                     (local expert, source rank) order; combine(dispatch(x)) == x bit for bit;
//                     dispatch is the adjoint of combine: <combine(y), x> == <y, dispatch(x)>.
//   SwitchLayer       outputs, losses, dx, router and expert gradients on every valid layout
//                     (ep = world, tp = 2, ...) against a single-process layer fed every token.
//   Trainer           per-iteration lm_loss, load_balancing_loss, z_loss, grad_norm and the
//                     final (gathered, exported) weights against Trainer(options, 1, 0).
//
// Runs under mpiexec at 2 and 4 ranks and alone at 1; every rank runs every test in the same
// order, since the tests call collectives (no ASSERT_* that could leave a rank behind). Every
// comparison prints the worst difference it saw, over all ranks.
#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"
#include "core/phase_times.h"
#include "dist/communicator.h"
#include "dist/parallel_dims.h"
#include "dist/process_groups.h"
#include "experts/dispatcher.h"
#include "experts/switch_layer.h"
#include "launcher/options.h"
#include "launcher/trainer.h"
#include "model/safetensors.h"
#include "model/weights_io.h"
#include "tests/mpi_testing.h"

namespace moe {
namespace {

using moe::testing::world_rank;
using moe::testing::world_size;

void print0(const char* format, const std::string& text) {
  if (world_rank() == 0) {
    std::printf(format, text.c_str());
    std::fflush(stdout);
  }
}

// The largest relative difference seen by this rank, |got - want| / scale; the destructor takes
// the max over every rank (a collective over the world: every rank must construct and destroy
// the same Worst objects in the same order) and prints it once.
class Worst {
 public:
  Worst(std::string what, double tolerance) : what_(std::move(what)), tolerance_(tolerance) {}
  // One value; scale 0 means relative to |want|.
  void expect_near(double got, double want, const std::string& where, double scale = 0.0) {
    const double s = std::max(scale > 0.0 ? scale : std::fabs(want), 1e-30);
    double rel = std::fabs(got - want) / s;
    if (std::isnan(rel)) rel = INFINITY;
    worst_ = std::max(worst_, rel);
    if (!(rel <= tolerance_) && failures_++ < 5)
      ADD_FAILURE() << what_ << ": " << where << ": got " << got << ", want " << want
                    << " (relative difference " << rel << ", tolerance " << tolerance_ << ")";
  }
  // A tensor: each element relative to the largest |want| of the tensor.
  void expect_tensor(const float* got, const float* want, size_t n, const std::string& where) {
    double scale = 0.0;
    for (size_t i = 0; i < n; ++i) scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
    if (scale == 0.0) scale = 1.0;  // an all-zero reference: absolute
    for (size_t i = 0; i < n; ++i) {
      double rel = std::fabs(static_cast<double>(got[i]) - want[i]) / scale;
      if (std::isnan(rel)) rel = INFINITY;
      if (rel > worst_) worst_where_ = where + "[" + std::to_string(i) + "]";
      if (rel <= tolerance_) {
        worst_ = std::max(worst_, rel);
        continue;
      }
      expect_near(got[i], want[i], where + "[" + std::to_string(i) + "]", scale);
    }
  }
  void expect_bits(const float* got, const float* want, size_t n, const std::string& where) {
    for (size_t i = 0; i < n; ++i) {
      if (std::memcmp(&got[i], &want[i], sizeof(float)) == 0) continue;
      worst_ = std::max(worst_, std::isnan(got[i] - want[i])
                                    ? INFINITY
                                    : std::fabs(static_cast<double>(got[i]) - want[i]));
      if (failures_++ < 5)
        ADD_FAILURE() << what_ << ": " << where << "[" << i << "]: got " << got[i] << ", want "
                      << want[i];
    }
  }
  ~Worst() {
    double all = worst_;
    MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (world_rank() == 0)
      std::printf("  %-64s worst diff over %d ranks = %.3e%s%s\n", what_.c_str(), world_size(),
                  all, worst_ == all && !worst_where_.empty() ? " at " : "",
                  worst_ == all ? worst_where_.c_str() : "");
    std::fflush(stdout);
  }

 private:
  std::string what_;
  double tolerance_;
  double worst_ = 0.0;
  std::string worst_where_;  // expect_tensor's worst element on this rank
  int failures_ = 0;
};

// Every (tp, ep) layout of `world` ranks with tp <= max_tp dividing `heads_per_tp`-friendly
// sizes and ep dividing both dp and `num_experts`.
struct Layout {
  int tp, ep;
};
std::vector<Layout> layouts_for(int world, int max_tp, int num_experts) {
  std::vector<Layout> out;
  for (int tp = 1; tp <= std::min(world, max_tp); ++tp) {
    if (world % tp) continue;
    const int dp = world / tp;
    for (int ep = 1; ep <= dp; ++ep)
      if (dp % ep == 0 && num_experts % ep == 0) out.push_back({tp, ep});
  }
  return out;
}

std::string layout_name(const ParallelDims& d) {
  return "world " + std::to_string(d.world) + " tp " + std::to_string(d.tp) + " dp " +
         std::to_string(d.dp) + " ep " + std::to_string(d.ep);
}

template <typename T>
Buffer<T> upload(Backend& backend, const std::vector<T>& host) {
  Buffer<T> buffer(backend, std::max<size_t>(host.size(), 1));
  if (!host.empty()) backend.copy_from_host(buffer.data(), host.data(), host.size() * sizeof(T));
  return buffer;
}

template <typename T>
std::vector<T> download(Backend& backend, const Buffer<T>& buffer, size_t count) {
  std::vector<T> host(count);
  if (count) backend.copy_to_host(host.data(), buffer.data(), count * sizeof(T));
  return host;
}

// Activations (the layers' inputs, outputs and their gradients) in the backend's type.
ActBuffer upload_act(Backend& backend, const std::vector<float>& host) {
  ActBuffer buffer(backend, std::max<size_t>(host.size(), 1));
  if (!host.empty()) backend.copy_act_from_host(buffer.data(), host.data(), host.size());
  return buffer;
}

std::vector<float> download_act(Backend& backend, const ActBuffer& buffer, size_t count) {
  std::vector<float> host(count);
  if (count) backend.copy_act_to_host(host.data(), buffer.data(), count);
  return host;
}

std::vector<float> random_floats(std::mt19937_64& rng, size_t n, double scale) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> out(n);
  for (float& v : out) v = static_cast<float>(scale * normal(rng));
  return out;
}

// ---------------------------------------------------------------------------------------------
// ExpertDispatcher over the ep group of every layout.

// A tagged row: (source, expert, index within the source's rows of that expert, a fixed
// "random" value). All exactly representable.
constexpr int kTagD = 4;
void tag_row(float* row, int source, int expert, int index) {
  row[0] = static_cast<float>(source);
  row[1] = static_cast<float>(expert);
  row[2] = static_cast<float>(index);
  row[3] = static_cast<float>((source * 7919 + expert * 104729 + index * 31) % 4093) / 4096.0f;
}

// counts[s][e]: rows source s of the group sends to expert e, the same table on every member.
std::vector<std::vector<int>> count_table(int trial, int group_id, int ep, int num_experts) {
  std::mt19937_64 rng(1000003ull * trial + 7919ull * group_id + 17);
  std::uniform_int_distribution<int> small(0, 4), large(0, 40), coin(0, 9);
  std::vector<std::vector<int>> counts(ep, std::vector<int>(num_experts, 0));
  for (int s = 0; s < ep; ++s)
    for (int e = 0; e < num_experts; ++e) {
      switch (trial) {
        case 0: counts[s][e] = coin(rng) < 3 ? 0 : small(rng); break;  // many zeros
        case 1: counts[s][e] = s == 0 ? 0 : small(rng); break;          // source 0 sends none
        case 2: counts[s][e] = 0; break;                                // nobody sends anything
        case 3: counts[s][e] = (e % 2 == 1) ? 0 : large(rng); break;    // odd experts starve
        default: counts[s][e] = large(rng); break;
      }
    }
  return counts;
}

TEST(ExpertDispatcher, DispatchDeliversCombineInvertsAndTheyAreAdjoint) {
  const int world = world_size(), rank = world_rank();
  auto backend = make_cpu_backend();
  for (int local_experts : {1, 3}) {
    for (const Layout& layout : layouts_for(world, world, 1 << 12)) {
      const int E = local_experts * layout.ep;
      const ParallelDims dims = ParallelDims::build(world, rank, layout.tp, layout.ep,
                                                    /*heads=*/2 * layout.tp,
                                                    /*ffn=*/8 * layout.tp, E, 1, 0);
      ProcessGroups groups = make_process_groups(dims);
      Communicator& ep_group = *groups.ep;
      const int ep = dims.ep, me = dims.ep_rank, L = local_experts;
      const int group_id = dims.tp_rank * 1000 + dims.edp_rank;
      const std::string name = layout_name(dims) + " E " + std::to_string(E);
      Worst routed("dispatch rows/handle " + name, 0.0);
      Worst inverse("combine(dispatch(x)) == x bit-exact " + name, 0.0);
      Worst adjoint("<combine(y),x> vs <y,dispatch(x)> rel " + name, 1e-12);
      ExpertDispatcher dispatcher(*backend, ep_group, E);
      EXPECT_EQ(dispatcher.num_local_experts(), L);
      EXPECT_EQ(dispatcher.ep_size(), ep);
      for (int trial = 0; trial < 5; ++trial) {
        const std::string where = name + " trial " + std::to_string(trial);
        const auto counts = count_table(trial, group_id, ep, E);
        // This rank's rows, in global expert order.
        std::vector<float> x_RD;
        for (int e = 0; e < E; ++e)
          for (int k = 0; k < counts[me][e]; ++k) {
            x_RD.resize(x_RD.size() + kTagD);
            tag_row(x_RD.data() + x_RD.size() - kTagD, me, e, k);
          }
        const int R = static_cast<int>(x_RD.size() / kTagD);
        // What must arrive: for each local expert, for each source, that source's rows.
        std::vector<float> want_local;
        std::vector<int> want_offsets(L + 1, 0);
        for (int j = 0; j < L; ++j) {
          want_offsets[j] = static_cast<int>(want_local.size() / kTagD);
          const int e = me * L + j;
          for (int s = 0; s < ep; ++s)
            for (int k = 0; k < counts[s][e]; ++k) {
              want_local.resize(want_local.size() + kTagD);
              tag_row(want_local.data() + want_local.size() - kTagD, s, e, k);
            }
        }
        const int want_rows = static_cast<int>(want_local.size() / kTagD);
        want_offsets[L] = want_rows;

        const DispatchHandle handle = dispatcher.plan(counts[me].data());
        EXPECT_EQ(handle.num_local_rows, want_rows) << where;
        EXPECT_EQ(handle.local_offsets, want_offsets) << where;
        for (int p = 0; p < ep; ++p) {
          int64_t sent = 0, received = 0;
          for (int j = 0; j < L; ++j) {
            sent += counts[me][p * L + j];
            received += counts[p][me * L + j];
          }
          EXPECT_EQ(handle.send_rows[p], sent) << where << " peer " << p;
          EXPECT_EQ(handle.recv_rows[p], received) << where << " peer " << p;
        }
        if (handle.num_local_rows != want_rows) {
          // Nothing below can be compared, but the collectives must still run on every rank.
          want_local.assign(static_cast<size_t>(handle.num_local_rows) * kTagD, -1.0f);
        }

        // dispatch, then combine with unit gates.
        const int RL = handle.num_local_rows;
        ActBuffer x_dev = upload_act(*backend, x_RD);
        ActBuffer local_dev(*backend, std::max<size_t>(static_cast<size_t>(RL) * kTagD, 1));
        dispatcher.dispatch(handle, local_dev.data(), x_dev.data(), kTagD);
        const std::vector<float> got_local = download_act(*backend, local_dev, RL * kTagD);
        routed.expect_bits(got_local.data(), want_local.data(), got_local.size(),
                           where + " x_local");
        ActBuffer back_dev(*backend, std::max<size_t>(static_cast<size_t>(R) * kTagD, 1));
        dispatcher.combine(handle, back_dev.data(), local_dev.data(), kTagD);
        const std::vector<float> back = download_act(*backend, back_dev, R * kTagD);
        inverse.expect_bits(back.data(), x_RD.data(), back.size(), where + " x_RD");

        // Adjoint: random x (R, D) and y (R_local, D), inner products summed over the group.
        const int D = 5;
        std::mt19937_64 rng(31 * trial + 1000 * rank + 5);
        const std::vector<float> x = random_floats(rng, static_cast<size_t>(R) * D, 1.0);
        const std::vector<float> y = random_floats(rng, static_cast<size_t>(RL) * D, 1.0);
        ActBuffer xd = upload_act(*backend, x), yd = upload_act(*backend, y);
        ActBuffer dx_local(*backend, std::max<size_t>(static_cast<size_t>(RL) * D, 1));
        ActBuffer cy(*backend, std::max<size_t>(static_cast<size_t>(R) * D, 1));
        dispatcher.dispatch(handle, dx_local.data(), xd.data(), D);
        dispatcher.combine(handle, cy.data(), yd.data(), D);
        const std::vector<float> dispatched = download_act(*backend, dx_local, RL * D);
        const std::vector<float> combined = download_act(*backend, cy, R * D);
        double sums[3] = {0.0, 0.0, 0.0};  // <combine(y), x>, <y, dispatch(x)>, sum |terms|
        for (size_t i = 0; i < x.size(); ++i) {
          sums[0] += static_cast<double>(combined[i]) * x[i];
          sums[2] += std::fabs(static_cast<double>(combined[i]) * x[i]);
        }
        for (size_t i = 0; i < y.size(); ++i)
          sums[1] += static_cast<double>(y[i]) * dispatched[i];
        ep_group.allreduce_sum(sums, 3);
        adjoint.expect_near(sums[0], sums[1], where + " inner products",
                            std::max(sums[2], 1e-300));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One Switch layer on every layout against one process that sees every token.

struct SwitchCase {
  const char* name;
  int top_k;
  float aux_scale, z_scale;
};

TEST(SwitchLayer, EveryLayoutAgreesWithOneProcess) {
  const int world = world_size(), rank = world_rank();
  const int N = 16, D = 16, F = 24, E = 4;  // N: tokens per data-parallel replica
  auto backend = make_cpu_backend();
  const std::vector<SwitchCase> cases = {{"top-1 dropless", 1, 0.3f, 0.05f},
                                         {"top-2 dropless", 2, 0.3f, 0.05f}};
  for (const SwitchCase& c : cases) {
    for (const Layout& layout : layouts_for(world, 2, E)) {
      const ParallelDims dims = ParallelDims::build(world, rank, layout.tp, layout.ep,
                                                    /*heads=*/2 * layout.tp, F, E, 1, 0);
      ProcessGroups groups = make_process_groups(dims);
      const int dp = dims.dp, L = E / dims.ep, first = dims.first_expert(E);
      const std::string name = std::string(c.name) + ", " + layout_name(dims);

      // Identical on every rank: the weights, and every replica's tokens and output gradient.
      std::mt19937_64 rng(4242 + c.top_k);
      const std::vector<float> router = random_floats(rng, static_cast<size_t>(E) * D, 0.5);
      const std::vector<float> fc_w = random_floats(rng, static_cast<size_t>(E) * F * D, 0.25);
      const std::vector<float> fc_b = random_floats(rng, static_cast<size_t>(E) * F, 0.1);
      const std::vector<float> proj_w = random_floats(rng, static_cast<size_t>(E) * D * F, 0.2);
      const std::vector<float> proj_b = random_floats(rng, static_cast<size_t>(E) * D, 0.1);
      const std::vector<float> x_all = random_floats(rng, static_cast<size_t>(dp) * N * D, 1.0);
      const std::vector<float> dout_all =
          random_floats(rng, static_cast<size_t>(dp) * N * D, 1.0);

      RoutingOptions routing;
      routing.capacity_factor = 0.0;  // dropless
      routing.seed = 7;
      routing.iteration = 1;

      // ---- the reference: one process, every replica's tokens, self communicators. Each rank's
      // loss is the mean over its replica and gradients are averaged over dp, so the reference
      // sees dout / dp (exact: dp is a power of two).
      auto self = make_self_communicator();
      PhaseTimes ref_times, times;
      SwitchLayer ref(*backend, SwitchShape{dp * N, D, F, E, c.top_k, 1},
                      SwitchGroups{*self, *self, *self}, ref_times);
      Buffer<float> r_router = upload(*backend, router), r_fc_w = upload(*backend, fc_w),
                    r_fc_b = upload(*backend, fc_b), r_proj_w = upload(*backend, proj_w),
                    r_proj_b = upload(*backend, proj_b);
      ActBuffer r_x = upload_act(*backend, x_all);
      std::vector<float> dout_ref(dout_all);
      for (float& v : dout_ref) v /= static_cast<float>(dp);
      ActBuffer r_dout = upload_act(*backend, dout_ref);
      ActBuffer r_out(*backend, x_all.size()), r_dx(*backend, x_all.size());
      Buffer<float> rg_router(*backend, router.size()), rg_fc_w(*backend, fc_w.size()),
          rg_fc_b(*backend, fc_b.size()), rg_proj_w(*backend, proj_w.size()),
          rg_proj_b(*backend, proj_b.size());
      const SwitchWeights rw{r_router.data(), r_fc_w.data(), r_fc_b.data(), r_proj_w.data(),
                             r_proj_b.data()};
      ref.forward(r_out.data(), r_x.data(), rw, dp * N, routing);
      ref.backward(r_dx.data(),
                   SwitchGrads{rg_router.data(), rg_fc_w.data(), rg_fc_b.data(), rg_proj_w.data(),
                               rg_proj_b.data()},
                   r_dout.data(), r_x.data(), rw, c.aux_scale, c.z_scale);

      // ---- this layout: replica dp_rank's N tokens, the local experts' weights.
      SwitchLayer layer(*backend, SwitchShape{N, D, F, E, c.top_k, 1},
                        SwitchGroups{*groups.tp, *groups.ep, *groups.world}, times);
      auto slice = [&](const std::vector<float>& all, size_t per_expert) {
        return std::vector<float>(all.begin() + first * per_expert,
                                  all.begin() + (first + L) * per_expert);
      };
      auto rows = [&](const std::vector<float>& all) {
        return std::vector<float>(all.begin() + static_cast<size_t>(dims.dp_rank) * N * D,
                                  all.begin() + static_cast<size_t>(dims.dp_rank + 1) * N * D);
      };
      Buffer<float> d_router = upload(*backend, router),
                    d_fc_w = upload(*backend, slice(fc_w, static_cast<size_t>(F) * D)),
                    d_fc_b = upload(*backend, slice(fc_b, F)),
                    d_proj_w = upload(*backend, slice(proj_w, static_cast<size_t>(D) * F)),
                    d_proj_b = upload(*backend, slice(proj_b, D));
      ActBuffer d_x = upload_act(*backend, rows(x_all)),
                d_dout = upload_act(*backend, rows(dout_all));
      ActBuffer d_out(*backend, static_cast<size_t>(N) * D),
          d_dx(*backend, static_cast<size_t>(N) * D);
      Buffer<float> g_router(*backend, router.size()),
          g_fc_w(*backend, static_cast<size_t>(L) * F * D), g_fc_b(*backend, static_cast<size_t>(L) * F),
          g_proj_w(*backend, static_cast<size_t>(L) * D * F),
          g_proj_b(*backend, static_cast<size_t>(L) * D);
      const SwitchWeights w{d_router.data(), d_fc_w.data(), d_fc_b.data(), d_proj_w.data(),
                            d_proj_b.data()};
      layer.forward(d_out.data(), d_x.data(), w, N, routing);
      layer.backward(d_dx.data(),
                     SwitchGrads{g_router.data(), g_fc_w.data(), g_fc_b.data(), g_proj_w.data(),
                                 g_proj_b.data()},
                     d_dout.data(), d_x.data(), w, c.aux_scale, c.z_scale);

      // model/grad_sync.h: the router summed over every rank (tp x dp), the experts over the
      // expert-data-parallel group, then everything divided by dp.
      std::vector<float> gr = download(*backend, g_router, router.size());
      groups.world->allreduce_sum(gr.data(), gr.size());
      std::vector<std::vector<float>> ge = {
          download(*backend, g_fc_w, static_cast<size_t>(L) * F * D),
          download(*backend, g_fc_b, static_cast<size_t>(L) * F),
          download(*backend, g_proj_w, static_cast<size_t>(L) * D * F),
          download(*backend, g_proj_b, static_cast<size_t>(L) * D)};
      for (auto& g : ge) groups.expert_dp->allreduce_sum(g.data(), g.size());
      for (float& v : gr) v /= static_cast<float>(dp);
      for (auto& g : ge)
        for (float& v : g) v /= static_cast<float>(dp);
      // dx: each rank's own gradient is dp times its share of the global mean's gradient.
      std::vector<float> dx = download_act(*backend, d_dx, static_cast<size_t>(N) * D);
      for (float& v : dx) v /= static_cast<float>(dp);

      const std::vector<float> ref_out = rows(download_act(*backend, r_out, x_all.size()));
      const std::vector<float> ref_dx = rows(download_act(*backend, r_dx, x_all.size()));
      const std::vector<float> ref_gr = download(*backend, rg_router, router.size());
      const std::vector<std::vector<float>> ref_ge = {
          slice(download(*backend, rg_fc_w, fc_w.size()), static_cast<size_t>(F) * D),
          slice(download(*backend, rg_fc_b, fc_b.size()), F),
          slice(download(*backend, rg_proj_w, proj_w.size()), static_cast<size_t>(D) * F),
          slice(download(*backend, rg_proj_b, proj_b.size()), D)};
      const std::vector<float> out = download_act(*backend, d_out, static_cast<size_t>(N) * D);

      print0("  -- %s\n", name);
      {
        Worst losses("losses (lb, z, tokens, choices) rel", 1e-5);
        const RouterStats &s = layer.stats(), &rs = ref.stats();
        losses.expect_near(s.load_balancing_loss(c.top_k), rs.load_balancing_loss(c.top_k),
                           name + " load_balancing_loss");
        losses.expect_near(s.z_loss(), rs.z_loss(), name + " z_loss");
        losses.expect_near(s.tokens, rs.tokens, name + " tokens");
        losses.expect_near(s.dropped_fraction(), 0.0, name + " dropped_fraction", 1.0);
        for (int e = 0; e < E; ++e)
          losses.expect_near(s.choices[e], rs.choices[e], name + " choices", 1.0);
      }
      {
        Worst w_out("out rel", 1e-5);
        w_out.expect_tensor(out.data(), ref_out.data(), out.size(), name + " out");
      }
      {
        Worst w_dx("dx rel", 1e-5);
        w_dx.expect_tensor(dx.data(), ref_dx.data(), dx.size(), name + " dx");
      }
      {
        Worst w_router("router grad rel", 1e-5);
        w_router.expect_tensor(gr.data(), ref_gr.data(), gr.size(), name + " router grad");
      }
      {
        Worst w_experts("expert grads (fc_w, fc_b, proj_w, proj_b) rel", 1e-5);
        const char* names[] = {"fc_w", "fc_b", "proj_w", "proj_b"};
        for (int i = 0; i < 4; ++i)
          w_experts.expect_tensor(ge[i].data(), ref_ge[i].data(), ge[i].size(),
                                  name + " expert grad " + names[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Whole training runs: in-process Trainers on this world's layouts against Trainer(options, 1, 0).

// A temporary directory every rank agrees on (named by rank 0), removed at the end.
class SharedTempDir {
 public:
  SharedTempDir() {
    char name[512] = {0};
    if (world_rank() == 0) {
      const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
      const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                        ("moe_layouts_" + std::to_string(getpid()) + "_" +
                                         std::to_string(stamp));
      std::filesystem::create_directories(dir);
      std::snprintf(name, sizeof(name), "%s", dir.c_str());
    }
    MPI_Bcast(name, sizeof(name), MPI_CHAR, 0, MPI_COMM_WORLD);
    path_ = name;
  }
  ~SharedTempDir() {
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0) {
      std::error_code ignored;
      std::filesystem::remove_all(path_, ignored);
    }
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Text-like bytes: words and punctuation from a fixed generator.
void write_text(const std::string& path, size_t bytes) {
  static const char* words[] = {"the",    "expert", "router", "token",  "sends",  "a",
                                "layer",  "of",     "switch", "model",  "learns", "to",
                                "balance", "load",  "across", "ranks",  "and",    "gates",
                                "each",   "choice", "is",     "kept",   "when",   "capacity"};
  std::mt19937_64 rng(2024);
  std::uniform_int_distribution<int> pick(0, sizeof(words) / sizeof(words[0]) - 1), len(4, 12);
  std::string text;
  while (text.size() < bytes) {
    const int n = len(rng);
    for (int i = 0; i < n; ++i) {
      std::string word = words[pick(rng)];
      if (i == 0) word[0] = static_cast<char>(word[0] - 'a' + 'A');
      text += word;
      text += i + 1 == n ? ". " : " ";
    }
    if (pick(rng) % 5 == 0) text += "\n";
  }
  text.resize(bytes);
  std::ofstream out(path, std::ios::binary);
  out << text;
}

TrainOptions tiny_options(const std::string& data_path, int tp, int ep, int micro, int global) {
  TrainOptions o = moe::testing::tiny_train_options();
  o.aux_loss_coeff = 0.01;
  o.z_loss_coeff = 0.001;
  o.seed = 1234;
  o.micro_batch_size = micro;
  o.global_batch_size = global;
  o.train_iters = 5;
  o.schedule.lr = 1e-3;
  o.schedule.min_lr = 1e-4;
  o.schedule.warmup_iters = 1;
  o.schedule.train_iters = 5;
  o.schedule.decay_style = LrDecayStyle::kCosine;
  o.tensor_parallel = tp;
  o.expert_parallel = ep;
  o.data_path = data_path;
  o.data_format = DataFormat::kBytes;
  o.data_order = DataOrder::kSequential;
  return o;
}

TEST(Trainer, LossCurvesAndWeightsAgreeWithOneProcess) {
  const int world = world_size(), rank = world_rank();
  const int kIters = 5, kGlobal = 8;  // one micro-step per iteration on every layout
  SharedTempDir tmp;
  const std::string data = tmp.file("text.txt");
  if (rank == 0) write_text(data, 6000);
  MPI_Barrier(MPI_COMM_WORLD);

  // The reference, on every rank: one process, self communicators, the whole global batch in
  // one micro-step.
  const auto ref_start = std::chrono::steady_clock::now();
  Trainer reference(tiny_options(data, 1, 1, kGlobal, kGlobal), 1, 0);
  std::vector<IterationMetrics> ref_metrics;
  for (int k = 1; k <= kIters; ++k) ref_metrics.push_back(reference.train_iteration(k));
  const std::string ref_file = tmp.file("reference.safetensors");
  if (rank == 0) {
    const std::vector<float> values = reference.host_params();
    export_safetensors(ref_file, reference.model().config(), reference.layout(), values.data());
  }
  if (rank == 0)
    std::printf("  reference (1 process): %.2f s, lm_loss %.6f -> %.6f\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - ref_start).count(),
                ref_metrics.front().lm_loss, ref_metrics.back().lm_loss);

  // This world's layouts (tp, ep); dp = world / tp.
  std::vector<Layout> layouts;
  if (world == 1) layouts = {{1, 1}};
  if (world == 2) layouts = {{1, 2}, {1, 1}, {2, 1}};           // ep2, dp2, tp2
  if (world == 4) layouts = {{2, 2}, {1, 4}, {1, 1}};           // tp2 x dp2 ep2, ep4, dp4
  if (layouts.empty()) {
    for (const Layout& l : layouts_for(world, 2, 4)) layouts.push_back(l);
  }
  auto world_comm = make_mpi_world_communicator();
  for (const Layout& layout : layouts) {
    const int dp = world / layout.tp, micro = kGlobal / dp;
    const auto start = std::chrono::steady_clock::now();
    Trainer trainer(tiny_options(data, layout.tp, layout.ep, micro, kGlobal), world, rank);
    const std::string name = layout_name(trainer.dims()) + " micro " + std::to_string(micro);
    print0("  -- %s\n", name);
    {
      Worst lm("lm_loss rel", 1e-4), lb("load_balancing_loss rel", 1e-4), z("z_loss rel", 1e-4),
          gn("grad_norm rel", 1e-4);
      for (int k = 1; k <= kIters; ++k) {
        const IterationMetrics m = trainer.train_iteration(k);
        const IterationMetrics& r = ref_metrics[k - 1];
        const std::string where = name + " iteration " + std::to_string(k);
        lm.expect_near(m.lm_loss, r.lm_loss, where);
        lb.expect_near(m.load_balancing_loss, r.load_balancing_loss, where);
        z.expect_near(m.z_loss, r.z_loss, where);
        gn.expect_near(m.grad_norm, r.grad_norm, where);
        if (rank == 0)
          std::printf("    iter %d  lm %.7f (ref %.7f)  lb %.7f (ref %.7f)  z %.7f (ref %.7f)  "
                      "gnorm %.6f (ref %.6f)\n",
                      k, m.lm_loss, r.lm_loss, m.load_balancing_loss, r.load_balancing_loss,
                      m.z_loss, r.z_loss, m.grad_norm, r.grad_norm);
      }
    }
    // The final weights, assembled on rank 0, against the reference's export.
    const std::string file = tmp.file("layout.safetensors");
    {
      const std::vector<float> values = trainer.host_params();
      export_safetensors_gathered(file, trainer.model().config(), trainer.layout(),
                                  values.data(), trainer.dims(), *world_comm);
    }
    {
      // The key bias (rows [C, 2C) of c_attn.bias) has no gradient in exact arithmetic: softmax
      // is invariant to adding q.b_k to every score of a query. Its computed gradient is
      // rounding noise, which AdamW normalizes into steps of up to lr, so its value is not a
      // function of the layout; it is only checked to stay within the sum of the learning
      // rates. Every other tensor (and the q and v parts) is compared.
      const int C = trainer.model().config().hidden_size;
      double lr_sum = 0.0;
      for (int k = 1; k <= kIters; ++k) lr_sum += ref_metrics[k - 1].lr;
      Worst weights("final weights rel (per tensor scale)", 1e-4);
      Worst key_bias("key bias |value| / sum of lr (must stay <= 1)", 1.0);
      if (rank == 0) {
        const SafetensorsFile got(file), want(ref_file);
        EXPECT_EQ(got.tensors().size(), want.tensors().size()) << name;
        for (const auto& [tensor_name, tensor] : want.tensors()) {
          if (!got.contains(tensor_name)) {
            ADD_FAILURE() << name << ": the export lacks " << tensor_name;
            continue;
          }
          const LoadedTensor& g = got.at(tensor_name);
          EXPECT_EQ(g.shape, tensor.shape) << name << " " << tensor_name;
          if (g.data.size() != tensor.data.size()) continue;
          const std::string suffix = ".attn.c_attn.bias";
          if (tensor_name.size() > suffix.size() &&
              tensor_name.compare(tensor_name.size() - suffix.size(), suffix.size(), suffix) == 0 &&
              g.data.size() == 3u * C) {
            const float* got_qkv = g.data.data();
            const float* want_qkv = tensor.data.data();
            weights.expect_tensor(got_qkv, want_qkv, C, name + " " + tensor_name + " (q)");
            weights.expect_tensor(got_qkv + 2 * C, want_qkv + 2 * C, C,
                                  name + " " + tensor_name + " (v)");
            for (int i = C; i < 2 * C; ++i) {
              key_bias.expect_near(std::fabs(got_qkv[i]) / lr_sum, 0.0,
                                   name + " " + tensor_name + " (k, this layout)", 1.0);
              key_bias.expect_near(std::fabs(want_qkv[i]) / lr_sum, 0.0,
                                   name + " " + tensor_name + " (k, reference)", 1.0);
            }
            continue;
          }
          weights.expect_tensor(g.data.data(), tensor.data.data(), g.data.size(),
                                name + " " + tensor_name);
        }
      }
    }
    world_comm->barrier();
    if (rank == 0)
      std::printf("    %s: %.2f s\n", name.c_str(),
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
}

}  // namespace
}  // namespace moe
