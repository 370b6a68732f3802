#include "tools/worker.h"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>

#include "tools/format_util.h"

namespace fsdpsim::tools {

namespace {

std::map<std::string, WorkerFn>& registry() {
  static std::map<std::string, WorkerFn> workers;
  return workers;
}

std::string result_path(const std::string& dir, int rank) { return dir + "/rank-" + std::to_string(rank) + ".json"; }

// A fresh directory under TMPDIR (default /tmp), removed with its files when
// the scope ends.
class TempDir {
 public:
  TempDir() {
    std::string path = (std::filesystem::temp_directory_path() / "fsdpsim-worker-XXXXXX").string();
    if (mkdtemp(path.data()) == nullptr) {
      throw std::runtime_error("cannot create a temporary directory " + path + ": " + std::strerror(errno));
    }
    path_ = path;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::optional<nlohmann::json> read_result(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
}

int rank_from_env() {
  const char* rank = std::getenv("RANK");
  return rank != nullptr ? static_cast<int>(parse_integer<std::runtime_error>("RANK", rank, 0, 1 << 20)) : 0;
}

// The job in FSDPSIM_WORKER_JOB, read once and taken out of the environment
// so that processes the worker starts do not take it for theirs.
nlohmann::json take_job() {
  const char* text = std::getenv(kWorkerJobEnv);
  if (text == nullptr || *text == '\0') {
    throw std::invalid_argument(std::string(kWorkerJobEnv) + " is not set (workers are started by the tools)");
  }
  nlohmann::json job = nlohmann::json::parse(text);
  unsetenv(kWorkerJobEnv);
  if (!job.is_object() || !job.contains("kind") || !job["kind"].is_string()) {
    throw std::invalid_argument(std::string(kWorkerJobEnv) + " is not a JSON object with a \"kind\"");
  }
  return job;
}

}  // namespace

std::string self_exe() {
  std::error_code error;
  const std::filesystem::path path = std::filesystem::read_symlink("/proc/self/exe", error);
  if (error) throw std::runtime_error("cannot read /proc/self/exe: " + error.message());
  return path.string();
}

std::vector<std::string> worker_command() { return {self_exe(), kWorkerFlag}; }

void WorkerContext::write_result(const nlohmann::json& result) const {
  if (!job_.contains("result_dir")) throw std::runtime_error("the worker job has no result_dir");
  const std::string path = result_path(job_.at("result_dir").get<std::string>(), rank_);
  const std::string partial = path + ".partial";
  {
    std::ofstream out(partial, std::ios::binary);
    out << result.dump() << "\n";
    if (!out.flush()) throw std::runtime_error("cannot write " + partial + ": " + std::strerror(errno));
  }
  std::error_code error;
  std::filesystem::rename(partial, path, error);
  if (error) throw std::runtime_error("cannot rename " + partial + ": " + error.message());
}

void register_worker(const std::string& kind, WorkerFn worker) {
  if (!registry().emplace(kind, std::move(worker)).second) {
    std::cerr << "fsdpsim: worker '" << kind << "' is registered twice" << std::endl;
    std::abort();
  }
}

std::optional<int> run_worker_if_requested(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], kWorkerFlag) != 0) return std::nullopt;
  nlohmann::json job;
  int rank = 0;
  try {
    job = take_job();
    rank = rank_from_env();
  } catch (const std::exception& e) {
    std::cerr << "fsdpsim worker: error: " << first_line(e.what()) << std::endl;
    return 2;
  }
  const std::string kind = job["kind"].get<std::string>();
  auto found = registry().find(kind);
  if (found == registry().end()) {
    std::cerr << "fsdpsim worker: error: no worker kind '" << kind << "'" << std::endl;
    return 2;
  }
  try {
    return found->second(WorkerContext(std::move(job), rank));
  } catch (const std::exception& e) {
    std::cerr << "fsdpsim worker " << kind << " rank " << rank << ": error: " << first_line(e.what()) << std::endl;
    return 1;
  }
}

void set_worker_job(LaunchOptions& options, const nlohmann::json& job) {
  if (options.command.empty()) options.command = worker_command();
  options.extra_env[kWorkerJobEnv] = job.dump();
}

WorkerRun launch_workers(nlohmann::json job, LaunchOptions options) {
  const TempDir dir;
  job["result_dir"] = dir.path();
  set_worker_job(options, job);
  WorkerRun run;
  run.launched = launch_processes(options);
  for (int rank = 0; rank < options.nproc; ++rank) run.results.push_back(read_result(result_path(dir.path(), rank)));
  return run;
}

}  // namespace fsdpsim::tools
