#include "dist/watchdog.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <thread>

namespace moe {
namespace {

using Clock = std::chrono::steady_clock;

// What the main thread is blocked in, published for the watchdog thread.
std::atomic<const char*> watched_operation{nullptr};
std::atomic<int64_t> watched_since_ns{0};
std::atomic<double> watched_allowance{1.0};  // the timeout factor of the watched operation
thread_local int nesting = 0;
thread_local double allowance = 1.0;

std::atomic<int64_t> timeout_ns{0};
std::mutex start_mutex;
bool thread_started = false;
std::string program_name;
int rank_for_messages = 0;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

void watch_forever() {
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const char* operation = watched_operation.load();
    const int64_t since = watched_since_ns.load();
    const int64_t limit = static_cast<int64_t>(timeout_ns.load() * watched_allowance.load());
    if (operation == nullptr || since == 0 || limit <= 0) continue;
    const int64_t waited = now_ns() - since;
    if (waited < limit || watched_operation.load() != operation ||
        watched_since_ns.load() != since)
      continue;
    std::fprintf(stderr,
                 "%s: rank %d: error: %s did not finish within %.0f s (--distributed-timeout): "
                 "another rank died or stopped answering\n",
                 program_name.c_str(), rank_for_messages, operation, limit / 1e9);
    std::fflush(stderr);
    std::fflush(stdout);
    _exit(1);
  }
}

}  // namespace

void start_collective_watchdog(double timeout_seconds, const std::string& program,
                               int world_rank) {
  std::lock_guard<std::mutex> lock(start_mutex);
  timeout_ns.store(static_cast<int64_t>(timeout_seconds * 1e9));
  if (thread_started) return;
  program_name = program;
  rank_for_messages = world_rank;
  std::thread(watch_forever).detach();
  thread_started = true;
}

WatchedCollective::WatchedCollective(const char* operation) {
  if (nesting++ > 0) return;
  watched_allowance.store(allowance);
  watched_since_ns.store(now_ns());
  watched_operation.store(operation);
}

WatchedCollective::~WatchedCollective() {
  if (--nesting > 0) return;
  watched_operation.store(nullptr);
  watched_since_ns.store(0);
}

WatchdogAllowance::WatchdogAllowance(double factor) : previous_(allowance) { allowance = factor; }

WatchdogAllowance::~WatchdogAllowance() { allowance = previous_; }

}  // namespace moe
