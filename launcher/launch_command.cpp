#include "launcher/launch_command.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "core/error.h"

extern char** environ;

namespace po = boost::program_options;

namespace moe {

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw UsageError(message);
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(text);
  while (std::getline(in, part, ','))
    if (!part.empty()) parts.push_back(part);
  return parts;
}

constexpr const char* kUsage =
    "usage: moe-launch [launch options] -- [moe-train options]\n"
    "       moe-launch --single-node-test N -- [moe-train options]";

// Ranks on each node of the job.
int ranks_per_node_of(const LaunchOptions& o, int nodes) {
  if (o.ranks_per_node > 0) return o.ranks_per_node;
  if (o.gpus_per_node > 0) return o.gpus_per_node;
  if (o.np > 0) return std::max(1, o.np / std::max(1, nodes));
  return 1;
}

int nodes_of(const LaunchOptions& o) {
  if (o.nodes > 0) return o.nodes;
  if (!o.hosts.empty()) return static_cast<int>(o.hosts.size());
  return 1;
}

int total_ranks(const LaunchOptions& o) {
  if (o.single_node_test > 0) return o.single_node_test;
  if (o.np > 0) return o.np;
  return nodes_of(o) * ranks_per_node_of(o, nodes_of(o));
}

const std::string* env_var(const LaunchEnvironment& env, const std::string& name) {
  const auto it = env.vars.find(name);
  return it == env.vars.end() ? nullptr : &it->second;
}

// NCCL_* and OMP_* variables of the environment, by name.
std::vector<std::string> passed_variables(const LaunchEnvironment& env) {
  std::vector<std::string> names;
  for (const auto& [name, value] : env.vars)
    if (name.rfind("NCCL_", 0) == 0 || name.rfind("OMP_", 0) == 0) names.push_back(name);
  return names;
}

std::vector<std::string> srun_command(const LaunchOptions& o, const LaunchEnvironment& env) {
  require(o.hosts.empty() && o.hostfile.empty(),
          "--hosts and --hostfile do not apply inside a SLURM allocation (SLURM_JOB_ID is set): "
          "the allocation decides the hosts");
  int ntasks = 0;
  if (o.np > 0) {
    ntasks = o.np;
  } else if (o.nodes > 0 && (o.ranks_per_node > 0 || o.gpus_per_node > 0)) {
    ntasks = o.nodes * ranks_per_node_of(o, o.nodes);
  } else if (const std::string* n = env_var(env, "SLURM_NTASKS")) {
    ntasks = std::atoi(n->c_str());
  } else if (const std::string* n = env_var(env, "SLURM_NPROCS")) {
    ntasks = std::atoi(n->c_str());
  }
  require(ntasks > 0, "inside a SLURM allocation without SLURM_NTASKS: give --np, or --nodes "
                      "with --ranks-per-node or --gpus-per-node");
  std::vector<std::string> c = {"srun", "--mpi=pmix", "--kill-on-bad-exit=1",
                                "--ntasks=" + std::to_string(ntasks)};
  if (o.nodes > 0) c.push_back("--nodes=" + std::to_string(o.nodes));
  const bool per_node = o.ranks_per_node > 0 || o.gpus_per_node > 0;
  if (per_node) c.push_back("--ntasks-per-node=" + std::to_string(ranks_per_node_of(o, 1)));
  const int threads = threads_per_rank(o, env);
  c.push_back("--cpus-per-task=" + std::to_string(threads));
  if (o.gpus_per_node > 0) c.push_back("--gpus-per-task=1");
  if (!o.run_dir.empty()) {
    c.push_back("--output=" + o.run_dir + "/logs/rank.%t.out");
    c.push_back("--error=" + o.run_dir + "/logs/rank.%t.err");
  }
  // --export takes NAME=value items split at commas: only comma-free values go here.
  std::string exports = "ALL";
  if (!env_var(env, "OMP_NUM_THREADS")) exports += ",OMP_NUM_THREADS=" + std::to_string(threads);
  if (o.network == "ucx") {
    exports += ",OMPI_MCA_pml=ucx";
    if (!o.iface.empty()) exports += ",UCX_NET_DEVICES=" + o.iface;
  } else if (!o.iface.empty()) {
    exports += ",OMPI_MCA_btl_tcp_if_include=" + o.iface;
  }
  if (!o.iface.empty() && o.gpus_per_node > 0 && !env_var(env, "NCCL_SOCKET_IFNAME"))
    exports += ",NCCL_SOCKET_IFNAME=" + o.iface;
  c.push_back("--export=" + exports);
  c.push_back(moe_train_path(o, env));
  c.insert(c.end(), o.train_args.begin(), o.train_args.end());
  return c;
}

}  // namespace

