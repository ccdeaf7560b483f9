// The parallel layout (ParallelDims: rank order and every validation error), the process
// groups it splits the world into (sizes, ranks and exact members), and every Communicator
// collective on MPI and on one process. Runs under mpiexec at 2 and 4 ranks and alone at 1;
// every rank runs every test in the same order, since the tests call collectives. Every
// comparison prints the worst difference it saw, over all ranks.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/parallel_dims.h"
#include "dist/process_groups.h"
#include "tests/mpi_testing.h"
#include "tests/expect_error.h"

namespace moe {
namespace {

using moe::testing::world_rank;
using moe::testing::world_size;

// The largest |got - want| seen by this rank; report() takes the max over every rank (a
// collective over the world, so every rank must reach it) and prints it once.
class Worst {
 public:
  explicit Worst(std::string what) : what_(std::move(what)) {}
  void expect_near(double got, double want, double tolerance, const std::string& where) {
    double diff = std::fabs(got - want);
    if (!(diff <= worst_)) worst_ = diff;  // also catches NaN
    if (!(diff <= tolerance) && failures_++ < 5)
      ADD_FAILURE() << what_ << ": " << where << ": got " << got << ", want " << want;
  }
  void expect_equal(double got, double want, const std::string& where) {
    expect_near(got, want, 0.0, where);
  }
  ~Worst() {
    double all = std::isnan(worst_) ? INFINITY : worst_;
    MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (world_rank() == 0)
      std::printf("  %-52s worst |diff| over %d ranks = %.3e\n", what_.c_str(), world_size(),
                  all);
  }

