#include "launcher/stop_signal.h"

#include <csignal>
#include <cstdio>

namespace moe {
namespace {

volatile std::sig_atomic_t received = 0;

extern "C" void record_stop_signal(int signal_number) {
  received = signal_number;
  // Only the first request is a clean stop; the next one of the same kind acts at once.
  std::signal(signal_number, SIG_DFL);
}

}  // namespace

void install_stop_signal_handlers() {
  std::signal(SIGTERM, record_stop_signal);
  std::signal(SIGINT, record_stop_signal);
}

int received_stop_signal() { return received; }

const char* stop_signal_name(int signal_number) {
  switch (signal_number) {
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    default: {
      static char text[32];
      std::snprintf(text, sizeof text, "signal %d", signal_number);
      return text;
    }
  }
}

}  // namespace moe
