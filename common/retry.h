// How long a client of Pare's (the CLI, a worker) waits before trying a failed call again: one
// policy for every retry loop. Exponential from `first`, capped at `cap`; `attempt` counts the
// retries from 1.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace pare {

inline std::chrono::milliseconds RetryDelay(int attempt, std::chrono::milliseconds first,
                                            std::chrono::milliseconds cap) {
  const int doublings = std::clamp(attempt - 1, 0, 20);
  return std::min(cap, std::chrono::milliseconds(first.count() * (int64_t{1} << doublings)));
}

}  // namespace pare
