// The collective watchdog: a collective that does not finish within --distributed-timeout
// seconds (a peer rank was killed, hangs, or its machine went away) ends this process with one
// line naming the operation and this rank, instead of a silent hang. The launcher (mpirun)
// then takes the rest of the job down.
//
// A blocked MPI call cannot be interrupted from outside, so the check runs on its own thread,
// which ends the process with _exit(1): no destructor or MPI call can hang on the way out.
#pragma once

#include <string>

namespace moe {

// Starts the watchdog thread (once per process; a second call changes the timeout).
// `program` and `world_rank` go into the message.
void start_collective_watchdog(double timeout_seconds, const std::string& program, int world_rank);

// Marks one blocking collective for the watchdog while it runs. Nested scopes count as one
// (the outermost operation is named). Costs two atomic stores when the watchdog is off.
class WatchedCollective {
 public:
  explicit WatchedCollective(const char* operation);
  ~WatchedCollective();
  WatchedCollective(const WatchedCollective&) = delete;
  WatchedCollective& operator=(const WatchedCollective&) = delete;
};

// While one lives, collectives on this thread may take `factor` times the timeout: the ones
// that wait for other ranks' file I/O (checkpoints), which a slow file system stretches.
class WatchdogAllowance {
 public:
  explicit WatchdogAllowance(double factor);
  ~WatchdogAllowance();
  WatchdogAllowance(const WatchdogAllowance&) = delete;
  WatchdogAllowance& operator=(const WatchdogAllowance&) = delete;

 private:
  double previous_;
};

}  // namespace moe
