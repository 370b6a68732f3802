#include "tools/process_launcher.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <fstream>
#include <iomanip>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "sim/fake_process_group.h"
#include "tools/format_util.h"

extern char** environ;

namespace fsdpsim {

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kTailLines = 50;
// Lines longer than this are cut, so a child that never prints a newline
// cannot grow the launcher's memory without bound.
constexpr size_t kMaxLineBytes = 64 * 1024;
constexpr std::chrono::milliseconds kKillGrace{2000};
// After the last child exited, how long a grandchild may keep a pipe open.
constexpr std::chrono::milliseconds kPipeDrainGrace{1000};

std::string errno_string(int error) { return std::strerror(error); }

// Whether `pid` is stopped by a signal or a tracer: state T or t in
// /proc/PID/stat (the field after the command name in parentheses).
bool process_is_stopped(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  std::getline(stat, text);
  const size_t paren = text.rfind(')');
  if (paren == std::string::npos || paren + 2 >= text.size()) return false;
  const char state = text[paren + 2];
  return state == 'T' || state == 't';
}

struct Child {
  int rank = 0;
  pid_t pid = -1;
  int fd = -1;  // read end of the child's merged stdout/stderr
  bool running = false;
  bool signalled = false;  // the launcher sent it SIGTERM or SIGKILL
  // Order in which the launcher first saw this child end (its pipe reached
  // EOF or it was reaped); 0 = not yet. Ranks reaped in the same poll round
  // are ordered by it, so the rank that died first is blamed, not the one
  // that died of its death.
  uint64_t end_order = 0;
  std::string partial;  // output after the last newline
  std::deque<std::string> tail;
  ProcessOutcome outcome;
};

class Launch {
 public:
  explicit Launch(const LaunchOptions& options) : options_(options) {}

  LaunchResult run() {
    start_ = Clock::now();
    result_.grace = options_.timeout;
    result_.master_port = options_.master_port != 0 ? options_.master_port : pick_free_port();
    children_.resize(options_.nproc);
    for (int rank = 0; rank < options_.nproc; ++rank) spawn(rank);
    loop();
    result_.elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start_);
    for (auto& child : children_) {
      std::ostringstream tail;
      for (const auto& line : child.tail) tail << line << "\n";
      child.outcome.output_tail = tail.str();
      result_.ranks.push_back(child.outcome);
    }
    return result_;
  }

