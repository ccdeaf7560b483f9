// moe-eval: mean cross-entropy per target token of a model over every window of a file; the
// last line on stdout is one JSON object with at least `loss` and `tokens`.
#include "dist/mpi_runtime.h"
#include "launcher/routing_dump.h"
#include "launcher/run_main.h"
#include "launcher/evaluation.h"

int main(int argc, char** argv) {
  moe::MpiRuntime mpi(&argc, &argv);
  return moe::run_main("moe-eval", mpi, [&] {
    auto options = moe::parse_eval_options(argc, argv);
    if (!options) return 0;
    if (!options->dump_routing.empty()) return moe::run_routing_dump(*options);
    return moe::run_evaluation(*options);
  });
}
