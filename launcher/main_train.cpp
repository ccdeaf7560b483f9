// moe-train: trains a Switch Transformer (DESIGN.md). Exit status 0 on success, 2 on bad usage
// or configuration, 1 on a runtime failure; errors are one line on stderr naming the rank.
#include <cstdio>
#include <exception>

#include "core/error.h"
#include "dist/mpi_runtime.h"
#include "launcher/run_main.h"
#include "launcher/trainer.h"

int main(int argc, char** argv) {
  moe::MpiRuntime mpi(&argc, &argv);
  return moe::run_main("moe-train", mpi, [&] {
    auto options = moe::parse_train_options(argc, argv);
    if (!options) return 0;
    moe::Trainer trainer(*options, mpi.world_size(), mpi.world_rank());
    return trainer.run();
  });
}
