// SIGTERM and SIGINT as a request to stop cleanly: the handler only records the signal; the
// trainer looks at it at the next iteration boundary, agrees on it with every rank (one rank
// may be the only one signalled, by a scheduler's preemption or a person), saves a checkpoint
// and exits 0. A second SIGINT gets the default action, so Ctrl-C twice still kills.
#pragma once

namespace moe {

void install_stop_signal_handlers();

// The signal number received so far on this process, or 0.
int received_stop_signal();

// "SIGTERM", "SIGINT" or "signal N".
const char* stop_signal_name(int signal_number);

}  // namespace moe
