// moe-launch (issue 8): `moe-launch [launch options] -- [moe-train options]` builds the mpirun
// (or, inside a SLURM allocation, srun) command of a moe-train job and runs it; --dry-run prints
// it. `--single-node-test N` runs N CPU ranks here and checks the run is healthy. Exit status 0
// on success, 2 on bad usage, 1 when the job failed (naming the failing rank, with its last log
// lines) or a single-node test was not healthy.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "launcher/launch_command.h"

extern char** environ;

namespace fs = std::filesystem;

namespace moe {
namespace {

volatile sig_atomic_t g_child = 0;

// SIGTERM to moe-launch stops the job: mpirun passes it on to every rank. (Ctrl-C reaches
// mpirun directly, being in the terminal's foreground process group.)
void forward_signal(int signal) {
  if (g_child > 0) kill(static_cast<pid_t>(g_child), signal);
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

struct JobResult {
  int status = -1;  // exit status of mpirun/srun; 128+signal when killed
  std::string stderr_tail;
};

// Runs the command with stdout on ours and stderr copied to ours while keeping its tail (mpirun
// names a failed rank there).
JobResult run_job(const std::vector<std::string>& command) {
  int err_pipe[2];
  if (pipe2(err_pipe, O_CLOEXEC) != 0) throw RuntimeError("pipe: " + std::string(std::strerror(errno)));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], 2);
  std::vector<char*> args;
  for (const std::string& a : command) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int error = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(err_pipe[1]);
  if (error != 0) {
    close(err_pipe[0]);
    throw RuntimeError("cannot start " + command[0] + ": " + std::strerror(error));
  }
  g_child = pid;
  struct sigaction forward {};
  forward.sa_handler = forward_signal;
  sigaction(SIGTERM, &forward, nullptr);
  sigaction(SIGHUP, &forward, nullptr);
  signal(SIGINT, SIG_IGN);  // mpirun gets the terminal's Ctrl-C and stops the ranks