std::optional<LaunchOptions> parse_launch_options(int argc, const char* const* argv) {
  // Everything after the first `--` belongs to moe-train.
  int split = -1;
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--") == 0) {
      split = i;
      break;
    }
  const int own_argc = split < 0 ? argc : split;
  bool help = false;
  for (int i = 1; i < own_argc; ++i)
    help = help || std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0;
  require(split >= 0 || help, "expected `--` before the moe-train options (moe-launch [launch "
                              "options] -- [moe-train options])");

  LaunchOptions o;
  std::string hosts;
  po::options_description desc("Launch options");
  desc.add_options()
      ("help,h", "print this help and exit")
      ("np", po::value(&o.np), "total ranks (default: nodes x ranks per node)")
      ("nodes", po::value(&o.nodes), "nodes (default: the number of --hosts, else 1)")
      ("ranks-per-node", po::value(&o.ranks_per_node), "ranks on each node")
      ("gpus-per-node", po::value(&o.gpus_per_node), "GPUs on each node: one rank per GPU")
      ("cores-per-node", po::value(&o.cores_per_node), "cores on each node (default: this machine's)")
      ("hosts", po::value(&hosts), "comma-separated host names")
      ("hostfile", po::value(&o.hostfile), "Open MPI hostfile")
      ("network", po::value(&o.network)->default_value(o.network), "tcp | ucx, between nodes")
      ("iface", po::value(&o.iface), "network interface between nodes (e.g. eth0, mlx5_0:1)")
      ("run-dir", po::value(&o.run_dir), "directory of the per-rank logs (RUN/logs)")
      ("moe-train", po::value(&o.moe_train), "moe-train to run (default: beside moe-launch)")
      ("mpirun", po::value(&o.mpirun)->default_value(o.mpirun), "mpirun to use")
      ("dry-run", po::bool_switch(&o.dry_run), "print the command and exit")
      ("single-node-test", po::value(&o.single_node_test),
       "run N CPU ranks here with a small model and check the run is healthy");
  po::variables_map vm;
  try {
    const po::positional_options_description no_positionals;
    po::store(po::command_line_parser(own_argc, argv).options(desc).positional(no_positionals).run(),
              vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  if (vm.count("help")) {
    std::cout << kUsage << "\n" << desc << "\n";
    return std::nullopt;
  }
  for (int i = split + 1; i < argc; ++i) o.train_args.emplace_back(argv[i]);
  o.hosts = split_commas(hosts);

  require(!vm.count("np") || o.np >= 1, "--np must be at least 1");
  require(!vm.count("nodes") || o.nodes >= 1, "--nodes must be at least 1");
  require(!vm.count("ranks-per-node") || o.ranks_per_node >= 1, "--ranks-per-node must be at least 1");
  require(!vm.count("gpus-per-node") || o.gpus_per_node >= 1, "--gpus-per-node must be at least 1");
  require(!vm.count("cores-per-node") || o.cores_per_node >= 1, "--cores-per-node must be at least 1");
  require(!vm.count("single-node-test") || o.single_node_test >= 1,
          "--single-node-test must be at least 1");
  require(vm.count("hosts") == 0 || !o.hosts.empty(), "--hosts is empty");
  require(o.network == "tcp" || o.network == "ucx",
          "--network must be tcp or ucx, not \"" + o.network + "\"");
  require(o.hosts.empty() || o.hostfile.empty(), "give --hosts or --hostfile, not both");
  require(o.ranks_per_node == 0 || o.gpus_per_node == 0 || o.ranks_per_node == o.gpus_per_node,
          "--ranks-per-node and --gpus-per-node differ: one rank per GPU");
  require(o.nodes == 0 || o.hosts.empty() || o.nodes == static_cast<int>(o.hosts.size()),
          "--nodes " + std::to_string(o.nodes) + " but " + std::to_string(o.hosts.size()) +
              " --hosts");
  if (o.single_node_test > 0) {
    require(o.np == 0 && o.nodes == 0 && o.hosts.empty() && o.hostfile.empty() &&
                o.gpus_per_node == 0 && o.ranks_per_node == 0,
            "--single-node-test N runs N CPU ranks on this machine: it takes no --np, --nodes, "
            "--hosts, --hostfile, --ranks-per-node or --gpus-per-node");
  } else if (o.np > 0 && (o.nodes > 0 || !o.hosts.empty()) &&
             (o.ranks_per_node > 0 || o.gpus_per_node > 0)) {
    const int nodes = nodes_of(o);
    require(o.np == nodes * ranks_per_node_of(o, nodes),
            "--np " + std::to_string(o.np) + " is not nodes x ranks per node (" +
                std::to_string(nodes) + " x " + std::to_string(ranks_per_node_of(o, nodes)) + ")");
  }
  return o;
}

LaunchEnvironment current_launch_environment() {
  LaunchEnvironment env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string var = *e;
    const size_t eq = var.find('=');
    if (eq != std::string::npos) env.vars[var.substr(0, eq)] = var.substr(eq + 1);
  }
  env.root = geteuid() == 0;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0)
    env.cores = std::max(1, CPU_COUNT(&set));
  else
    env.cores = std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
  std::error_code error;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  if (!error) env.self_dir = self.parent_path().string();
  return env;
}

