// What the `pare` CLI's verbs share: exit codes, --json, error printing, the progress line,
// input-shape parsing, file reading and the HTML report file.
#pragma once

#include <google/protobuf/message.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "pare/v1/compression.pb.h"

namespace pare::cli {

// 0 success, 1 job FAILED/CANCELLED, 2 usage, 3 server unreachable or deadline exceeded, 4 rejected.
constexpr int kExitOk = 0, kExitJobFailed = 1, kExitUsage = 2, kExitUnreachable = 3, kExitRejected = 4;

extern bool g_json;  // --json: machine-readable output on stdout

int ExitFor(const Status& s);
// Prints "pare: WHAT: CODE: message" (and a hint when the server is unreachable); the exit code.
int Fail(const Status& s, const std::string& what);
std::string ToJson(const google::protobuf::Message& m);
// "1,3,224,224" -> dims; empty text -> none.
Status ParseShape(const std::string& text, std::vector<int64_t>* out);
Status ReadFile(const std::string& path, std::string* out);
// Renders a report's JSON `text` as HTML into `path` (the folder must exist).
Status WriteReportHtml(const std::string& text, const std::string& title, const std::string& path);
const std::string& StateName(v1::JobState s);

// Progress on a terminal: one rewritten line; otherwise a line per change.
class ProgressView {
 public:
  ProgressView();
  void Update(const v1::Job& j);
  void Done();

 private:
  bool tty_;
  size_t last_len_ = 0;
  std::string last_;
  std::string last_key_;
  std::chrono::steady_clock::time_point last_print_;
};

}  // namespace pare::cli
