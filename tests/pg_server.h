// A throwaway PostgreSQL server for tests: a fresh cluster in a temporary folder on a free port, which a
// test can stop, restart and SIGKILL, and which is removed when the object goes (or the test process dies).
#pragma once

#include <fcntl.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace pare::testing {

class PgServer {
 public:
  // A new cluster (user "pare", trust auth, database "pare") on 127.0.0.1 and a unix socket in its folder;
  // nullptr and the reason in *why when it cannot be had.
  static std::unique_ptr<PgServer> Start(std::string* why) {
    std::unique_ptr<PgServer> server(new PgServer());
    std::string error = server->Init();
    if (error.empty()) return server;
    if (why) *why = error;
    return nullptr;  // The destructor has stopped whatever had started and removed the folder.
  }

  ~PgServer() {
    if (watch_fd_ >= 0) ::close(watch_fd_);
    if (watchdog_ > 0) {
      Wait(watchdog_);  // It sees the end of its stdin, stops the server and removes the folder.
    } else if (!root_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(root_, ec);
    }
  }
  PgServer(const PgServer&) = delete;
  PgServer& operator=(const PgServer&) = delete;

  std::string url(const std::string& db = "pare") const {
    return "postgresql://pare@127.0.0.1:" + std::to_string(port_) + "/" + db;
  }
  int port() const { return port_; }

  // A new empty database owned by "pare" (one per test keeps tests apart on one server).
  bool CreateDatabase(const std::string& name) {
    return Run(Cmd("createdb", {"-h", "127.0.0.1", "-p", std::to_string(port_), "-U", "pare", name},
                   false)) == 0;
  }

  // Runs one SQL statement on database `db` (psql); whether it succeeded.
  bool Sql(const std::string& db, const std::string& sql) {
    return Run(Cmd("psql",
                   {"-h", "127.0.0.1", "-p", std::to_string(port_), "-U", "pare", "-d", db, "-v",
                    "ON_ERROR_STOP=1", "-qAtc", sql},
                   false)) == 0;
  }

  // A clean shutdown that keeps the data (clients see their connections closed).
  bool Stop() { return Run(Cmd("pg_ctl", {"-D", data_, "-w", "-t", "30", "stop", "-m", "fast"})) == 0; }

  // Starts on the same port and data; returns once it accepts connections (after crash recovery, if any).
  bool Restart() {
    return Run(Cmd("pg_ctl", {"-D", data_, "-l", root_ + "/server.log", "-w", "-t", "30", "-o",
                              "-p " + std::to_string(port_), "start"})) == 0;
  }

  // A crash: SIGKILL to the postmaster and its backends, so no shutdown checkpoint and no goodbye to clients.
  bool Kill9() {
    pid_t pid = 0;
    std::ifstream(data_ + "/postmaster.pid") >> pid;
    // Stopped, the postmaster can neither fork nor reap while we list its children.
    if (pid <= 0 || ::kill(pid, SIGSTOP) != 0) return false;
    // Each backend is its own session leader, so there is no process group to kill. A backend left to
    // notice its postmaster's death on its own (busy ones take a while) keeps the shared memory attached,
    // and the next start refuses with "pre-existing shared memory block is still in use".
    std::vector<pid_t> victims = {pid};
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
      pid_t child = std::atoi(e.path().filename().c_str()), parent = 0;
      if (child > 0 && State(child, &parent) != 0 && parent == pid) victims.push_back(child);
    }
    for (pid_t p : victims) ::kill(p, SIGKILL);
    auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (pid_t p : victims) {
      for (char s = State(p); s != 0 && s != 'Z'; s = State(p)) {
        if (std::chrono::steady_clock::now() > end) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    }
    // Orphans may go unreaped for a while (some containers' init never reaps). PostgreSQL takes a lock
    // file's pid that still answers kill(pid, 0) for a live server, so a zombie postmaster would block
    // Restart(); a crashed host's stale lock files name no process, which is what this leaves.
    ::unlink((data_ + "/postmaster.pid").c_str());
    ::unlink((root_ + "/.s.PGSQL." + std::to_string(port_) + ".lock").c_str());
    return true;
  }

 private:
  PgServer() = default;

