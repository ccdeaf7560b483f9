// moe-launch (issue 8): the command lines it builds for representative cases (one node, 2 nodes
// x 8 GPUs, a SLURM allocation, the CPU single-node test) checked as text; its health check; and
// the real executable: a 2-rank single-node test that must report healthy, and bad usage that
// must exit 2 with one line on stderr.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "launcher/launch_command.h"

#include "tests/subprocess.h"


namespace moe {
namespace {

const std::string kLaunch = std::string(MOE_BINARY_DIR) + "/moe-launch";

// ---------------------------------------------------------------------------------------------
// Command lines as text

LaunchOptions parse(std::vector<std::string> words) {
  words.insert(words.begin(), "moe-launch");
  std::vector<const char*> argv;
  for (const std::string& w : words) argv.push_back(w.c_str());
  auto o = parse_launch_options(static_cast<int>(argv.size()), argv.data());
  EXPECT_TRUE(o.has_value());
  return o.value_or(LaunchOptions{});
}

LaunchEnvironment machine(int cores, bool root = true) {
  LaunchEnvironment env;
  env.cores = cores;
  env.root = root;
  env.self_dir = "/opt/moe/bin";
  env.vars = {{"PATH", "/usr/bin"}, {"HOME", "/root"}};
  return env;
}

std::string command(const std::vector<std::string>& words, const LaunchEnvironment& env) {
  return shell_join(build_launch_command(parse(words), env));
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(LaunchCommand, SingleNodeFourRanks) {
  LaunchEnvironment env = machine(16);
  env.vars["OMP_PROC_BIND"] = "close";
  const std::string c = command({"--np", "4", "--", "--data-path", "d.txt"}, env);
  EXPECT_EQ(c.rfind("mpirun --allow-run-as-root -np 4 ", 0), 0u) << c;
  EXPECT_TRUE(contains(c, " --mca btl self,vader ")) << c;  // shared memory only
  EXPECT_TRUE(contains(c, " --bind-to none ")) << c;
  EXPECT_TRUE(contains(c, " -x OMP_PROC_BIND ")) << c;
  EXPECT_TRUE(contains(c, " -x OMP_NUM_THREADS=4 ")) << c;  // 16 cores / 4 ranks
  EXPECT_FALSE(contains(c, "--host")) << c;
  EXPECT_FALSE(contains(c, "--oversubscribe")) << c;
  EXPECT_TRUE(contains(c, " /opt/moe/bin/moe-train --data-path d.txt")) << c;
  // Not root: no --allow-run-as-root. OMP_NUM_THREADS set: passed as it is.
  LaunchEnvironment user = machine(16, /*root=*/false);
  user.vars["OMP_NUM_THREADS"] = "2";
  const std::string u = command({"--np", "4", "--run-dir", "/r", "--", "--x"}, user);
  EXPECT_EQ(u.rfind("mpirun -np 4 ", 0), 0u) << u;
  EXPECT_TRUE(contains(u, " -x OMP_NUM_THREADS ")) << u;
  EXPECT_FALSE(contains(u, "OMP_NUM_THREADS=")) << u;
  EXPECT_TRUE(contains(u, " --output-filename /r/logs ")) << u;
}

TEST(LaunchCommand, TwoNodesEightGpusTcp) {
  LaunchEnvironment env = machine(64);
  env.vars["NCCL_DEBUG"] = "INFO";
  const std::string c = command({"--nodes", "2", "--gpus-per-node", "8", "--hosts", "a,b",
                                 "--iface", "eth0", "--", "--device", "cuda"},
                                env);
  EXPECT_TRUE(contains(c, " -np 16 ")) << c;
  EXPECT_TRUE(contains(c, " --host a:8,b:8 ")) << c;
  EXPECT_TRUE(contains(c, " --map-by ppr:8:node ")) << c;  // one rank per GPU
  EXPECT_TRUE(contains(c, " --bind-to none ")) << c;
  EXPECT_TRUE(contains(c, " --mca btl self,vader,tcp ")) << c;
  EXPECT_TRUE(contains(c, " --mca btl_tcp_if_include eth0 ")) << c;
  EXPECT_TRUE(contains(c, " -x NCCL_DEBUG ")) << c;
  EXPECT_TRUE(contains(c, " -x NCCL_SOCKET_IFNAME=eth0 ")) << c;
  EXPECT_TRUE(contains(c, " -x OMP_NUM_THREADS=8 ")) << c;  // 64 cores / 8 ranks
  EXPECT_TRUE(contains(c, "moe-train --device cuda")) << c;
  // The same job by --np and a hostfile, over UCX.
  const std::string u = command({"--np", "16", "--gpus-per-node", "8", "--hostfile", "hosts.txt",
                                 "--network", "ucx", "--iface", "mlx5_0:1", "--", "--device",
                                 "cuda"},
                                env);
  EXPECT_TRUE(contains(u, " -np 16 --hostfile hosts.txt ")) << u;
  EXPECT_TRUE(contains(u, " --map-by ppr:8:node ")) << u;
  EXPECT_TRUE(contains(u, " --mca pml ucx ")) << u;
  EXPECT_TRUE(contains(u, " -x UCX_NET_DEVICES=mlx5_0:1 ")) << u;
}

TEST(LaunchCommand, SlurmAllocation) {
  LaunchEnvironment env = machine(32);
  env.vars["SLURM_JOB_ID"] = "4242";
  env.vars["SLURM_NTASKS"] = "16";
  env.vars["SLURM_JOB_NUM_NODES"] = "2";
  const std::string c = command({"--gpus-per-node", "8", "--run-dir", "/r", "--", "--device", "cuda"}, env);
  EXPECT_EQ(c.rfind("srun ", 0), 0u) << c;
  EXPECT_TRUE(contains(c, " --ntasks=16 ")) << c;
  EXPECT_TRUE(contains(c, " --ntasks-per-node=8 ")) << c;
  EXPECT_TRUE(contains(c, " --gpus-per-task=1 ")) << c;
  EXPECT_TRUE(contains(c, " --cpus-per-task=4 ")) << c;
  EXPECT_TRUE(contains(c, " --output=/r/logs/rank.%t.out ")) << c;
  EXPECT_TRUE(contains(c, "OMP_NUM_THREADS=4")) << c;
  EXPECT_TRUE(contains(c, " /opt/moe/bin/moe-train --device cuda")) << c;
  EXPECT_FALSE(contains(c, "mpirun")) << c;
  // --np wins over the allocation's task count; hosts are the allocation's to decide.
  EXPECT_TRUE(contains(command({"--np", "4", "--", "--x"}, env), " --ntasks=4 "));
  EXPECT_THROW(build_launch_command(parse({"--hosts", "a,b", "--", "--x"}), env), UsageError);
}

TEST(LaunchCommand, CpuSingleNodeTest) {
  LaunchEnvironment env = machine(2);
  env.default_data = "/data/tiny.txt";
  env.vars["OMP_NUM_THREADS"] = "8";  // replaced: the test splits the cores
  env.vars["SLURM_JOB_ID"] = "1";     // a test is local even inside an allocation
  const std::string c = command({"--single-node-test", "4", "--run-dir", "/run", "--",
                                 "--tensor-model-parallel-size", "2"},
                                env);
  EXPECT_EQ(c.rfind("mpirun --allow-run-as-root -np 4 ", 0), 0u) << c;
  EXPECT_TRUE(contains(c, " --oversubscribe ")) << c;
  EXPECT_TRUE(contains(c, " --mca btl self,vader ")) << c;
  EXPECT_TRUE(contains(c, " -x OMP_NUM_THREADS=1 ")) << c;  // 2 cores, 4 ranks: at least 1
  EXPECT_FALSE(contains(c, " -x OMP_NUM_THREADS ")) << c;
  EXPECT_TRUE(contains(c, " --output-filename /run/logs ")) << c;
  EXPECT_TRUE(contains(c, "--tensor-model-parallel-size 2 --num-layers 2 --hidden-size 64")) << c;
  EXPECT_TRUE(contains(c, " --data-path /data/tiny.txt ")) << c;
  EXPECT_TRUE(contains(c, " --metrics-file /run/metrics.jsonl")) << c;
  // 16 cores, 4 ranks: 4 threads each. The user's model and data replace the defaults.
  env.cores = 16;
  const std::string u = command({"--single-node-test", "4", "--run-dir", "/run", "--",
                                 "--hidden-size", "32", "--data-path", "mine.txt"},
                                env);
  EXPECT_TRUE(contains(u, " -x OMP_NUM_THREADS=4 ")) << u;
  EXPECT_FALSE(contains(u, "--num-layers")) << u;
  EXPECT_FALSE(contains(u, "tiny.txt")) << u;
  EXPECT_TRUE(contains(u, " --train-iters 30 ")) << u;
}

std::string usage_error(std::vector<std::string> words) {
  words.insert(words.begin(), "moe-launch");
  std::vector<const char*> argv;
  for (const std::string& w : words) argv.push_back(w.c_str());
  try {
    parse_launch_options(static_cast<int>(argv.size()), argv.data());
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

TEST(LaunchCommand, BadUsage) {
  EXPECT_TRUE(contains(usage_error({"--np", "2", "--data-path", "x"}), "--")) << "missing --";
  EXPECT_TRUE(contains(usage_error({"--bogus", "--", "--x"}), "bogus"));
  EXPECT_TRUE(contains(usage_error({"--np", "0", "--", "--x"}), "--np"));
  EXPECT_TRUE(contains(usage_error({"--network", "ib", "--", "--x"}), "--network"));
  EXPECT_TRUE(contains(usage_error({"--nodes", "3", "--hosts", "a,b", "--", "--x"}), "--nodes"));
  EXPECT_TRUE(contains(usage_error({"--np", "3", "--nodes", "2", "--gpus-per-node", "2", "--hosts",
                                    "a,b", "--", "--x"}),
                       "--np"));
  EXPECT_TRUE(contains(usage_error({"--single-node-test", "2", "--np", "2", "--", "--x"}),
                       "--single-node-test"));
  // Two nodes need hosts, a hostfile or a SLURM allocation.
  EXPECT_THROW(build_launch_command(parse({"--nodes", "2", "--gpus-per-node", "8", "--", "--x"}),
                                    machine(8)),
               UsageError);
}

TEST(LaunchCommand, ShellQuoting) {
  EXPECT_EQ(shell_join({"mpirun", "-x", "A=b c", "it's", "/p/logs"}),
            "mpirun -x 'A=b c' 'it'\\''s' /p/logs");
}

TEST(LaunchHealth, LossTrendAndFailedRank) {
  std::string jsonl;
  for (int i = 1; i <= 12; ++i)
    jsonl += "{\"iteration\":" + std::to_string(i) + ",\"lm_loss\":" + std::to_string(13 - i) + "}\n";
  jsonl += "{\"iteration\":12,\"val_loss\":0.5}\n";
  const LossTrend t = loss_trend(jsonl);
  EXPECT_EQ(t.iterations, 12);
  EXPECT_DOUBLE_EQ(t.first, 10.0);  // 12..8
  EXPECT_DOUBLE_EQ(t.last, 3.0);    // 5..1
  EXPECT_TRUE(t.went_down());
  EXPECT_FALSE(loss_trend("{\"lm_loss\":1}\n{\"lm_loss\":2}\n").went_down());
  EXPECT_THROW(loss_trend("{\"lm_loss\":1}\n"), RuntimeError);
  EXPECT_THROW(loss_trend("not json\n"), RuntimeError);
  EXPECT_EQ(rank_named_by_mpirun("mpirun noticed that process rank 3 with PID 0 on node vm "
                                 "exited on signal 9 (Killed)."),
            3);
  EXPECT_EQ(rank_named_by_mpirun("nothing"), -1);
  EXPECT_EQ(last_lines("a\nb\nc\n", 2), "b\nc\n");
}

// ---------------------------------------------------------------------------------------------
// The real executable (the approach of test_cli.cpp: posix_spawn, own process group, timeout)

using moe::testing::Result;
using moe::testing::run;

TEST(LaunchExecutable, SingleNodeTestOfTwoRanksIsHealthy) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("test_launch_" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  const Result r = run({kLaunch, "--single-node-test", "2", "--run-dir", dir.string(), "--",
                        "--expert-model-parallel-size", "2"},
                       90.0);
  EXPECT_FALSE(r.timed_out) << r;
  EXPECT_EQ(r.status, 0) << r;
  EXPECT_TRUE(contains(r.out, "moe-launch: single-node test of 2 ranks: healthy (loss ")) << r;
  EXPECT_TRUE(std::filesystem::exists(dir / "metrics.jsonl")) << r;
  EXPECT_TRUE(std::filesystem::exists(dir / "logs" / "1" / "rank.1" / "stdout")) << r;
  std::filesystem::remove_all(dir);
}

TEST(LaunchExecutable, FailingRankIsNamed) {
  // Every rank rejects this layout: moe-launch exits 1 and shows a rank's error line.
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("test_launch_bad_" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  const Result r = run({kLaunch, "--single-node-test", "2", "--run-dir", dir.string(), "--",
                        "--expert-model-parallel-size", "3"},
                       60.0);
  EXPECT_FALSE(r.timed_out) << r;
  EXPECT_EQ(r.status, 1) << r;
  EXPECT_TRUE(contains(r.err, "moe-launch: error: single-node test of 2 ranks: unhealthy: rank ")) << r;
  EXPECT_TRUE(contains(r.err, "--expert-model-parallel-size 3")) << r;
  std::filesystem::remove_all(dir);
}

TEST(LaunchExecutable, BadUsageIsOneLineAndExit2) {
  const std::vector<std::vector<std::string>> cases = {
      {kLaunch, "--np", "2", "--data-path", "x"},  // missing --
      {kLaunch, "--bogus", "--", "--x"},
      {kLaunch, "--np", "0", "--", "--x"}};
  for (const auto& argv : cases) {
    const Result r = run(argv, 10.0);
    EXPECT_EQ(r.status, 2) << r;
    EXPECT_EQ(r.err.rfind("moe-launch: error: ", 0), 0u) << r;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r;
    EXPECT_TRUE(r.out.empty()) << r;
  }
  // --dry-run prints the command and runs nothing.
  const Result d = run({kLaunch, "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--hosts",
                        "a,b", "--", "--device", "cuda"},
                       10.0);
  EXPECT_EQ(d.status, 0) << d;
  EXPECT_TRUE(contains(d.out, " -np 16 ") && contains(d.out, " --map-by ppr:8:node ")) << d;
}

}  // namespace
}  // namespace moe
