#include "server/state_dir.h"

#include <dirent.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"

namespace retnet::server {
namespace {

constexpr char kSuffix[] = ".snap";
constexpr size_t kSuffixLen = sizeof(kSuffix) - 1;

bool HexDecode(const std::string& s, std::string* out) {
  if (s.size() % 2 != 0) return false;
  out->clear();
  for (size_t i = 0; i < s.size(); i += 2) {
    auto nib = [](char c) {
      return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    };
    const int hi = nib(s[i]), lo = nib(s[i + 1]);
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<char>(hi * 16 + lo));
  }
  return true;
}

std::vector<std::string> ListSnapshots(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name.size() > kSuffixLen &&
          name.compare(name.size() - kSuffixLen, kSuffixLen, kSuffix) == 0) {
        names.push_back(name);
      }
    }
    ::closedir(d);
  }
  return names;
}

// Written to a name of its own (host and pid: replicas may share the directory), then renamed.
absl::Status WriteFileAtomically(const std::string& path, const std::string& data,
                                 int64_t counter) {
  char host[64] = {0};
  ::gethostname(host, sizeof(host) - 1);
  const std::string tmp = absl::StrCat(path, ".tmp.", host, ".", ::getpid(), ".", counter);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      return absl::InternalError(absl::StrCat(tmp, ": write failed"));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(path, ": rename failed: ", why));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string SnapshotFileName(const std::string& session_id) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : session_id) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out + kSuffix;
}

absl::StatusOr<std::unique_ptr<StateDirectory>> StateDirectory::Open(std::string dir, bool shared,
                                                                     engine::Engine* engine) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::InvalidArgumentError(absl::StrCat("state dir ", dir, ": ", std::strerror(errno)));
  }
  return std::unique_ptr<StateDirectory>(new StateDirectory(std::move(dir), shared, engine));
}

StateDirectory::StateDirectory(std::string dir, bool shared, engine::Engine* engine)
    : dir_(std::move(dir)), shared_(shared), engine_(engine) {
  writer_ = std::thread([this] { WriterLoop(); });
}

StateDirectory::~StateDirectory() { StopWriter(); }

void StateDirectory::StopWriter() {
  {
    absl::MutexLock lock(&queue_mu_);
    stopping_ = true;
  }
  if (writer_.joinable()) writer_.join();
}

std::optional<StateDirectory::Stamp> StateDirectory::StatFile(const std::string& name) const {
  struct stat st;
  if (::stat(Path(name).c_str(), &st) != 0) return std::nullopt;
  Stamp s;
  s.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  s.size = static_cast<int64_t>(st.st_size);
  s.inode = static_cast<uint64_t>(st.st_ino);
  return s;
}

bool StateDirectory::LoadLocked(const std::string& id) {
  const std::string name = SnapshotFileName(id);
  const std::optional<Stamp> stamp = StatFile(name);
  if (!stamp) return false;
  auto data = ReadFileToString(Path(name));
  if (!data.ok()) return false;
  auto info = engine_->RestoreSession(*data, id);
  if (!info.ok()) {
    spdlog::warn("state dir: cannot restore {}: {}", name, std::string(info.status().message()));
    return false;
  }
  owned_[name] = *stamp;
  spdlog::info("restored session {} from {} (position {})", name, dir_, info->position);
  return true;
}

absl::Status StateDirectory::SaveLocked(const std::string& id) {
  auto snap = engine_->SnapshotSession(id);
  if (!snap.ok()) return snap.status();
  const std::string name = SnapshotFileName(id);
  absl::Status s = WriteFileAtomically(Path(name), *snap, ++tmp_counter_);
  if (!s.ok()) return s;
  if (std::optional<Stamp> stamp = StatFile(name)) owned_[name] = *stamp;
  return absl::OkStatus();
}

bool StateDirectory::ChangedElsewhereLocked(const std::string& name) const {
  if (!shared_) return false;
  auto it = owned_.find(name);
  if (it == owned_.end()) return false;  // never written or read here: nothing to compare
  const std::optional<Stamp> now = StatFile(name);
  return !now || !(*now == it->second);
}