std::string moe_train_path(const LaunchOptions& o, const LaunchEnvironment& env) {
  if (!o.moe_train.empty()) return o.moe_train;
  return env.self_dir.empty() ? std::string("moe-train") : env.self_dir + "/moe-train";
}

int threads_per_rank(const LaunchOptions& o, const LaunchEnvironment& env) {
  const int cores = o.cores_per_node > 0 ? o.cores_per_node : env.cores;
  const int per_node = o.single_node_test > 0 ? o.single_node_test
                                              : ranks_per_node_of(o, nodes_of(o));
  return std::max(1, cores / std::max(1, per_node));
}

std::optional<std::string> flag_value(const std::vector<std::string>& args,
                                      const std::string& flag) {
  std::optional<std::string> value;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == flag && i + 1 < args.size()) value = args[i + 1];
    if (args[i].rfind(flag + "=", 0) == 0) value = args[i].substr(flag.size() + 1);
  }
  return value;
}

bool has_flag(const std::vector<std::string>& args, const std::string& flag) {
  for (const std::string& a : args)
    if (a == flag || a.rfind(flag + "=", 0) == 0) return true;
  return false;
}

std::vector<std::string> single_node_test_train_args(const LaunchOptions& o,
                                                     const LaunchEnvironment& env) {
  std::vector<std::string> args = o.train_args;
  // With --config the file decides: flags added here would win over it.
  const bool config = has_flag(args, "--config");
  if (!config) {
    static const char* const kModelFlags[] = {"--num-layers", "--hidden-size",
                                              "--num-attention-heads", "--ffn-hidden-size",
                                              "--num-experts", "--init-from", "--load"};
    bool model_given = false;
    for (const char* flag : kModelFlags) model_given = model_given || has_flag(args, flag);
    if (!model_given)
      args.insert(args.end(), {"--num-layers", "2", "--hidden-size", "64",
                               "--num-attention-heads", "4", "--ffn-hidden-size", "128",
                               "--num-experts", "4"});
    static const std::pair<const char*, const char*> kRunDefaults[] = {
        {"--seq-length", "32"}, {"--micro-batch-size", "4"}, {"--train-iters", "30"},
        {"--log-interval", "5"}};
    for (const auto& [flag, value] : kRunDefaults)
      if (!has_flag(args, flag)) args.insert(args.end(), {flag, value});
    if (!has_flag(args, "--data-path") && !env.default_data.empty())
      args.insert(args.end(), {"--data-path", env.default_data});
  }
  if (!has_flag(args, "--metrics-file"))
    args.insert(args.end(), {"--metrics-file", o.run_dir + "/metrics.jsonl"});
  return args;
}

