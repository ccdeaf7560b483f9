// The communicator of a group with one member: collectives leave the data as it is.
#include "dist/communicator.h"

namespace moe {
namespace {

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(float*, size_t) override {}
  void allreduce_sum(double*, size_t) override {}
  void allreduce_sum(long long*, size_t) override {}
  void allreduce_max(int*, size_t) override {}
  void broadcast(void*, size_t, int) override {}
  void barrier() override {}
};

}  // namespace

std::unique_ptr<Communicator> make_self_communicator() {
  return std::make_unique<SelfCommunicator>();
}

}  // namespace moe
