// Helpers for the service tests: fixture paths, temporary folders, and a real pare-server
// process that can be killed with SIGKILL and started again on the same data.
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace pare::testing {

inline std::string Fixture(const std::string& name) {
  const char* dir = std::getenv("PARE_FIXTURES");
  return std::string(dir ? dir : "fixtures") + "/" + name;
}

inline std::string BinDir() {
  const char* dir = std::getenv("PARE_BIN_DIR");
  return dir ? dir : ".";
}

inline std::string Python() {
  const char* p = std::getenv("PARE_PYTHON");
  return p ? p : "/usr/bin/python3";
}

// A fresh folder, removed when the object goes.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "pare-test-XXXXXX").string();
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    path_ = ::mkdtemp(buf.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Regular files below `dir` (0 when it does not exist).
inline size_t CountFiles(const std::string& dir) {
  size_t n = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir, ec)) n += e.is_regular_file();
  return n;
}

// Polls `pred` until it holds or `seconds` pass (for conditions with no event to wait on).
inline bool Eventually(const std::function<bool()>& pred, double seconds) {
  auto end =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return pred();
}

// Runs a command, returns its exit code and (optionally) its stdout.
inline int Run(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  int status = ::pclose(p);
  if (out) *out = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// pare-server as its own process, on port 0, with its stdout read for the address.
class ServerProcess {
 public:
  // `launcher`: run the server through this program (e.g. a script setting limits); empty: directly.
  ServerProcess(std::string data_dir, std::vector<std::string> extra, std::string launcher = "")
      : data_dir_(std::move(data_dir)), extra_(std::move(extra)), launcher_(std::move(launcher)) {}
  ~ServerProcess() { Kill(); }

  // An environment variable for the server and what it starts (its workers and their jobs).
  void SetEnv(std::string name, std::string value) { env_.emplace_back(std::move(name), std::move(value)); }

  // Starts and returns the address, or "" if it did not come up within 30 s.
  std::string Start() {
    int fds[2];
    if (::pipe(fds) != 0) return "";
    std::vector<std::string> args = {BinDir() + "/server/pare-server",
                                     "--listen",
                                     "127.0.0.1:0",
                                     "--metrics-listen",
                                     "127.0.0.1:0",
                                     "--data-dir",
                                     data_dir_};
    args.insert(args.end(), extra_.begin(), extra_.end());
    if (!launcher_.empty()) args.insert(args.begin(), launcher_);
    pid_ = ::fork();
    if (pid_ == 0) {
      for (const auto& [name, value] : env_) ::setenv(name.c_str(), value.c_str(), 1);
      ::dup2(fds[1], 1);
      ::close(fds[0]);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    std::string line;
    // A server that never prints (or prints no whole line) fails the start in 30 s: every
    // read waits only as long as is left.
    auto end = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    char c;
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      pollfd p{fds[0], POLLIN, 0};
      if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
      if (::read(fds[0], &c, 1) != 1 || c == '\n') break;
      line.push_back(c);
    }
    ::close(fds[0]);
    auto at = line.find("listening on ");
    if (at == std::string::npos) return "";
    std::string rest = line.substr(at + 13);
    address_ = rest.substr(0, rest.find(' '));
    return address_;
  }

  void Kill(int sig = SIGKILL) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  // SIGTERM and wait for the exit; returns the exit status.
  int Terminate() {
    if (pid_ <= 0) return -1;
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }
  pid_t pid() const { return pid_; }
  const std::string& address() const { return address_; }

 private:
  std::string data_dir_;
  std::vector<std::string> extra_;
  std::vector<std::pair<std::string, std::string>> env_;
  std::string launcher_;
  pid_t pid_ = -1;
  std::string address_;
};

}  // namespace pare::testing
