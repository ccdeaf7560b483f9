// moe-launch (issue 8): the command line it runs, built as text from its options and the
// environment, and the health check of a single-node test run. Pure logic: nothing here starts a
// process or touches the file system, so every case can be checked as text (tests/test_launch.cpp).
// The process handling lives in launcher/main_launch.cpp.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace moe {

struct LaunchOptions {
  int np = 0;              // --np: total ranks; 0: nodes x ranks per node
  int nodes = 0;           // --nodes; 0: from --hosts, else 1
  int ranks_per_node = 0;  // --ranks-per-node
  int gpus_per_node = 0;   // --gpus-per-node: one rank per GPU
  int cores_per_node = 0;  // --cores-per-node; 0: this machine's
  std::vector<std::string> hosts;  // --hosts a,b
  std::string hostfile;            // --hostfile F
  std::string network = "tcp";     // --network tcp | ucx (across nodes)
  std::string iface;               // --iface NAME
  std::string run_dir;             // --run-dir: per-rank logs under RUN/logs
  std::string moe_train;           // --moe-train; empty: beside moe-launch
  std::string mpirun = "mpirun";   // --mpirun
  bool dry_run = false;            // --dry-run
  int single_node_test = 0;        // --single-node-test N
  std::vector<std::string> train_args;  // everything after `--`
};

// What the command depends on besides the options; current_launch_environment() fills it in.
struct LaunchEnvironment {
  std::map<std::string, std::string> vars;  // the process environment
  bool root = false;                         // running as root (containers)
  int cores = 1;                             // cores this process may use
  std::string self_dir;                      // the directory of the moe-launch executable
  std::string default_data;                  // data of a single-node test without --data-path
};

// Parses `moe-launch [launch options] -- [moe-train options]`. Returns nullopt after printing
// --help; throws UsageError on bad usage (missing `--`, unknown option, a bad value).
std::optional<LaunchOptions> parse_launch_options(int argc, const char* const* argv);

// The process environment, root, usable cores and the directory of /proc/self/exe.
LaunchEnvironment current_launch_environment();

// The moe-train to run: --moe-train, else moe-train beside moe-launch.
std::string moe_train_path(const LaunchOptions& o, const LaunchEnvironment& env);

// OpenMP threads per rank: cores per node split between the ranks of a node, at least 1.
int threads_per_rank(const LaunchOptions& o, const LaunchEnvironment& env);

// The moe-train options of a single-node test: the user's, with a small model when they give no
// model options, data from env.default_data when they give none, and the metrics file in the run
// directory when they give none.
std::vector<std::string> single_node_test_train_args(const LaunchOptions& o,
                                                     const LaunchEnvironment& env);

// The full command to run: `srun ...` inside a SLURM allocation (SLURM_JOB_ID set), else
// `mpirun ...`; a single-node test is always a local, oversubscribed mpirun.
std::vector<std::string> build_launch_command(const LaunchOptions& o, const LaunchEnvironment& env);

// POSIX-shell quoting, words joined by spaces: what --dry-run prints.
std::string shell_quote(const std::string& word);
std::string shell_join(const std::vector<std::string>& words);

// The value of `--flag V` or `--flag=V` in args, if given (the last one wins).
std::optional<std::string> flag_value(const std::vector<std::string>& args, const std::string& flag);
bool has_flag(const std::vector<std::string>& args, const std::string& flag);

// The loss trend of a metrics JSONL text: mean lm_loss of the first and the last `window`
// training iterations (evaluation lines are skipped). Throws RuntimeError when there are fewer
// than two training iterations or a line is not JSON.
struct LossTrend {
  double first = 0, last = 0;
  int iterations = 0;
  bool went_down() const { return last < first; }
};
LossTrend loss_trend(const std::string& metrics_jsonl, int window = 5);

// The rank whose mpirun notice ("process rank 3 ...") appears in mpirun's output, or -1.
int rank_named_by_mpirun(const std::string& mpirun_output);

// The last n lines of text.
std::string last_lines(const std::string& text, int n);

}  // namespace moe
