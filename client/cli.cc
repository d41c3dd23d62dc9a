#include "client/cli.h"

#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "client/report_html.h"

namespace pare::cli {

bool g_json = false;

int ExitFor(const Status& s) {
  if (s.ok()) return kExitOk;
  if (s.code() == Code::kUnavailable || s.code() == Code::kDeadlineExceeded) return kExitUnreachable;
  return kExitRejected;
}

int Fail(const Status& s, const std::string& what) {
  std::cerr << "pare: " << what << ": " << CodeName(s.code()) << ": " << s.message() << "\n";
  if (s.code() == Code::kUnavailable && s.message().find("job database") == std::string::npos)
    std::cerr << "pare: is pare-server running? (--server or $PARE_SERVER)\n";
  return ExitFor(s);
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

Status ParseShape(const std::string& text, std::vector<int64_t>* out) {
  out->clear();
  if (text.empty()) return Status::Ok();
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, ',')) {
    try {
      size_t used = 0;
      long long v = std::stoll(part, &used);
      if (used != part.size() || v <= 0) throw std::invalid_argument(part);
      out->push_back(v);
    } catch (const std::exception&) {
      return InvalidArgument("--input-shape must be positive integers separated by commas, e.g. 1,3,224,224");
    }
  }
  return Status::Ok();
}

Status ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return InvalidArgument("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return Status::Ok();
}

// Renders a report's JSON `text` as HTML into `path` (the folder must exist).
Status WriteReportHtml(const std::string& text, const std::string& title, const std::string& path) {
  nlohmann::json report;
  try {
    report = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return InvalidArgument("the report is not JSON (" + std::string(e.what()) + ")");
  }
  if (!report.is_object() || !report.contains("steps")) {
    return InvalidArgument("the JSON has no 'steps': it is not a Pare report");
  }
  if (!report["steps"].is_array()) return InvalidArgument("the report's 'steps' is not a list");
  std::string html;
  try {
    html = client::ReportHtml(report, title);
  } catch (const nlohmann::json::exception& e) {
    return InvalidArgument("the report's JSON does not have the types a Pare report has (" +
                           std::string(e.what()) + ")");
  }
  std::ofstream out(path, std::ios::binary);
  out << html;
  out.close();
  if (!out) return InvalidArgument("cannot write " + path);
  return Status::Ok();
}

const std::string& StateName(v1::JobState s) { return v1::JobState_Name(s); }

ProgressView::ProgressView() : tty_(::isatty(STDERR_FILENO)) {}

void ProgressView::Update(const v1::Job& j) {
  const auto& p = j.progress();
  std::ostringstream line;
  line << j.id() << " " << StateName(j.state());
  if (j.state() == pare::v1::RUNNING) {
    int width = 30, filled = static_cast<int>(p.fraction() * width + 0.5);
    if (tty_) line << " [" << std::string(filled, '#') << std::string(width - filled, '.') << "]";
    line << " " << std::setw(3) << static_cast<int>(p.fraction() * 100) << "%";
    if (!p.step().empty()) line << " step " << p.step_index() << "/" << p.step_count() << " " << p.step();
    if (!p.message().empty()) line << ": " << p.message();
  }
  if (j.attempts() > 1) line << " (attempt " << j.attempts() << ")";
  std::string text = line.str();
  if (tty_) {
    std::cerr << "\r" << text << std::string(last_len_ > text.size() ? last_len_ - text.size() : 0, ' ')
              << std::flush;
    last_len_ = text.size();
  } else {
    // Logs get a line when the state or step changes, else at most one every 5 s.
    std::string key = StateName(j.state()) + std::string(" ") + p.step();
    auto now = std::chrono::steady_clock::now();
    if (key != last_key_ || now - last_print_ > std::chrono::seconds(5)) {
      std::cerr << text << "\n";
      last_key_ = key;
      last_print_ = now;
    }
  }
  last_ = text;
}

void ProgressView::Done() {
  if (tty_ && last_len_) std::cerr << "\n";
}

}  // namespace pare::cli
