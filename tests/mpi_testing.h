// Small helpers shared by the MPI test suites (tests/mpi_test_*.cpp).
#pragma once

#include <mpi.h>

namespace moe::testing {

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

}  // namespace moe::testing