  std::string Init() {
    namespace fs = std::filesystem;
    bin_ = FindBinDir();
    for (const char* tool : {"initdb", "pg_ctl", "postgres", "createdb"}) {
      if (::access((bin_ + "/" + tool).c_str(), X_OK) == 0) continue;
      return std::string(tool) + " not found in " +
             (bin_.empty() ? "/usr/lib/postgresql/*/bin (nor by PARE_PG_BIN or pg_config --bindir)" : bin_);
    }
    const passwd* pw = nullptr;
    if (::geteuid() == 0) {  // PostgreSQL refuses to run as root, and CI runs as root.
      if (!(pw = ::getpwnam("postgres")) && !(pw = ::getpwnam("nobody"))) {
        return "running as root, and there is neither a postgres nor a nobody user to run PostgreSQL as";
      }
      user_ = pw->pw_name;
      runuser_ = ::access("/usr/sbin/runuser", X_OK) == 0 ? "/usr/sbin/runuser" : "/sbin/runuser";
      if (::access(runuser_.c_str(), X_OK) != 0) return "running as root, and runuser is not installed";
    }
    std::error_code ec;
    fs::path base = fs::absolute(fs::temp_directory_path(ec), ec);
    // The socket's path must fit in sockaddr_un (108 bytes), and as root the server's user must be able to
    // walk down to the folder, which a $TMPDIR under /root would not let it.
    if (ec || base.string().size() > 70 || (pw && !OthersCanEnter(base))) base = "/tmp";
    std::string tmpl = (base / "pare-pg-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) return "mkdtemp in " + base.string() + ": " + std::strerror(errno);
    root_ = tmpl;
    data_ = root_ + "/data";
    log_ = root_ + "/pg.log";
    ::chmod(root_.c_str(), 0755);  // Holds the socket, so any local user may enter; initdb makes data 0700.
    if (pw && ::chown(root_.c_str(), pw->pw_uid, pw->pw_gid) != 0) {
      return "chown " + root_ + " to " + user_ + ": " + std::strerror(errno);
    }
    if (!StartWatchdog()) return std::string("cannot start the cleanup process: ") + std::strerror(errno);
    if (Run(Cmd("initdb", {"-D", data_, "-A", "trust", "-U", "pare", "-E", "UTF8", "--locale=C", "-N"}))) {
      return "initdb failed:\n" + Tail();  // -N: no fsync, a throwaway cluster need not survive power loss.
    }
    std::string socket_dir;  // Quoted for postgresql.conf, where ' and \ are special.
    for (char c : root_) socket_dir.append(c == '\'' || c == '\\' ? 2 : 1, c);
    std::ofstream(data_ + "/postgresql.conf", std::ios::app)
        << "listen_addresses = '127.0.0.1'\nunix_socket_directories = '" << socket_dir << "'\n"
        << "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        << "max_connections = 200\nshared_buffers = 16MB\n";
    // The port is free when probed but may be taken before the server binds it; a new one then does.
    for (int attempt = 1; !((port_ = FreePort()) > 0 && Restart()); ++attempt) {
      if (attempt == 3 || Tail().find("already in use") == std::string::npos) {
        return "the server did not start:\n" + Tail();
      }
    }
    if (Run(Cmd("createdb", {"-h", "127.0.0.1", "-p", std::to_string(port_), "-U", "pare", "pare"}, false))) {
      return "createdb failed:\n" + Tail();
    }
    return "";
  }

  static std::string FindBinDir() {
    if (const char* dir = std::getenv("PARE_PG_BIN")) return dir;
    std::error_code ec;
    int best = -1;
    std::string found;
    for (const auto& e : std::filesystem::directory_iterator("/usr/lib/postgresql", ec)) {  // Debian, Ubuntu.
      int version = std::atoi(e.path().filename().c_str());
      if (version <= best || ::access((e.path() / "bin/initdb").c_str(), X_OK) != 0) continue;
      best = version;
      found = (e.path() / "bin").string();
    }
    if (!found.empty()) return found;
    // Elsewhere the server's tools sit where pg_config says (when the -dev package is installed).
    if (FILE* p = ::popen("pg_config --bindir 2>/dev/null", "r")) {
      char buf[4096];
      if (std::fgets(buf, sizeof buf, p)) found = buf;
      ::pclose(p);
    }
    while (!found.empty() && std::isspace(static_cast<unsigned char>(found.back()))) found.pop_back();
    return found;
  }

  static bool OthersCanEnter(std::filesystem::path dir) {
    for (;; dir = dir.parent_path()) {
      struct stat st;
      if (::stat(dir.c_str(), &st) != 0 || !(st.st_mode & S_IXOTH)) return false;
      if (dir == dir.parent_path()) return true;
    }
  }

  static int FreePort() {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    bool ok = fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
              ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
    if (fd >= 0) ::close(fd);
    return ok ? ntohs(addr.sin_port) : -1;
  }

  static std::string Slurp(const std::string& path) {
    std::ifstream in(path);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }

  // The process state letter from /proc (R, S, Z...) and its parent; 0 when there is no such process.
  static char State(pid_t pid, pid_t* parent = nullptr) {
    std::string stat = Slurp("/proc/" + std::to_string(pid) + "/stat");
    size_t paren = stat.rfind(')');  // The command name before it may hold anything, even ") ".
    if (paren == std::string::npos || paren + 4 >= stat.size()) return 0;
    if (parent) *parent = std::atoi(stat.c_str() + paren + 4);
    return stat[paren + 2];
  }

  // A tool from the bin dir, through runuser when we are root.
  std::vector<std::string> Cmd(const char* tool, std::vector<std::string> args, bool as_user = true) const {
    std::vector<std::string> argv;
    if (as_user && !user_.empty()) argv = {runuser_, "-u", user_, "--"};
    argv.push_back(bin_ + "/" + tool);
    argv.insert(argv.end(), args.begin(), args.end());
    return argv;
  }

  // Everything is prepared before fork: a threaded test may only make async-signal-safe calls in the child.
  pid_t Spawn(std::vector<std::string> argv, int in, int out, bool new_session) const {
    std::vector<char*> args, env;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    // The caller's PGPORT, PGDATA, PGOPTIONS... would point our tools at another server or change it.
    for (char** e = environ; *e; ++e) {
      if (std::strncmp(*e, "PG", 2) != 0) env.push_back(*e);
    }
    env.push_back(nullptr);
    const int max_fd = static_cast<int>(std::min(::sysconf(_SC_OPEN_MAX), 65536L));
    pid_t pid = ::fork();
    if (pid != 0) return pid;
    if (new_session) ::setsid();
    ::dup2(in, 0);
    ::dup2(out, 1);
    ::dup2(out, 2);
    // The postmaster outlives us: any socket or pipe of the test it inherited would stay open with it.
#ifdef SYS_close_range
    if (::syscall(SYS_close_range, 3U, ~0U, 0U) != 0)
#endif
      for (int fd = 3; fd < max_fd; ++fd) ::close(fd);
    if (::chdir(root_.c_str()) != 0) ::_exit(126);  // Our cwd may be closed to the server's user (/root).
    ::execve(args[0], args.data(), env.data());
    ::_exit(127);
  }

  // Runs argv with its output added to the log; returns the exit code.
  int Run(const std::vector<std::string>& argv) const {
    std::string line = "$";
    for (const auto& a : argv) line += " " + a;
    std::ofstream(log_, std::ios::app) << line << "\n";
    int in = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    int out = ::open(log_.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    pid_t pid = Spawn(argv, in, out, false);
    ::close(in);
    ::close(out);
    return Wait(pid);
  }

  static int Wait(pid_t pid) {
    int status = 0;
    if (pid <= 0) return -1;
    while (::waitpid(pid, &status, 0) < 0) {
      if (errno != EINTR) return -1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  // The destructor does not run when a test crashes or is interrupted, and the postmaster, a daemon, would
  // outlive it. This shell holds the read end of a pipe only we write to; when we are gone it stops the
  // server and removes the folder. Its own session keeps it out of reach of the terminal's Ctrl-C.
  bool StartWatchdog() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return false;
    watch_fd_ = fds[1];
    std::vector<std::string> argv = {"/bin/sh", "-c", "cat >/dev/null; r=$1; shift; \"$@\"; rm -rf \"$r\"",
                                     "pare-pg-cleanup", root_};
    for (auto& a : Cmd("pg_ctl", {"-D", data_, "-w", "stop", "-m", "immediate"})) argv.push_back(a);
    int out = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    watchdog_ = Spawn(argv, fds[0], out, true);
    ::close(fds[0]);
    ::close(out);
    return watchdog_ > 0;
  }

  // The last lines of our tools' output and of the server's log, for *why.
  std::string Tail() const {
    std::string text;
    for (const std::string& path : {log_, root_ + "/server.log"}) {
      std::string all = Slurp(path);
      size_t at = all.size();
      for (int n = 0; n < 13 && at > 0 && at != std::string::npos; ++n) at = all.rfind('\n', at - 1);
      text += all.substr(at == std::string::npos ? 0 : at + 1);
    }
    return text;
  }

  std::string bin_, user_, runuser_, root_, data_, log_;
  int port_ = -1;
  pid_t watchdog_ = -1;
  int watch_fd_ = -1;
};

}  // namespace pare::testing