 private:
  std::vector<std::string> child_env(int rank) const {
    std::map<std::string, std::string> vars = options_.extra_env;
    vars["MASTER_ADDR"] = options_.master_addr;
    vars["MASTER_PORT"] = std::to_string(result_.master_port);
    vars["RANK"] = std::to_string(rank);
    vars["WORLD_SIZE"] = std::to_string(options_.nproc);
    vars["LOCAL_RANK"] = std::to_string(rank);
    vars["LOCAL_WORLD_SIZE"] = std::to_string(options_.nproc);
    std::vector<std::string> env;
    for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
      std::string text(*entry);
      if (vars.count(text.substr(0, text.find('='))) == 0) env.push_back(text);
    }
    for (const auto& [key, value] : vars) env.push_back(key + "=" + value);
    return env;
  }

  void spawn(int rank) {
    Child& child = children_[rank];
    child.rank = rank;
    child.outcome.rank = rank;
    int fds[2];
    // O_CLOEXEC: no other child may inherit this pipe, or EOF would never come.
    if (pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("launcher: pipe2 failed: " + errno_string(errno));
    fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);

    std::vector<std::string> env = child_env(rank);
    std::vector<char*> envp;
    for (auto& entry : env) envp.push_back(entry.data());
    envp.push_back(nullptr);
    std::vector<std::string> args = options_.command;
    std::vector<char*> argv;
    for (auto& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);

    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
    pid_t pid = -1;
    int error = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    if (error != 0) {
      close(fds[0]);
      add_line(child, "fsdpsim launcher: cannot start '" + options_.command[0] + "': " + errno_string(error));
      child.outcome.exit_code = 127;
      child.end_order = ++ends_seen_;
      note_failure(rank);
      return;
    }
    child.pid = pid;
    child.fd = fds[0];
    child.running = true;
  }

  void loop() {
    const auto deadline = start_ + options_.deadline;
    std::optional<Clock::time_point> all_exited_at;
    for (;;) {
      bool any_running = false;
      std::vector<pollfd> polled;
      std::vector<Child*> owners;
      for (auto& child : children_) {
        any_running = any_running || child.running;
        if (child.fd >= 0) {
          polled.push_back(pollfd{child.fd, POLLIN, 0});
          owners.push_back(&child);
        }
      }
      if (!any_running && polled.empty()) break;
      if (!any_running) {
        if (!all_exited_at) all_exited_at = Clock::now();
        if (Clock::now() - *all_exited_at > kPipeDrainGrace) {
          for (auto* child : owners) close_pipe(*child);
          break;
        }
      }

      int ready = poll(polled.data(), polled.size(), 20);
      if (ready < 0 && errno != EINTR) throw std::runtime_error("launcher: poll failed: " + errno_string(errno));
      for (size_t i = 0; ready > 0 && i < polled.size(); ++i) {
        if (polled[i].revents != 0) drain(*owners[i]);
      }
      flush_output();
      reap();
      escalate(deadline);
    }
    flush_output();
  }

  void drain(Child& child) {
    char buffer[65536];
    for (;;) {
      ssize_t n = read(child.fd, buffer, sizeof buffer);
      if (n > 0) {
        child.partial.append(buffer, static_cast<size_t>(n));
        size_t begin = 0;
        for (size_t end; (end = child.partial.find('\n', begin)) != std::string::npos; begin = end + 1) {
          add_line(child, child.partial.substr(begin, end - begin));
        }
        child.partial.erase(0, begin);
        if (child.partial.size() > kMaxLineBytes) {
          add_line(child, child.partial);
          child.partial.clear();
        }
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      close_pipe(child);  // EOF or a read error
      return;
    }
  }

  void close_pipe(Child& child) {
    if (child.end_order == 0) child.end_order = ++ends_seen_;
    if (!child.partial.empty()) add_line(child, child.partial);
    child.partial.clear();
    close(child.fd);
    child.fd = -1;
  }

  void add_line(Child& child, const std::string& line) {
    if (options_.output != nullptr) {
      if (options_.prefix_output) pending_output_ << "[rank " << child.rank << "] ";
      pending_output_ << line << "\n";
    }
    child.tail.push_back(line);
    if (child.tail.size() > kTailLines) child.tail.pop_front();
  }

  void flush_output() {
    if (options_.output == nullptr) return;
    std::string text = pending_output_.str();
    if (text.empty()) return;
    *options_.output << text << std::flush;
    pending_output_.str("");
  }

  void reap() {
    Child* first_failure = nullptr;
    for (auto& child : children_) {
      if (!child.running) continue;
      int status = 0;
      pid_t done = waitpid(child.pid, &status, WNOHANG);
      if (done == 0 || (done < 0 && errno == EINTR)) continue;
      child.running = false;
      if (child.end_order == 0) child.end_order = ++ends_seen_;
      if (done < 0) {
        add_line(child, "fsdpsim launcher: waitpid failed: " + errno_string(errno));
        child.outcome.exit_code = 127;
      } else if (WIFSIGNALED(status)) {
        child.outcome.signal = WTERMSIG(status);
        child.outcome.exit_code = 128 + child.outcome.signal;
      } else {
        child.outcome.exit_code = WEXITSTATUS(status);
      }
      child.outcome.stopped_by_launcher = child.signalled;
      if (!child.outcome.ok() && !child.signalled &&
          (first_failure == nullptr || child.end_order < first_failure->end_order)) {
        first_failure = &child;
      }
    }
    if (first_failure != nullptr) note_failure(first_failure->rank);
  }

  void note_failure(int rank) {
    if (result_.first_failed_rank >= 0) return;
    result_.first_failed_rank = rank;
    failed_at_ = Clock::now();
  }

  void escalate(Clock::time_point deadline) {
    const auto now = Clock::now();
    if (!term_sent_at_) {
      kill_stopped_ranks();
      const bool grace_over = failed_at_ && now - *failed_at_ >= options_.timeout;
      const bool past_deadline = now >= deadline;
      const int interrupt = options_.stop_signal != nullptr ? *options_.stop_signal : 0;
      if (!grace_over && !past_deadline && interrupt == 0) return;
      result_.interrupted_by = interrupt;
      result_.deadline_exceeded = past_deadline && !grace_over && interrupt == 0;
      result_.grace_expired = grace_over && interrupt == 0 && any_running_unsignalled();
      signal_running(SIGTERM);
      term_sent_at_ = now;
      return;
    }
    if (!kill_sent_ && now - *term_sent_at_ >= kKillGrace) {
      signal_running(SIGKILL);
      kill_sent_ = true;
    }
  }

  // After a failure, a rank whose process is stopped cannot end on its own
  // (SIGTERM would wait for a SIGCONT): it gets SIGKILL now, not the grace.
  void kill_stopped_ranks() {
    if (!failed_at_) return;
    for (auto& child : children_) {
      if (!child.running || child.signalled || !process_is_stopped(child.pid)) continue;
      child.signalled = true;
      child.outcome.process_was_stopped = true;
      kill(child.pid, SIGKILL);
    }
  }

  bool any_running_unsignalled() const {
    for (const auto& child : children_) {
      if (child.running && !child.signalled) return true;
    }
    return false;
  }

  void signal_running(int sig) {
    for (auto& child : children_) {
      if (!child.running) continue;
      child.signalled = true;
      kill(child.pid, sig);
    }
  }

  const LaunchOptions& options_;
  Clock::time_point start_;
  std::vector<Child> children_;
  LaunchResult result_;
  std::ostringstream pending_output_;
  std::optional<Clock::time_point> failed_at_;
  std::optional<Clock::time_point> term_sent_at_;
  bool kill_sent_ = false;
  uint64_t ends_seen_ = 0;
};