  JobResult r;
  char buffer[4096];
  for (;;) {
    const ssize_t n = read(err_pipe[0], buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    fwrite(buffer, 1, static_cast<size_t>(n), stderr);
    fflush(stderr);
    r.stderr_tail.append(buffer, static_cast<size_t>(n));
    if (r.stderr_tail.size() > (1u << 16)) r.stderr_tail.erase(0, r.stderr_tail.size() - (1u << 15));
  }
  close(err_pipe[0]);
  int wait_status = 0;
  while (waitpid(pid, &wait_status, 0) < 0 && errno == EINTR) {
  }
  g_child = 0;
  signal(SIGINT, SIG_DFL);
  if (WIFEXITED(wait_status)) r.status = WEXITSTATUS(wait_status);
  if (WIFSIGNALED(wait_status)) r.status = 128 + WTERMSIG(wait_status);
  return r;
}

// Per-rank logs under RUN/logs: Open MPI's logs/1/rank.N/{stdout,stderr} or srun's
// logs/rank.N.{out,err}. Rank -> its files.
std::map<int, std::vector<fs::path>> rank_logs(const std::string& run_dir) {
  std::map<int, std::vector<fs::path>> logs;
  std::error_code ec;
  const fs::path root = fs::path(run_dir) / "logs";
  if (run_dir.empty() || !fs::exists(root, ec)) return logs;
  for (auto it = fs::recursive_directory_iterator(root, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    const fs::path& p = it->path();
    std::string name = p.filename().string();
    if (name == "stdout" || name == "stderr") name = p.parent_path().filename().string();
    if (name.rfind("rank.", 0) != 0) continue;
    const std::string digits = name.substr(5, name.find_first_not_of("0123456789", 5) - 5);
    if (digits.empty()) continue;
    logs[std::stoi(digits)].push_back(p);
  }
  for (auto& [rank, files] : logs) std::sort(files.begin(), files.end());
  return logs;
}

// The first rank whose log reports an error, with that log's text.
std::optional<std::pair<int, std::string>> rank_with_error(const std::string& run_dir) {
  for (const auto& [rank, files] : rank_logs(run_dir))
    for (const fs::path& f : files) {
      const std::string text = read_text(f);
      if (text.find("error") != std::string::npos) return std::make_pair(rank, text);
    }
  return std::nullopt;
}

std::string log_of_rank(const std::string& run_dir, int rank) {
  const auto logs = rank_logs(run_dir);
  const auto it = logs.find(rank);
  std::string text;
  if (it != logs.end())
    for (const fs::path& f : it->second) text += read_text(f);
  return text;
}

// After a failed job: names the failing rank and prints its last log lines.
void report_failure(const std::string& what, const JobResult& job, const std::string& run_dir) {
  int rank = -1;
  std::string log;
  if (const auto found = rank_with_error(run_dir)) {
    rank = found->first;
    log = found->second;
  } else {
    rank = rank_named_by_mpirun(job.stderr_tail);
    if (rank >= 0) log = log_of_rank(run_dir, rank);
  }
  std::string line = "moe-launch: error: " + what;
  if (rank >= 0) line += ": rank " + std::to_string(rank) + " failed";
  line += " (exit status " + std::to_string(job.status) + ")";
  if (!log.empty()) {
    std::fprintf(stderr, "%s; its last log lines:\n%s", line.c_str(), last_lines(log, 10).c_str());
  } else {
    if (run_dir.empty()) line += "; give --run-dir to keep per-rank logs";
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

// A byte-level text to train on when the repository's data is not there.
void write_generated_text(const fs::path& path) {
  static const char* const kWords[] = {"the", "expert", "router", "sends", "each", "token",
                                       "to", "one", "of", "four", "small", "networks", "and",
                                       "loss", "goes", "down", "as", "it", "learns"};
  std::ofstream out(path);
  uint64_t state = 12345;
  for (int i = 0; i < 40000; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    out << kWords[(state >> 33) % (sizeof kWords / sizeof kWords[0])]
        << ((i % 12 == 11) ? ".\n" : " ");
  }
  if (!out) throw RuntimeError("cannot write " + path.string());
}

std::string default_run_dir() {
  const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", std::localtime(&now));
  return (fs::temp_directory_path() /
          ("moe-launch-" + std::string(stamp) + "-" + std::to_string(getpid())))
      .string();
}

int launch(int argc, char** argv) {
  auto parsed = parse_launch_options(argc, argv);
  if (!parsed) return 0;
  LaunchOptions o = *parsed;
  LaunchEnvironment env = current_launch_environment();
  const bool test = o.single_node_test > 0;

  if (test && o.run_dir.empty()) o.run_dir = default_run_dir();
  if (!o.run_dir.empty() && !o.dry_run) {
    std::error_code ec;
    fs::create_directories(fs::path(o.run_dir) / "logs", ec);
    if (ec) throw RuntimeError("--run-dir: cannot create " + o.run_dir + ": " + ec.message());
  }
  if (test && !has_flag(o.train_args, "--data-path") && !has_flag(o.train_args, "--config")) {
    const fs::path shared = fs::path(MOE_SOURCE_DIR) / ".." / "shared" / "data" / "tinyshakespeare.txt";
    std::error_code ec;
    if (fs::exists(shared, ec)) {
      env.default_data = fs::weakly_canonical(shared, ec).string();
    } else {
      env.default_data = (fs::path(o.run_dir) / "data.txt").string();
      if (!o.dry_run) write_generated_text(env.default_data);
    }
  }

  const std::vector<std::string> command = build_launch_command(o, env);
  if (o.dry_run) {
    std::cout << shell_join(command) << "\n";
    return 0;
  }
  const std::string train = moe_train_path(o, env);
  if (train.find('/') != std::string::npos && access(train.c_str(), X_OK) != 0)
    throw RuntimeError("cannot run moe-train at " + train + " (give --moe-train PATH)");
  if (test) std::cout << "moe-launch: single-node test of " << o.single_node_test
                      << " ranks in " << o.run_dir << std::endl;

  const JobResult job = run_job(command);
  if (job.status != 0) {
    report_failure(test ? "single-node test of " + std::to_string(o.single_node_test) +
                              " ranks: unhealthy"
                        : "the job failed",
                   job, o.run_dir);
    return 1;
  }
  if (!test) return 0;

  // Health: every rank exited 0 (above), no rank log reports an error, the loss went down.
  const std::string prefix =
      "moe-launch: single-node test of " + std::to_string(o.single_node_test) + " ranks: ";
  if (const auto found = rank_with_error(o.run_dir)) {
    std::fprintf(stderr, "%sunhealthy: rank %d reported an error; its last log lines:\n%s",
                 prefix.c_str(), found->first, last_lines(found->second, 10).c_str());
    return 1;
  }
  const std::string metrics_path = *flag_value(single_node_test_train_args(o, env), "--metrics-file");
  std::ifstream metrics(metrics_path);
  if (!metrics) {
    std::fprintf(stderr, "%sunhealthy: no metrics file %s\n", prefix.c_str(), metrics_path.c_str());
    return 1;
  }
  LossTrend trend;
  try {
    trend = loss_trend(read_text(metrics_path));
  } catch (const RuntimeError& e) {
    std::fprintf(stderr, "%sunhealthy: %s\n", prefix.c_str(), e.what());
    return 1;
  }
  char summary[256];
  std::snprintf(summary, sizeof summary, "(loss %.4f -> %.4f)", trend.first, trend.last);
  if (!trend.went_down()) {
    std::fprintf(stderr, "%sunhealthy: the loss did not go down %s\n", prefix.c_str(), summary);
    return 1;
  }
  std::cout << prefix << "healthy " << summary << std::endl;
  return 0;
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  try {
    return moe::launch(argc, argv);
  } catch (const moe::UsageError& e) {
    std::fprintf(stderr, "moe-launch: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-launch: error: %s\n", e.what());
    return 1;
  }
}