 private:
  std::string what_;
  double worst_ = 0.0;
  int failures_ = 0;
};

// "what[index]", for failure messages.
std::string at(std::string what, int64_t index) {
  what += '[';
  what += std::to_string(index);
  what += ']';
  return what;
}

using moe::testing::error_message;

// Messages reach the user as one line on stderr, naming the flag and the numbers.
void expect_one_line_naming(const std::string& message, const std::vector<std::string>& names) {
  for (const std::string& name : names)
    EXPECT_NE(message.find(name), std::string::npos)
        << "message does not name \"" << name << "\": " << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "message spans lines: " << message;
}

std::vector<int> divisors(int n) {
  std::vector<int> out;
  for (int d = 1; d <= n; ++d)
    if (n % d == 0) out.push_back(d);
  return out;
}

// A layout that passes every check: E = 2*ep experts, heads and ffn multiples of tp.
ParallelDims valid_dims(int world, int rank, int tp, int ep, int micro = 2, int global = 0) {
  return ParallelDims::build(world, rank, tp, ep, /*num_attention_heads=*/2 * tp,
                             /*ffn_hidden_size=*/8 * tp, /*num_experts=*/2 * ep, micro, global);
}

// ---------------------------------------------------------------------------------------------
// ParallelDims: pure arithmetic, no communication.

TEST(ParallelDims, RankOrderForEveryLayoutUpTo24Processes) {
  int layouts = 0;
  for (int world = 1; world <= 24; ++world)
    for (int tp : divisors(world))
      for (int ep : divisors(world / tp)) {
        const int num_experts = 3 * ep;
        std::set<std::pair<int, int>> seen_tp_dp;
        std::vector<int> holders(num_experts, 0);  // expert -> ranks holding it
        for (int r = 0; r < world; ++r) {
          ParallelDims d = ParallelDims::build(world, r, tp, ep, 4 * tp, 16 * tp, num_experts,
                                               1, 0);
          SCOPED_TRACE("world " + std::to_string(world) + " tp " + std::to_string(tp) +
                       " ep " + std::to_string(ep) + " rank " + std::to_string(r));
          EXPECT_EQ(d.world, world);
          EXPECT_EQ(d.tp, tp);
          EXPECT_EQ(d.dp, world / tp);
          EXPECT_EQ(d.ep, ep);
          EXPECT_EQ(d.edp, world / tp / ep);
          EXPECT_EQ(d.world_rank, r);
          EXPECT_EQ(d.world_rank, d.dp_rank * d.tp + d.tp_rank);  // tp ranks consecutive
          EXPECT_EQ(d.ep_rank, d.dp_rank % ep);
          EXPECT_EQ(d.edp_rank, d.dp_rank / ep);
          EXPECT_EQ(d.dp_rank, d.edp_rank * ep + d.ep_rank);
          EXPECT_TRUE(d.tp_rank >= 0 && d.tp_rank < tp);
          EXPECT_TRUE(d.dp_rank >= 0 && d.dp_rank < d.dp);
          EXPECT_TRUE(d.ep_rank >= 0 && d.ep_rank < ep);
          EXPECT_TRUE(d.edp_rank >= 0 && d.edp_rank < d.edp);
          EXPECT_EQ(d.global_batch_size, d.dp);  // micro 1, global 0
          EXPECT_EQ(d.num_local_experts(num_experts), 3);
          EXPECT_EQ(d.first_expert(num_experts), 3 * d.ep_rank);
          seen_tp_dp.insert({d.tp_rank, d.dp_rank});
          for (int e = 0; e < d.num_local_experts(num_experts); ++e)
            holders[d.first_expert(num_experts) + e]++;
        }
        EXPECT_EQ(seen_tp_dp.size(), static_cast<size_t>(world));  // a bijection
        // Every expert lives on tp * edp ranks: its expert-data-parallel group.
        for (int e = 0; e < num_experts; ++e) EXPECT_EQ(holders[e], world / ep) << "expert " << e;
        ++layouts;
      }
  if (world_rank() == 0) std::printf("  checked %d layouts\n", layouts);
}

TEST(ParallelDims, MatchesTheTableInTheHeader) {
  // world 8, tp 2, ep 2 (dp 4, edp 2), as drawn in dist/parallel_dims.h.
  const int tp_rank[] = {0, 1, 0, 1, 0, 1, 0, 1}, dp_rank[] = {0, 0, 1, 1, 2, 2, 3, 3},
            ep_rank[] = {0, 0, 1, 1, 0, 0, 1, 1}, edp_rank[] = {0, 0, 0, 0, 1, 1, 1, 1};
  for (int r = 0; r < 8; ++r) {
    ParallelDims d = ParallelDims::build(8, r, 2, 2, 4, 16, 8, 1, 0);
    EXPECT_EQ(d.dp, 4);
    EXPECT_EQ(d.edp, 2);
    EXPECT_EQ(d.tp_rank, tp_rank[r]) << "rank " << r;
    EXPECT_EQ(d.dp_rank, dp_rank[r]) << "rank " << r;
    EXPECT_EQ(d.ep_rank, ep_rank[r]) << "rank " << r;
    EXPECT_EQ(d.edp_rank, edp_rank[r]) << "rank " << r;
    EXPECT_EQ(d.num_local_experts(8), 4);
    EXPECT_EQ(d.first_expert(8), 4 * ep_rank[r]);
  }
}

TEST(ParallelDims, GlobalBatchDefaultsToMicroTimesDataParallel) {
  EXPECT_EQ(valid_dims(8, 0, 2, 1, /*micro=*/3, /*global=*/0).global_batch_size, 12);
  EXPECT_EQ(valid_dims(8, 0, 2, 1, 3, 24).global_batch_size, 24);
  EXPECT_EQ(valid_dims(8, 0, 2, 1, 3, 12).global_batch_size, 12);
  EXPECT_EQ(valid_dims(1, 0, 1, 1, 5, 0).global_batch_size, 5);
}

TEST(ParallelDims, NoExpertsNeedsExpertParallelOne) {
  ParallelDims d = ParallelDims::build(4, 3, 2, 1, 4, 16, /*num_experts=*/0, 1, 0);
  EXPECT_EQ(d.ep, 1);
  EXPECT_EQ(d.edp, 2);
  EXPECT_EQ(d.num_local_experts(0), 0);
  EXPECT_EQ(d.first_expert(0), 0);
}

// Each violation: a UsageError on one line that names the flag and the numbers involved.
struct BadLayout {
  const char* why;
  int world, tp, ep, heads, ffn, experts, micro, global;
  std::vector<std::string> names;
};

TEST(ParallelDims, EveryViolationIsAOneLineUsageErrorNamingTheFlag) {
  const std::vector<BadLayout> cases = {
      {"tp zero", 4, 0, 1, 4, 16, 4, 1, 0, {"--tensor-model-parallel-size", "0"}},
      {"tp negative", 4, -2, 1, 4, 16, 4, 1, 0, {"--tensor-model-parallel-size", "-2"}},
      {"tp does not divide world", 8, 3, 1, 6, 24, 4, 1, 0,
       {"--tensor-model-parallel-size 3", "8"}},
      {"tp above world", 2, 4, 1, 4, 16, 4, 1, 0, {"--tensor-model-parallel-size 4", "2"}},
      {"ep zero", 4, 1, 0, 4, 16, 4, 1, 0, {"--expert-model-parallel-size", "0"}},
      {"ep does not divide dp", 8, 2, 3, 4, 16, 6, 1, 0,
       {"--expert-model-parallel-size 3", "data-parallel size 4",
        "--tensor-model-parallel-size 2"}},
      {"ep above dp", 4, 2, 4, 4, 16, 4, 1, 0,
       {"--expert-model-parallel-size 4", "data-parallel size 2"}},
      {"ep does not divide experts", 8, 1, 4, 4, 16, 6, 1, 0,
       {"--expert-model-parallel-size 4", "--num-experts 6"}},
      {"ep without experts", 4, 1, 2, 4, 16, 0, 1, 0,
       {"--expert-model-parallel-size 2", "--num-experts is 0"}},
      {"tp does not divide heads", 4, 4, 1, 6, 16, 4, 1, 0,
       {"--tensor-model-parallel-size 4", "--num-attention-heads 6"}},
      {"tp does not divide ffn", 4, 4, 1, 8, 10, 4, 1, 0,
       {"--tensor-model-parallel-size 4", "--ffn-hidden-size 10"}},
      {"micro zero", 4, 1, 1, 4, 16, 4, 0, 0, {"--micro-batch-size", "0"}},
      {"global negative", 4, 1, 1, 4, 16, 4, 1, -8, {"--global-batch-size", "-8"}},
      {"global not a multiple", 8, 2, 1, 4, 16, 4, 2, 12,
       {"--global-batch-size 12", "--micro-batch-size 2", "data-parallel size 4", "8"}},
      {"global below one step", 8, 1, 1, 4, 16, 4, 2, 8,
       {"--global-batch-size 8", "--micro-batch-size 2", "data-parallel size 8", "16"}},
  };
  for (const BadLayout& c : cases) {
    SCOPED_TRACE(c.why);
    std::string message = error_message<UsageError>([&] {
      ParallelDims::build(c.world, 0, c.tp, c.ep, c.heads, c.ffn, c.experts, c.micro, c.global);
    });
    expect_one_line_naming(message, c.names);
    if (world_rank() == 0) std::printf("  %-28s %s\n", c.why, message.c_str());
  }
}

TEST(ParallelDims, ABadWorldRankIsAnInternalError) {
  error_message<RuntimeError>([] { ParallelDims::build(4, 4, 1, 1, 4, 16, 4, 1, 0); });
  error_message<RuntimeError>([] { ParallelDims::build(4, -1, 1, 1, 4, 16, 4, 1, 0); });
  error_message<RuntimeError>([] { ParallelDims::build(0, 0, 1, 1, 4, 16, 4, 1, 0); });
}

// ---------------------------------------------------------------------------------------------
// Process groups on this run's world: every valid (tp, ep) layout.

// Who shares a group with whom, from the layout alone.
bool same_tp_group(const ParallelDims& a, const ParallelDims& b) { return a.dp_rank == b.dp_rank; }
bool same_dp_group(const ParallelDims& a, const ParallelDims& b) { return a.tp_rank == b.tp_rank; }
bool same_ep_group(const ParallelDims& a, const ParallelDims& b) {
  return a.tp_rank == b.tp_rank && a.edp_rank == b.edp_rank;
}
bool same_expert_dp_group(const ParallelDims& a, const ParallelDims& b) {
  return a.ep_rank == b.ep_rank;
}
bool same_world(const ParallelDims&, const ParallelDims&) { return true; }

// Checks one group's size, rank, member set (an all-reduce of one bit per world rank) and
// member order (an all-gather of world ranks), against the members the layout predicts.
void expect_members(Communicator& group, const std::vector<ParallelDims>& all, int me,
                    bool (*same_group)(const ParallelDims&, const ParallelDims&),
                    const std::string& name, Worst& worst) {
  std::vector<int> members;  // in world-rank order
  for (int r = 0; r < static_cast<int>(all.size()); ++r)
    if (same_group(all[me], all[r])) members.push_back(r);
  long long expected_bits = 0;
  for (int r : members) expected_bits |= 1LL << r;

  EXPECT_EQ(group.size(), static_cast<int>(members.size())) << name;
  int my_index = 0;
  while (members[my_index] != me) ++my_index;
  EXPECT_EQ(group.rank(), my_index) << name;

  long long bits = 1LL << me;
  group.allreduce_sum(&bits, 1);
  EXPECT_EQ(bits, expected_bits) << name << " members";

  std::vector<float> order(group.size());
  const float mine = static_cast<float>(me);
  group.allgather(order.data(), &mine, 1);
  for (int i = 0; i < group.size() && i < static_cast<int>(members.size()); ++i)
    worst.expect_equal(order[i], members[i], at(name + " member", i));
}

TEST(ProcessGroups, EveryLayoutHasTheExpectedMembersInWorldRankOrder) {
  const int world = world_size(), me = world_rank();
  ASSERT_LE(world, 62) << "member bits are a long long";
  Worst worst("member order of every group in every layout");
  int layouts = 0;
  for (int tp : divisors(world))
    for (int ep : divisors(world / tp)) {
      SCOPED_TRACE("tp " + std::to_string(tp) + " ep " + std::to_string(ep));
      std::vector<ParallelDims> all;
      for (int r = 0; r < world; ++r) all.push_back(valid_dims(world, r, tp, ep));
      const ParallelDims& dims = all[me];
      ProcessGroups groups = make_process_groups(dims);

      EXPECT_EQ(groups.world->size(), world);
      EXPECT_EQ(groups.tp->size(), dims.tp);
      EXPECT_EQ(groups.dp->size(), dims.dp);
      EXPECT_EQ(groups.ep->size(), dims.ep);
      EXPECT_EQ(groups.expert_dp->size(), dims.tp * dims.edp);
      EXPECT_EQ(groups.world->rank(), dims.world_rank);
      EXPECT_EQ(groups.tp->rank(), dims.tp_rank);
      EXPECT_EQ(groups.dp->rank(), dims.dp_rank);
      EXPECT_EQ(groups.ep->rank(), dims.ep_rank);

      expect_members(*groups.world, all, me, same_world, "world", worst);
      expect_members(*groups.tp, all, me, same_tp_group, "tp", worst);
      expect_members(*groups.dp, all, me, same_dp_group, "dp", worst);
      expect_members(*groups.ep, all, me, same_ep_group, "ep", worst);
      expect_members(*groups.expert_dp, all, me, same_expert_dp_group, "expert_dp", worst);
      ++layouts;
    }
  if (me == 0) std::printf("  %d layouts at world size %d\n", layouts, world);
}

// What the groups are for: an EP group holds every expert exactly once, and an expert-dp
// group is exactly the ranks holding the same experts.
TEST(ProcessGroups, ExpertGroupsPartitionAndReplicateTheExperts) {
  const int world = world_size(), me = world_rank();
  for (int tp : divisors(world))
    for (int ep : divisors(world / tp)) {
      SCOPED_TRACE("tp " + std::to_string(tp) + " ep " + std::to_string(ep));
      const int num_experts = 2 * ep;
      ParallelDims dims = valid_dims(world, me, tp, ep);
      ProcessGroups groups = make_process_groups(dims);

      std::vector<long long> holders(num_experts, 0);
      for (int e = 0; e < dims.num_local_experts(num_experts); ++e)
        holders[dims.first_expert(num_experts) + e] = 1;
      groups.ep->allreduce_sum(holders.data(), holders.size());
      for (int e = 0; e < num_experts; ++e) EXPECT_EQ(holders[e], 1) << "expert " << e;

      // Same first expert on every member: max(first) == -max(-first).
      int first[2] = {dims.first_expert(num_experts), -dims.first_expert(num_experts)};
      groups.expert_dp->allreduce_max(first, 2);
      EXPECT_EQ(first[0], -first[1]);
      EXPECT_EQ(first[0], dims.first_expert(num_experts));

      // Each expert-dp member sits in its own EP group: the two sizes multiply to the world.
      EXPECT_EQ(groups.expert_dp->size() * groups.ep->size(), world);
    }
}

TEST(ProcessGroups, SingleProcessGroupsAreSelfCommunicators) {
  std::vector<ProcessGroups> both;
  both.push_back(make_single_process_groups());
  both.push_back(make_process_groups(valid_dims(1, 0, 1, 1)));  // world 1: makes no MPI call
  for (ProcessGroups& groups : both)
    for (Communicator* c : {groups.world.get(), groups.tp.get(), groups.dp.get(),
                            groups.ep.get(), groups.expert_dp.get()}) {
      ASSERT_NE(c, nullptr);
      EXPECT_EQ(c->size(), 1);
      EXPECT_EQ(c->rank(), 0);
      float x = 3.5f;
      c->allreduce_sum(&x, 1);  // would sum over ranks if it were not a group of one
      EXPECT_EQ(x, 3.5f);
    }
}

TEST(ProcessGroups, ALayoutForAnotherWorldSizeIsARuntimeError) {
  // Every rank throws before any split, so no rank is left waiting in a collective.
  const int world = world_size();
  std::string message = error_message<RuntimeError>(
      [&] { make_process_groups(valid_dims(world + 1, world_rank(), 1, 1)); });
  expect_one_line_naming(message, {std::to_string(world + 1), std::to_string(world)});
}

// ---------------------------------------------------------------------------------------------
// Every collective against what it must produce, on three kinds of group: one process (the
// identity), the MPI world, and MPI halves whose ranks run opposite to the world's (so a
// collective that confused world and group ranks would fail).

enum class GroupKind { kSelf, kWorld, kReversedHalves };

std::string kind_name(const ::testing::TestParamInfo<GroupKind>& info) {
  switch (info.param) {
    case GroupKind::kSelf: return "Self";
    case GroupKind::kWorld: return "MpiWorld";
    case GroupKind::kReversedHalves: return "MpiReversedHalves";
  }
  return "";
}

class Collectives : public ::testing::TestWithParam<GroupKind> {
 protected:
  void SetUp() override {
    switch (GetParam()) {
      case GroupKind::kSelf: comm_ = make_self_communicator(); break;
      case GroupKind::kWorld: comm_ = make_mpi_world_communicator(); break;
      case GroupKind::kReversedHalves:
        comm_ = make_mpi_split_communicator(world_rank() % 2, -world_rank());
        break;
    }
    rank_ = comm_->rank();
    size_ = comm_->size();
  }
  std::string name(const std::string& what) const {
    return kind_name({GetParam(), 0}) + " " + what;
  }