std::vector<std::string> build_launch_command(const LaunchOptions& o,
                                              const LaunchEnvironment& env) {
  const bool test = o.single_node_test > 0;
  if (!test && env_var(env, "SLURM_JOB_ID")) return srun_command(o, env);

  const int np = total_ranks(o);
  const int nodes = test ? 1 : nodes_of(o);
  const bool multi_node = nodes > 1 || !o.hostfile.empty();
  require(test || nodes == 1 || !o.hosts.empty() || !o.hostfile.empty(),
          "--nodes " + std::to_string(nodes) +
              " needs --hosts or --hostfile (or a SLURM allocation)");
  require(test || o.hostfile.empty() || o.np > 0 || o.nodes > 0,
          "--hostfile needs --np, or --nodes with --ranks-per-node or --gpus-per-node");
  const int threads = threads_per_rank(o, env);

  std::vector<std::string> c = {o.mpirun};
  if (env.root) c.push_back("--allow-run-as-root");
  c.insert(c.end(), {"-np", std::to_string(np)});
  if (!o.hostfile.empty()) c.insert(c.end(), {"--hostfile", o.hostfile});
  if (!o.hosts.empty()) {
    std::string list;
    const int slots = ranks_per_node_of(o, nodes);
    for (const std::string& h : o.hosts)
    {
      if (!list.empty()) list += ',';
      list += h + ":" + std::to_string(slots);
    }
    c.insert(c.end(), {"--host", list});
  }
  // Rank placement: G ranks per node in rank order, so node n holds ranks nG..nG+G-1 and local
  // rank g drives GPU g. No core binding: each rank's OpenMP threads (OMP_NUM_THREADS, its share
  // of the node's cores) must not be squeezed onto one core.
  if (multi_node || o.gpus_per_node > 0 || o.ranks_per_node > 0)
    c.insert(c.end(), {"--map-by", "ppr:" + std::to_string(ranks_per_node_of(o, nodes)) + ":node"});
  c.insert(c.end(), {"--bind-to", "none"});
  if (test || (!multi_node && np > env.cores)) c.push_back("--oversubscribe");

  // Transport: shared memory on one node; TCP (on --iface) or UCX across nodes.
  if (!multi_node) {
    c.insert(c.end(), {"--mca", "btl", "self,vader"});
  } else if (o.network == "ucx") {
    c.insert(c.end(), {"--mca", "pml", "ucx"});
    if (!o.iface.empty()) c.insert(c.end(), {"-x", "UCX_NET_DEVICES=" + o.iface});
  } else {
    c.insert(c.end(), {"--mca", "pml", "ob1", "--mca", "btl", "self,vader,tcp"});
    if (!o.iface.empty())
      c.insert(c.end(), {"--mca", "btl_tcp_if_include", o.iface, "--mca", "oob_tcp_if_include",
                         o.iface});
  }
  if (multi_node && !o.iface.empty() && o.gpus_per_node > 0 && !env_var(env, "NCCL_SOCKET_IFNAME"))
    c.insert(c.end(), {"-x", "NCCL_SOCKET_IFNAME=" + o.iface});

  // Environment of every rank: NCCL_* and OMP_* as set here; a test always splits the cores.
  for (const std::string& name : passed_variables(env))
    if (!(test && name == "OMP_NUM_THREADS")) c.insert(c.end(), {"-x", name});
  if (test || !env_var(env, "OMP_NUM_THREADS"))
    c.insert(c.end(), {"-x", "OMP_NUM_THREADS=" + std::to_string(threads)});

  if (!o.run_dir.empty()) c.insert(c.end(), {"--output-filename", o.run_dir + "/logs"});
  c.push_back(moe_train_path(o, env));
  const std::vector<std::string> args = test ? single_node_test_train_args(o, env) : o.train_args;
  c.insert(c.end(), args.begin(), args.end());
  return c;
}

std::string shell_quote(const std::string& word) {
  static const std::regex plain("[A-Za-z0-9_@%+=:,./-]+");
  if (std::regex_match(word, plain)) return word;
  std::string quoted = "'";
  for (char ch : word) quoted += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return quoted + "'";
}

std::string shell_join(const std::vector<std::string>& words) {
  std::string line;
  for (const std::string& w : words) {
    if (!line.empty()) line += ' ';
    line += shell_quote(w);
  }
  return line;
}

LossTrend loss_trend(const std::string& metrics_jsonl, int window) {
  std::vector<double> losses;
  std::istringstream in(metrics_jsonl);
  int number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json object;
    try {
      object = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw RuntimeError("metrics line " + std::to_string(number) + " is not JSON");
    }
    if (object.contains("lm_loss") && object["lm_loss"].is_number())
      losses.push_back(object["lm_loss"].get<double>());
  }
  if (losses.size() < 2)
    throw RuntimeError("the metrics file has " + std::to_string(losses.size()) +
                       " training iterations; at least 2 are needed to see the loss go down");
  const size_t k = std::min<size_t>(static_cast<size_t>(std::max(1, window)), losses.size() / 2);
  LossTrend t;
  t.iterations = static_cast<int>(losses.size());
  for (size_t i = 0; i < k; ++i) {
    t.first += losses[i] / static_cast<double>(k);
    t.last += losses[losses.size() - k + i] / static_cast<double>(k);
  }
  return t;
}

int rank_named_by_mpirun(const std::string& mpirun_output) {
  static const std::regex notice("process rank ([0-9]+)");
  std::smatch m;
  if (std::regex_search(mpirun_output, m, notice)) return std::stoi(m[1].str());
  return -1;
}

std::string last_lines(const std::string& text, int n) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  std::string out;
  const size_t start = lines.size() > static_cast<size_t>(n) ? lines.size() - n : 0;
  for (size_t i = start; i < lines.size(); ++i) out += lines[i] + "\n";
  return out;
}

}  // namespace moe
