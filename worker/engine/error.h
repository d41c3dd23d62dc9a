// The one exception type the engine throws across its boundary: a gRPC-style code,
// a machine-readable reason and a message a person can act on.
#pragma once

#include <stdexcept>
#include <string>

#include "common/status.h"

namespace pare::engine {

// Reasons that code elsewhere tells apart (the rest are only reported).
inline constexpr char kReasonBadRecipe[] = "BAD_RECIPE";
inline constexpr char kReasonQuantizeUnsupported[] = "QUANTIZE_UNSUPPORTED";
inline constexpr char kReasonGoalUnreachable[] = "GOAL_UNREACHABLE";

class EngineError : public std::runtime_error {
 public:
  EngineError(Code code, std::string reason, const std::string& message)
      : std::runtime_error(message), code_(code), reason_(std::move(reason)) {}
  Code code() const { return code_; }
  const std::string& reason() const { return reason_; }

 private:
  Code code_;
  std::string reason_;
};

// Thrown when the caller asked the engine to stop.
class Cancelled : public std::runtime_error {
 public:
  Cancelled() : std::runtime_error("cancelled") {}
};

}  // namespace pare::engine
