// Runs the project's executables as child processes for tests (test_cli, test_launch): stdout,
// stderr and the exit status captured separately, a timeout that kills the whole process group,
// and an environment without this (singleton MPI) test process's launcher variables.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <string>
#include <vector>

extern char** environ;

namespace moe::testing {

// The environment children get. Taken at static initialization, before main() calls MPI_Init:
// a singleton MPI process adds PMIx/ORTE variables to its own environment, and a child that
// inherited them would try to join this process's job instead of starting its own.
inline const std::vector<std::string>& child_environment() {
  static const std::vector<std::string> snapshot = [] {
    std::vector<std::string> vars;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string var = *e;
      bool launcher_var = false;
      for (const char* prefix : {"OMPI_", "PMIX_", "ORTE_", "PMI_"})
        launcher_var = launcher_var || var.rfind(prefix, 0) == 0;
      if (!launcher_var) vars.push_back(var);
    }
    // Each child is its own one-rank job with its own orted. (Isolated singletons start faster
    // but all share the session directory of job family 0, and children started together race
    // on creating it: "mkdir ... File exists".)
    return vars;
  }();
  return snapshot;
}
inline const bool kEnvironmentTaken = !child_environment().empty();

struct Result {
  std::string command;  // for messages
  std::string out, err;
  int status = -1;      // exit status when it exited
  int signal = 0;       // the signal that ended it, if one did
  bool timed_out = false;
  bool spawned = false;
};

inline std::ostream& operator<<(std::ostream& os, const Result& r) {
  os << "\n  command: " << r.command << "\n  status: " << r.status;
  if (r.signal) os << " (killed by signal " << r.signal << ")";
  if (r.timed_out) os << " (timed out)";
  return os << "\n  stdout: " << r.out.substr(0, 2000) << "\n  stderr: " << r.err.substr(0, 2000);
}

// Runs `argv` with stdin from /dev/null, capturing stdout and stderr; kills its process group
// after `timeout_seconds`. Thread-safe: pipes are close-on-exec, so children started at the same
// time from other threads do not hold each other's pipes open.
inline Result run(const std::vector<std::string>& argv, double timeout_seconds = 30.0) {
  Result r;
  for (const std::string& a : argv) r.command += (r.command.empty() ? "" : " ") + a;

  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0) return r;
  if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    close(out_pipe[0]);
    close(out_pipe[1]);
    return r;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], 1);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], 2);
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attributes, 0);  // its own group, so a timeout kills all of it

  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const std::vector<std::string>& env = child_environment();
  std::vector<char*> envp;
  for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  pid_t pid = -1;
  const int spawn_error =
      posix_spawn(&pid, args[0], &actions, &attributes, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (spawn_error != 0) {
    close(out_pipe[0]);
    close(err_pipe[0]);
    r.err = "posix_spawn failed: " + std::string(std::strerror(spawn_error));
    return r;
  }
  r.spawned = true;

  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_seconds);
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&r.out, &r.err};
  int open_fds = 2;
  while (open_fds > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      r.timed_out = true;
      kill(-pid, SIGKILL);
      break;
    }
    if (poll(fds, 2, static_cast<int>(std::min<int64_t>(left.count(), 200))) < 0 && errno != EINTR)
      break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buffer[4096];
      const ssize_t n = read(fds[i].fd, buffer, sizeof buffer);
      if (n > 0) {
        sinks[i]->append(buffer, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (pollfd& fd : fds)
    if (fd.fd >= 0) close(fd.fd);
  int wait_status = 0;
  while (waitpid(pid, &wait_status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(wait_status)) r.status = WEXITSTATUS(wait_status);
  if (WIFSIGNALED(wait_status)) r.signal = WTERMSIG(wait_status);
  return r;
}

}  // namespace moe::testing
