// The error boundary of every executable: each failure becomes one line on stderr, naming the
// rank when there is more than one, and the exit status DESIGN.md gives it (2 usage, 1 runtime).
#pragma once

#include <mpi.h>

#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include "core/error.h"
#include "dist/mpi_runtime.h"

namespace moe {

template <typename Body>
int run_main(const char* program, const MpiRuntime& mpi, Body&& body) {
  auto fail = [&](int status, const char* what) {
    if (mpi.world_size() > 1)
      std::fprintf(stderr, "%s: rank %d: error: %s\n", program, mpi.world_rank(), what);
    else
      std::fprintf(stderr, "%s: error: %s\n", program, what);
    std::fflush(stderr);
    // Other ranks may be waiting in a collective: take the whole job down.
    if (mpi.world_size() > 1) MPI_Abort(MPI_COMM_WORLD, status);
    return status;
  };
  try {
    return body();
  } catch (const UsageError& e) {
    return fail(2, e.what());
  } catch (const std::bad_alloc&) {
    return fail(1, "out of memory");
  } catch (const std::exception& e) {
    return fail(1, e.what());
  }
}

}  // namespace moe
