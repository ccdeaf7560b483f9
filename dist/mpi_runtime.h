// MPI for the life of the process: initialised even at one rank (singleton start without
// mpirun works), finalised on scope exit.
#pragma once

namespace moe {

class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }

 private:
  int world_rank_ = 0;
  int world_size_ = 1;
};

}  // namespace moe