// The last `lines` lines of `text`.
std::string last_lines(const std::string& text, size_t lines) {
  size_t begin = text.size();
  if (begin > 0 && text[begin - 1] == '\n') --begin;
  for (size_t seen = 0; begin > 0; --begin) {
    if (text[begin - 1] == '\n' && ++seen == lines) break;
  }
  return text.substr(begin);
}

using sim::ranks_text;

std::string describe_outcome(const ProcessOutcome& outcome) {
  std::ostringstream out;
  if (outcome.signal != 0) {
    const char* name = strsignal(outcome.signal);
    out << "killed by signal " << outcome.signal << " (" << (name ? name : "?") << ")";
    if (outcome.stopped_by_launcher) out << ", sent by the launcher";
    if (outcome.process_was_stopped) out << "; its process was stopped (state T)";
  } else {
    out << "exit code " << outcome.exit_code;
    if (outcome.stopped_by_launcher) out << " after the launcher's SIGTERM";
  }
  return out.str();
}

}  // namespace

int pick_free_port() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("pick_free_port: socket failed: " + errno_string(errno));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof address;
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    int error = errno;
    close(fd);
    throw std::runtime_error("pick_free_port: cannot bind 127.0.0.1:0: " + errno_string(error));
  }
  close(fd);
  return ntohs(address.sin_port);
}

bool LaunchResult::ok() const {
  if (ranks.empty() || deadline_exceeded) return false;
  for (const auto& rank : ranks) {
    if (!rank.ok()) return false;
  }
  return true;
}

std::vector<int> LaunchResult::stalled_ranks() const {
  std::vector<int> stalled;
  for (const auto& rank : ranks) {
    if (rank.process_was_stopped || (grace_expired && rank.stopped_by_launcher)) stalled.push_back(rank.rank);
  }
  return stalled;
}

std::string LaunchResult::report() const {
  std::ostringstream out;
  const double seconds = ns_to_s(std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count());
  if (ok()) return fmt::format("launch: all {} ranks exited 0 in {:.1f} s\n", ranks.size(), seconds);
  out << fmt::format("launch: FAILED after {:.1f} s", seconds) << headline() << "\n";
  const std::vector<int> stalled = stalled_ranks();
  for (const auto& rank : ranks) {
    out << "  rank " << rank.rank << ": " << describe_outcome(rank);
    if (rank.rank == first_failed_rank) out << "  <- failed first";
    if (std::count(stalled.begin(), stalled.end(), rank.rank)) out << "  <- stopped making progress";
    out << "\n";
  }
  for (const auto& rank : ranks) {
    if (rank.ok() || rank.stopped_by_launcher || rank.output_tail.empty()) continue;
    out << "--- last output of rank " << rank.rank << " ---\n" << last_lines(rank.output_tail, 10);
  }
  return out.str();
}

std::string LaunchResult::headline() const {
  std::ostringstream out;
  std::vector<int> stopped;
  for (const auto& rank : ranks) {
    if (rank.process_was_stopped) stopped.push_back(rank.rank);
  }
  if (!stopped.empty()) {
    out << "; " << ranks_text(stopped) << " stopped making progress (process stopped, state T; killed by the launcher)";
  }
  if (first_failed_rank >= 0) {
    out << "; rank " << first_failed_rank << " failed first (" << describe_outcome(ranks.at(first_failed_rank)) << ")";
  }
  if (grace_expired) {
    std::vector<int> late;
    for (const auto& rank : ranks) {
      if (rank.stopped_by_launcher && !rank.process_was_stopped) late.push_back(rank.rank);
    }
    out << fmt::format("; the launcher's grace of {:.1f} s after the first failure ran out: ",
                       ns_to_s(std::chrono::duration_cast<std::chrono::nanoseconds>(grace).count()))
        << ranks_text(late) << " still running, stopped by the launcher";
  }
  if (deadline_exceeded) out << "; the launch deadline passed and the remaining ranks were stopped";
  if (interrupted_by != 0) out << "; interrupted by signal " << interrupted_by << ", every rank was stopped";
  return out.str();
}

LaunchResult launch_processes(const LaunchOptions& options) {
  if (options.nproc < 1)
    throw std::invalid_argument("launch: nproc must be >= 1, got " + std::to_string(options.nproc));
  if (options.command.empty() || options.command[0].empty()) throw std::invalid_argument("launch: no command given");
  if (options.master_port < 0 || options.master_port > 65535) {
    throw std::invalid_argument("launch: master port " + std::to_string(options.master_port) +
                                " is outside [0, 65535]");
  }
  if (options.timeout.count() < 0) throw std::invalid_argument("launch: timeout must not be negative");
  if (options.deadline.count() <= 0) throw std::invalid_argument("launch: deadline must be positive");
  return Launch(options).run();
}

}  // namespace fsdpsim