int64_t StateDirectory::RestoreAll() {
  absl::MutexLock lock(&mu_);
  int64_t restored = 0;
  for (const std::string& name : ListSnapshots(dir_)) {
    std::string id;
    if (!HexDecode(name.substr(0, name.size() - kSuffixLen), &id)) continue;
    // An unreadable file is not owned, so it stays on disk: a restart with the right model
    // may want it.
    if (LoadLocked(id)) ++restored;
  }
  return restored;
}

int64_t StateDirectory::SaveAll() {
  absl::MutexLock lock(&mu_);
  int64_t written = 0;
  std::set<std::string> present;
  for (const auto& info : engine_->ListSessions()) {
    const std::string name = SnapshotFileName(info.id);
    present.insert(name);
    if (info.generating) continue;  // its previous file (if any) stays until the next round
    if (ChangedElsewhereLocked(name)) {
      // Another replica has served this session since: our copy is stale. Drop it rather
      // than overwrite the newer file.
      (void)engine_->DeleteSession(info.id);
      owned_.erase(name);
      continue;
    }
    absl::Status s = SaveLocked(info.id);
    if (s.ok()) {
      ++written;
    } else if (!absl::IsNotFound(s) && !absl::IsFailedPrecondition(s)) {
      spdlog::error("snapshot of a session failed: {}", std::string(s.message()));
    }
  }
  // This server's sessions that are gone (expired or deleted): their files go too, unless
  // another replica has written them since.
  for (auto it = owned_.begin(); it != owned_.end();) {
    if (present.count(it->first) == 0) {
      if (!ChangedElsewhereLocked(it->first)) std::remove(Path(it->first).c_str());
      it = owned_.erase(it);
    } else {
      ++it;
    }
  }
  return written;
}

void StateDirectory::Sync(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto info = engine_->GetSession(id);
  if (absl::IsNotFound(info.status())) {
    (void)LoadLocked(id);
    return;
  }
  const std::string name = SnapshotFileName(id);
  if (!info.ok() || info->generating || !ChangedElsewhereLocked(name)) return;
  // Another replica saved (or deleted) this session after we last did: its state is newer.
  (void)engine_->DeleteSession(id);
  owned_.erase(name);
  if (LoadLocked(id)) {
    spdlog::info("session {}: replaced a stale copy with the shared directory's", name);
  } else {
    spdlog::info("session {}: deleted on another replica; dropped here", name);
  }
}

bool StateDirectory::Forget(const std::string& id) {
  absl::MutexLock lock(&mu_);
  const std::string name = SnapshotFileName(id);
  owned_.erase(name);
  return std::remove(Path(name).c_str()) == 0;
}

void StateDirectory::Persist(const std::string& id, std::function<void()> done) {
  {
    absl::MutexLock lock(&queue_mu_);
    if (!stopping_) {
      queue_.emplace_back(id, std::move(done));
      return;
    }
  }
  done();  // stopped: the drain's SaveAll writes it
}

void StateDirectory::WriterLoop() {
  while (true) {
    std::pair<std::string, std::function<void()>> job;
    {
      absl::MutexLock lock(&queue_mu_);
      queue_mu_.Await(absl::Condition(
          +[](StateDirectory* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) {
            return self->stopping_ || !self->queue_.empty();
          },
          this));
      if (queue_.empty()) return;  // stopping, and every queued save is done
      job = std::move(queue_.front());
      queue_.pop_front();
      saving_ = true;
    }
    {
      absl::MutexLock lock(&mu_);
      absl::Status s = SaveLocked(job.first);
      // NOT_FOUND: deleted meanwhile; FAILED_PRECONDITION: its next turn already started and
      // will save it when it ends.
      if (!s.ok() && !absl::IsNotFound(s) && !absl::IsFailedPrecondition(s)) {
        spdlog::error("write-through save of {} failed: {}", SnapshotFileName(job.first),
                      std::string(s.message()));
      }
    }
    job.second();
    absl::MutexLock lock(&queue_mu_);
    saving_ = false;
  }
}

void StateDirectory::Flush() {
  absl::MutexLock lock(&queue_mu_);
  queue_mu_.Await(absl::Condition(
      +[](StateDirectory* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) {
        return self->queue_.empty() && !self->saving_;
      },
      this));
}

}  // namespace retnet::server