  std::unique_ptr<Communicator> comm_;
  int rank_ = 0, size_ = 1;
};

// A deterministic value in [-1, 1) for (rank, index): every rank can compute every rank's data.
double value(int rank, int64_t index) {
  uint64_t x = (static_cast<uint64_t>(rank) << 40) ^ static_cast<uint64_t>(index);
  x = (x ^ (x >> 31)) * 0x7fb5d329728ea185ULL;
  x = (x ^ (x >> 27)) * 0x81dadef4bc2dd44dULL;
  x ^= x >> 33;
  return static_cast<double>(x >> 11) / static_cast<double>(1ULL << 52) - 1.0;
}

TEST_P(Collectives, RankAndSize) {
  const int world = world_size(), me = world_rank();
  switch (GetParam()) {
    case GroupKind::kSelf:
      EXPECT_EQ(size_, 1);
      EXPECT_EQ(rank_, 0);
      break;
    case GroupKind::kWorld:
      EXPECT_EQ(size_, world);
      EXPECT_EQ(rank_, me);
      break;
    case GroupKind::kReversedHalves: {
      const int members = (world - me % 2 + 1) / 2;  // world ranks with my parity
      EXPECT_EQ(size_, members);
      EXPECT_EQ(rank_, members - 1 - me / 2);
      break;
    }
  }
}

TEST_P(Collectives, AllreduceSumFloatDoubleLongLong) {
  const int n = 1000;
  std::vector<float> f(n);
  std::vector<double> d(n);
  std::vector<long long> ll(n);
  for (int i = 0; i < n; ++i) {
    f[i] = static_cast<float>(value(rank_, i));
    d[i] = value(rank_, i);
    ll[i] = (1LL << 40) * (rank_ + 1) + i;  // beyond 32 bits
  }
  comm_->allreduce_sum(f.data(), n);
  comm_->allreduce_sum(d.data(), n);
  comm_->allreduce_sum(ll.data(), n);
  // Reports print in reverse order of declaration.
  Worst worst_ll(name("all-reduce sum long long")), worst_d(name("all-reduce sum double")),
      worst_f(name("all-reduce sum float"));
  for (int i = 0; i < n; ++i) {
    double want = 0, want_f = 0;
    long long want_ll = 0;
    for (int p = 0; p < size_; ++p) {
      want += value(p, i);
      want_f += static_cast<float>(value(p, i));
      want_ll += (1LL << 40) * (p + 1) + i;
    }
    worst_f.expect_near(f[i], want_f, 1e-6 * size_, at("float", i));
    worst_d.expect_near(d[i], want, 1e-14 * size_, at("double", i));
    worst_ll.expect_equal(static_cast<double>(ll[i] - want_ll), 0.0, at("long long", i));
  }
}

// Positive, negative and very negative entries, so that max is not sum and not rank order.
int max_input(int rank, int i) {
  const int sign = i % 2 ? -1 : 1;
  return sign * (rank * 100 + i) + (i % 3 == 0 ? INT_MIN / 2 : 0);
}

TEST_P(Collectives, AllreduceMaxInt) {
  const int n = 64;
  std::vector<int> x(n);
  for (int i = 0; i < n; ++i) x[i] = max_input(rank_, i);
  comm_->allreduce_max(x.data(), n);
  Worst worst(name("all-reduce max int"));
  for (int i = 0; i < n; ++i) {
    int want = INT_MIN;
    for (int p = 0; p < size_; ++p) want = std::max(want, max_input(p, i));
    worst.expect_equal(x[i], want, at("", i));
  }
}

TEST_P(Collectives, AsyncAllreduceOverlapsAndSums) {
  // Two outstanding reductions at once, as with gradient buckets; waited in reverse order.
  const int n = 4097;
  std::vector<float> a(n), b(n);
  for (int i = 0; i < n; ++i) {
    a[i] = static_cast<float>(rank_ * n + i);  // exact: sums stay below 2^24
    b[i] = static_cast<float>(value(rank_, i));
  }
  auto pending_a = comm_->allreduce_sum_async(a.data(), n);
  auto pending_b = comm_->allreduce_sum_async(b.data(), n);
  pending_b->wait();
  pending_a->wait();
  Worst worst(name("async all-reduce sum"));
  for (int i = 0; i < n; ++i) {
    double want_a = 0, want_b = 0;
    for (int p = 0; p < size_; ++p) {
      want_a += static_cast<double>(p) * n + i;
      want_b += static_cast<float>(value(p, i));
    }
    worst.expect_equal(a[i], want_a, at("a", i));
    worst.expect_near(b[i], want_b, 1e-6 * size_, at("b", i));
  }
  // A reduction dropped without wait() still completes (its destructor waits).
  { auto dropped = comm_->allreduce_sum_async(a.data(), n); }
}

TEST_P(Collectives, Allgather) {
  const int count = 37;
  std::vector<float> send(count), recv(static_cast<size_t>(size_) * count, -1.0f);
  for (int i = 0; i < count; ++i) send[i] = static_cast<float>(rank_ * 1000 + i);
  comm_->allgather(recv.data(), send.data(), count);
  Worst worst(name("all-gather"));
  for (int p = 0; p < size_; ++p)
    for (int i = 0; i < count; ++i)
      worst.expect_equal(recv[p * count + i], p * 1000 + i, at("from " + std::to_string(p), i));
}

TEST_P(Collectives, ReduceScatterSum) {
  const int count = 29;
  std::vector<float> send(static_cast<size_t>(size_) * count), recv(count, -1.0f);
  for (int p = 0; p < size_; ++p)
    for (int i = 0; i < count; ++i)
      send[p * count + i] = static_cast<float>(rank_ * 10000 + p * 100 + i);
  comm_->reduce_scatter_sum(recv.data(), send.data(), count);
  Worst worst(name("reduce-scatter sum"));
  for (int i = 0; i < count; ++i) {
    double want = 0;
    for (int r = 0; r < size_; ++r) want += r * 10000 + rank_ * 100 + i;
    worst.expect_equal(recv[i], want, at("", i));
  }
}

TEST_P(Collectives, AlltoallCounts) {
  const int per_peer = 3;
  std::vector<int> send(size_ * per_peer), recv(size_ * per_peer, -1);
  for (int p = 0; p < size_; ++p)
    for (int j = 0; j < per_peer; ++j) send[p * per_peer + j] = rank_ * 10000 + p * 10 + j;
  comm_->alltoall(recv.data(), send.data(), per_peer);
  Worst worst(name("all-to-all counts"));
  for (int p = 0; p < size_; ++p)
    for (int j = 0; j < per_peer; ++j)
      worst.expect_equal(recv[p * per_peer + j], p * 10000 + rank_ * 10 + j,
                         at("from " + std::to_string(p), j));
}

// A MoE dispatch: counts first (all-to-all), then tokens (all-to-all-v). `count(src, dst)` is
// how many floats rank src sends to rank dst; element k of that message is
// src*1e6 + dst*1e4 + k, so the receiver knows exactly what should arrive where.
void dispatch_and_check(Communicator& comm, int (*count)(int src, int dst, int size),
                        const std::string& what) {
  const int rank = comm.rank(), size = comm.size();
  std::vector<int> send_counts_int(size), recv_counts_int(size, -1);
  for (int p = 0; p < size; ++p) send_counts_int[p] = count(rank, p, size);
  comm.alltoall(recv_counts_int.data(), send_counts_int.data(), 1);

  std::vector<int64_t> send_counts(size), recv_counts(size);
  int64_t num_send = 0, num_recv = 0;
  for (int p = 0; p < size; ++p) {
    send_counts[p] = send_counts_int[p];
    recv_counts[p] = recv_counts_int[p];
    num_send += send_counts[p];
    num_recv += recv_counts[p];
  }
  std::vector<float> send, recv(num_recv, -1.0f);
  for (int p = 0; p < size; ++p)
    for (int k = 0; k < send_counts_int[p]; ++k)
      send.push_back(static_cast<float>(rank * 1000000 + p * 10000 + k));
  EXPECT_EQ(static_cast<int64_t>(send.size()), num_send);
  comm.alltoallv(recv.data(), recv_counts, send.data(), send_counts);

  Worst worst(what);
  int64_t offset = 0;
  for (int p = 0; p < size; ++p) {
    worst.expect_equal(recv_counts_int[p], count(p, rank, size), "count from " + std::to_string(p));
    for (int k = 0; k < recv_counts_int[p]; ++k)
      worst.expect_equal(recv[offset + k], p * 1000000 + rank * 10000 + k,
                         at("from " + std::to_string(p), k));
    offset += recv_counts_int[p];
  }
}

TEST_P(Collectives, AlltoallvUnevenCountsWithZeros) {
  // Uneven, with zeros: rank 0 sends nothing to anyone, and nobody sends to the last rank
  // unless it is the only one.
  dispatch_and_check(
      *comm_,
      [](int src, int dst, int size) {
        if (size > 1 && (src == 0 || dst == size - 1)) return 0;
        return 1 + (src * 7 + dst * 3) % 5 * 13;
      },
      name("all-to-all-v uneven, zeros"));
}

TEST_P(Collectives, AlltoallvAllZero) {
  dispatch_and_check(*comm_, [](int, int, int) { return 0; }, name("all-to-all-v all zero"));
}

TEST_P(Collectives, AlltoallvLargeMessages) {
  // Large enough for MPI's rendezvous protocol; still exact in float (below 2^24 per peer).
  dispatch_and_check(
      *comm_, [](int src, int dst, int) { return 50000 + 1000 * src + 17 * dst; },
      name("all-to-all-v large"));
}

TEST_P(Collectives, BroadcastFromEveryRoot) {
  Worst worst(name("broadcast"));
  for (int root = 0; root < size_; ++root) {
    std::vector<double> data(100);
    for (int i = 0; i < 100; ++i) data[i] = rank_ == root ? value(root, i) : -7.0;
    comm_->broadcast(data.data(), data.size() * sizeof(double), root);
    for (int i = 0; i < 100; ++i)
      worst.expect_equal(data[i], value(root, i), at("root " + std::to_string(root), i));
    char untouched = 'x';
    comm_->broadcast(&untouched, 0, root);  // zero bytes: nothing moves
    EXPECT_EQ(untouched, 'x');
  }
}

TEST_P(Collectives, GatherBytesOfDifferentSizesOnEveryRoot) {
  // Rank p sends (p * 3) % 5 + p bytes: rank 0 sends none.
  auto bytes_of = [](int p) { return static_cast<size_t>((p * 3) % 5 + p); };
  auto byte = [](int p, size_t i) { return static_cast<char>('A' + (p * 7 + i) % 26); };
  std::vector<char> mine(bytes_of(rank_));
  for (size_t i = 0; i < mine.size(); ++i) mine[i] = byte(rank_, i);
  Worst worst(name("gather bytes"));
  for (int root = 0; root < size_; ++root) {
    std::vector<std::vector<char>> all = comm_->gather_bytes(mine.data(), mine.size(), root);
    if (rank_ != root) {
      EXPECT_TRUE(all.empty()) << "non-root got " << all.size() << " entries";
      continue;
    }
    // No ASSERT here: returning early would leave the other ranks waiting at the next root.
    EXPECT_EQ(all.size(), static_cast<size_t>(size_));
    for (int p = 0; p < std::min(size_, static_cast<int>(all.size())); ++p) {
      EXPECT_EQ(all[p].size(), bytes_of(p)) << "from " << p;
      for (size_t i = 0; i < std::min(all[p].size(), bytes_of(p)); ++i)
        worst.expect_equal(all[p][i], byte(p, i), at("from " + std::to_string(p), i));
    }
  }
}

TEST_P(Collectives, BarrierWaitsForTheLastRank) {
  // All ranks share this machine's clock: nobody may leave the barrier before the last rank
  // entered it. Comparing timestamps (not durations) stays exact however the ranks are
  // scheduled on a loaded machine.
  auto now_us = [] {
    return static_cast<long long>(std::chrono::duration_cast<std::chrono::microseconds>(
                                      std::chrono::system_clock::now().time_since_epoch())
                                      .count());
  };
  comm_->barrier();  // line up
  long long last_arrival_us = 0;
  if (rank_ == size_ - 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    last_arrival_us = now_us();
  }
  comm_->barrier();
  const long long left_us = now_us();
  comm_->broadcast(&last_arrival_us, sizeof last_arrival_us, size_ - 1);
  std::printf("rank %d left the barrier %.3f ms after the last rank arrived\n", rank_,
              (left_us - last_arrival_us) / 1e3);
  EXPECT_GE(left_us, last_arrival_us) << "left the barrier before the last rank came";
}

// The activation overloads with ActType::kF32 are the float collectives: the same results,
// bit for bit, on the same data.
TEST_P(Collectives, Fp32ActivationsMatchTheFloatCollectives) {
  const int n = 1000;
  std::vector<float> sum_f(n);
  for (int i = 0; i < n; ++i) sum_f[i] = static_cast<float>(value(rank_, i));
  std::vector<float> sum_a = sum_f;
  comm_->allreduce_sum(sum_f.data(), n);
  comm_->allreduce_sum(f32_act(sum_a.data()), n, ActType::kF32);

  const int count = 37;
  std::vector<float> part(count);
  for (int i = 0; i < count; ++i) part[i] = static_cast<float>(value(rank_, 5000 + i));
  std::vector<float> gathered_f(static_cast<size_t>(size_) * count, -1.0f), gathered_a = gathered_f;
  comm_->allgather(gathered_f.data(), part.data(), count);
  comm_->allgather(f32_act(gathered_a.data()), f32_act(part.data()), count, ActType::kF32);

  // Uneven blocks (src sends `block(src, dst)` floats to dst), laid out in reverse peer order
  // with a gap of 2 after each block, on both sides, so the displacements matter.
  auto block = [](int src, int dst) { return static_cast<int64_t>(1 + (src + 2 * dst) % 4); };
  std::vector<int64_t> send_counts(size_), recv_counts(size_), send_displs(size_),
      recv_displs(size_);
  int64_t send_end = 0, recv_end = 0;
  for (int p = size_ - 1; p >= 0; --p) {
    send_counts[p] = block(rank_, p);
    recv_counts[p] = block(p, rank_);
    send_displs[p] = send_end;
    recv_displs[p] = recv_end;
    send_end += send_counts[p] + 2;
    recv_end += recv_counts[p] + 2;
  }
  std::vector<float> send(send_end, -2.0f);
  for (int p = 0; p < size_; ++p)
    for (int64_t k = 0; k < send_counts[p]; ++k)
      send[send_displs[p] + k] = static_cast<float>(rank_ * 1000 + p * 10 + k);
  std::vector<float> placed_f(recv_end, -1.0f), placed_a = placed_f;
  comm_->alltoallv_placed(placed_f.data(), recv_counts, recv_displs, send.data(), send_counts,
                          send_displs);
  comm_->alltoallv_placed(f32_act(placed_a.data()), recv_counts, recv_displs, f32_act(send.data()),
                          send_counts, send_displs, ActType::kF32);

  // Reports print in reverse order of declaration.
  Worst worst_placed(name("fp32 activations all-to-all-v placed")),
      worst_gather(name("fp32 activations all-gather")),
      worst_sum(name("fp32 activations all-reduce sum"));
  for (int i = 0; i < n; ++i) worst_sum.expect_equal(sum_a[i], sum_f[i], at("", i));
  for (int p = 0; p < size_; ++p)
    for (int i = 0; i < count; ++i) {
      const int64_t j = static_cast<int64_t>(p) * count + i;
      worst_gather.expect_equal(gathered_a[j], gathered_f[j], at("", j));
      worst_gather.expect_equal(gathered_a[j], static_cast<float>(value(p, 5000 + i)),
                                at("from " + std::to_string(p), i));
    }
  for (int64_t i = 0; i < recv_end; ++i)
    worst_placed.expect_equal(placed_a[i], placed_f[i], at("", i));
  for (int p = 0; p < size_; ++p) {
    for (int64_t k = 0; k < recv_counts[p]; ++k)
      worst_placed.expect_equal(placed_a[recv_displs[p] + k], p * 1000 + rank_ * 10 + k,
                                at("from " + std::to_string(p), k));
    for (int64_t k = recv_counts[p]; k < recv_counts[p] + 2; ++k)  // the gaps stay untouched
      worst_placed.expect_equal(placed_a[recv_displs[p] + k], -1.0,
                                at("gap after " + std::to_string(p), k));
  }
}

// bf16 activations are device memory: MPI refuses them (before any data moves, on every rank
// alike, so nobody waits in MPI), naming the operation, the rank and the way out.
// (The self communicator copies any type: SelfCommunicator.ActivationsOfEitherTypeAreCopied.)
TEST(MpiCommunicator, Bf16ActivationsAreARuntimeErrorNamingTheRank) {
  auto world = make_mpi_world_communicator();
  const int size = world->size();
  std::vector<uint16_t> send(8, 0x3f80), recv(8 * static_cast<size_t>(size), 0);
  Act* recv_act = reinterpret_cast<Act*>(recv.data());
  const Act* send_act = reinterpret_cast<const Act*>(send.data());
  const std::string rank = "rank " + std::to_string(world_rank());
  expect_one_line_naming(
      error_message<RuntimeError>([&] { world->allreduce_sum(recv_act, 8, ActType::kBF16); }),
      {rank, "all-reduce", "bf16", "NCCL"});
  expect_one_line_naming(
      error_message<RuntimeError>([&] { world->allgather(recv_act, send_act, 8, ActType::kBF16); }),
      {rank, "all-gather", "bf16", "NCCL"});
  const std::vector<int64_t> counts(size, 1), displs(size, 0);
  expect_one_line_naming(error_message<RuntimeError>([&] {
                           world->alltoallv_placed(recv_act, counts, displs, send_act, counts,
                                                   displs, ActType::kBF16);
                         }),
                         {rank, "all-to-all", "bf16", "NCCL"});
  for (uint16_t bits : recv) EXPECT_EQ(bits, 0) << "a refused collective wrote its output";
}

TEST_P(Collectives, CountsBeyondMpiIntAreARuntimeErrorNamingTheRank) {
  if (GetParam() == GroupKind::kSelf) GTEST_SKIP() << "the identity needs no counts";
  // Thrown before any data moves, on every rank alike, so nobody waits in MPI.
  float dummy = 0;
  const size_t too_many = static_cast<size_t>(INT_MAX) + 1;
  std::string message =
      error_message<RuntimeError>([&] { comm_->allreduce_sum(&dummy, too_many); });
  expect_one_line_naming(message, {"rank " + std::to_string(world_rank())});
}

INSTANTIATE_TEST_SUITE_P(Groups, Collectives,
                         ::testing::Values(GroupKind::kSelf, GroupKind::kWorld,
                                           GroupKind::kReversedHalves),
                         kind_name);

// The self communicator, beyond the generic checks: its collectives touch nothing but the
// output, and the output is the input.
TEST(SelfCommunicator, EveryCollectiveIsTheIdentity) {
  auto self = make_self_communicator();
  Worst worst("self communicator identity");
  std::vector<float> x = {1.5f, -2.0f, 3.25f};
  self->allreduce_sum(x.data(), x.size());
  self->allreduce_sum_async(x.data(), x.size())->wait();
  std::vector<float> want = {1.5f, -2.0f, 3.25f};
  for (int i = 0; i < 3; ++i) worst.expect_equal(x[i], want[i], at("all-reduce", i));

  double d = 0.25;
  long long ll = 1LL << 50;
  int m[2] = {-3, 7};
  self->allreduce_sum(&d, 1);
  self->allreduce_sum(&ll, 1);
  self->allreduce_max(m, 2);
  worst.expect_equal(d, 0.25, "double");
  worst.expect_equal(static_cast<double>(ll - (1LL << 50)), 0, "long long");
  worst.expect_equal(m[0], -3, "max[0]");
  worst.expect_equal(m[1], 7, "max[1]");

  std::vector<float> out(3, 0.0f);
  self->allgather(out.data(), x.data(), 3);
  for (int i = 0; i < 3; ++i) worst.expect_equal(out[i], want[i], at("all-gather", i));
  std::fill(out.begin(), out.end(), 0.0f);
  self->reduce_scatter_sum(out.data(), x.data(), 3);
  for (int i = 0; i < 3; ++i) worst.expect_equal(out[i], want[i], at("reduce-scatter", i));
  std::fill(out.begin(), out.end(), 0.0f);
  self->alltoallv(out.data(), {3}, x.data(), {3});
  for (int i = 0; i < 3; ++i) worst.expect_equal(out[i], want[i], at("all-to-all-v", i));

  int counts[2] = {4, 5}, counts_out[2] = {0, 0};
  self->alltoall(counts_out, counts, 2);
  worst.expect_equal(counts_out[0], 4, "all-to-all[0]");
  worst.expect_equal(counts_out[1], 5, "all-to-all[1]");

  char text[] = "abc";
  self->broadcast(text, 3, 0);
  EXPECT_STREQ(text, "abc");
  std::vector<std::vector<char>> gathered = self->gather_bytes(text, 3, 0);
  ASSERT_EQ(gathered.size(), 1u);
  EXPECT_EQ(std::string(gathered[0].begin(), gathered[0].end()), "abc");
  self->barrier();
}

// Activations of either type: all-reduce leaves them, the others copy count * element-size
// bytes to their places (bf16 bit patterns arrive exactly).
TEST(SelfCommunicator, ActivationsOfEitherTypeAreCopied) {
  auto self = make_self_communicator();
  Worst worst("self communicator activations");
  for (ActType type : {ActType::kF32, ActType::kBF16}) {
    const std::string tag = act_type_name(type);
    const size_t width = act_bytes(type), n = 5;
    std::vector<unsigned char> x(n * width), out(n * width + 3 * width, 0xee);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<unsigned char>(17 * i + 3);
    const std::vector<unsigned char> original = x;
    Act* x_act = reinterpret_cast<Act*>(x.data());
    self->allreduce_sum(x_act, n, type);
    for (size_t i = 0; i < x.size(); ++i)
      worst.expect_equal(x[i], original[i], at(tag + " all-reduce byte", i));

    self->allgather(reinterpret_cast<Act*>(out.data()), x_act, n, type);
    for (size_t i = 0; i < x.size(); ++i)
      worst.expect_equal(out[i], x[i], at(tag + " all-gather byte", i));
    for (size_t i = x.size(); i < out.size(); ++i)
      worst.expect_equal(out[i], 0xee, at(tag + " all-gather beyond count, byte", i));

    // Elements 1..3 of x land at elements 3..5 of out.
    std::fill(out.begin(), out.end(), 0xee);
    self->alltoallv_placed(reinterpret_cast<Act*>(out.data()), {3}, {3}, x_act, {3}, {1}, type);
    for (size_t i = 0; i < out.size(); ++i) {
      const bool moved = i >= 3 * width && i < 6 * width;
      worst.expect_equal(out[i], moved ? x[i - 2 * width] : 0xee,
                         at(tag + " all-to-all-v byte", i));
    }
  }
}

}  // namespace
}  // namespace moe
