// Command-line checks shared by the binaries (CLI11 validators).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace pare {

// A number in [lo, hi]: text that is not a number says so, and NaN is refused (CLI::Range lets
// it through, since every comparison with NaN is false).
inline CLI::Validator NumberIn(double lo, double hi) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g to %g", lo, hi);
  const std::string range = buf;
  return CLI::Validator(
      [lo, hi, range](std::string& text) -> std::string {
        double v = 0;
        size_t used = 0;
        try {
          v = std::stod(text, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used == 0 || used != text.size()) return "'" + text + "' is not a number";
        if (!(v >= lo && v <= hi)) return "'" + text + "' is not in " + range;
        return std::string();
      },
      "NUMBER in " + range);
}

// What is wrong with `--latency-batches` (empty when nothing): each batch size in 1..4096, none
// given twice (it would be timed, and reported, twice).
inline std::string LatencyBatchesProblem(const std::vector<int>& sizes) {
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::string b = std::to_string(sizes[i]);
    if (sizes[i] < 1 || sizes[i] > 4096) return "--latency-batches: batch size " + b + " is not in 1..4096";
    for (size_t j = 0; j < i; ++j)
      if (sizes[j] == sizes[i]) return "--latency-batches: batch size " + b + " is given twice";
  }
  return "";
}

}  // namespace pare
