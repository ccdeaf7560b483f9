#include "dist/mpi_runtime.h"

#include <mpi.h>

#include "dist/watchdog.h"

namespace moe {

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) MPI_Init(argc, argv);
  // Errors come back as codes so that a failing rank can name itself instead of aborting.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size_);
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  // Finalize synchronises with the other ranks: a dead peer must not hang the exit.
  const WatchedCollective watch("MPI_Finalize");
  MPI_Finalize();
}

}  // namespace moe
