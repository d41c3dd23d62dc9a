// `pare compress`: a recipe run offline by the same engine the workers run, without a server.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace pare::cli {

// `pare compress`: what its command line gave.
struct CompressArgs {
  std::string model, recipe, out, report, report_html;
  std::string calibration, train, eval, format = "tensors";
  std::vector<std::string> shapes;  // one --input-shape per input of forward
  std::string device = "auto";
  int threads = 0;
  double latency_budget = 0.5;
  std::vector<int> latency_batches;
  std::string latency_cache;              // empty: the original is timed every time
  std::vector<std::string> extra_models;  // ID=FILE
};

// Declares the verb and its options on `app`, filling `ca`.
CLI::App* AddCompressVerb(CLI::App& app, CompressArgs& ca);

// Runs it; the exit code.
int Compress(const CompressArgs& a);

}  // namespace pare::cli
