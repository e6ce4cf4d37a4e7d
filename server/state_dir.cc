#include "server/state_dir.h"

#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <random>
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

// Written to a short temporary name of its own (replicas may share the directory; snapshot names
// can be long), flushed to stable storage, then renamed over the snapshot.
absl::Status WriteFileAtomically(const std::string& dir, const std::string& path,
                                 const std::string& data, const std::string& tag, int64_t counter) {
  const std::string tmp = absl::StrCat(dir, "/.tmp.", tag, ".", counter);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat(tmp, ": ", std::strerror(errno)));
  size_t off = 0;
  bool ok = true;
  while (ok && off < data.size()) {
    const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    ok = n > 0;
    if (ok) off += static_cast<size_t>(n);
  }
  const int saved_errno = errno;
  ok = ok && ::fsync(fd) == 0;
  // close() reports deferred write errors on network filesystems (ENOSPC, EDQUOT).
  ok = ::close(fd) == 0 && ok;
  if (!ok) {
    const std::string why = std::strerror(errno != 0 ? errno : saved_errno);
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(tmp, ": write failed: ", why));
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
  // Temporary files a crash left behind (an hour old: another replica's write in progress is
  // younger by far).
  if (DIR* d = ::opendir(dir.c_str())) {
    const time_t cutoff = ::time(nullptr) - 3600;
    while (dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      struct stat st;
      const std::string path = dir + "/" + name;
      if (name.rfind(".tmp.", 0) == 0 && ::stat(path.c_str(), &st) == 0 && st.st_mtime < cutoff) {
        std::remove(path.c_str());
      }
    }
    ::closedir(d);
  }
  return std::unique_ptr<StateDirectory>(new StateDirectory(std::move(dir), shared, engine));
}

namespace {
// Tells this process's temporary files from other replicas' (containers all run as pid 1).
std::string ProcessTag() {
  std::random_device rd;
  return absl::StrCat(::getpid(), "-", absl::Hex(rd(), absl::kZeroPad8));
}
}  // namespace

StateDirectory::StateDirectory(std::string dir, bool shared, engine::Engine* engine)
    : dir_(std::move(dir)), shared_(shared), engine_(engine), tmp_tag_(ProcessTag()) {
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
  // open() + fstat(), not stat(): on NFS an open revalidates the file (close-to-open
  // consistency), where stat() may answer from cached attributes.
  const int fd = ::open(Path(name).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  struct stat st;
  const bool ok = ::fstat(fd, &st) == 0;
  ::close(fd);
  if (!ok) return std::nullopt;
  Stamp s;
  s.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  s.size = static_cast<int64_t>(st.st_size);
  s.inode = static_cast<uint64_t>(st.st_ino);
  return s;
}

absl::Status StateDirectory::LoadLocked(const std::string& id) {
  const std::string name = SnapshotFileName(id);
  const std::optional<Stamp> stamp = StatFile(name);
  if (!stamp) return absl::NotFoundError(absl::StrCat(name, ": no snapshot"));
  auto data = ReadFileToString(Path(name));
  if (!data.ok()) return absl::NotFoundError(absl::StrCat(name, ": no snapshot"));
  auto info = engine_->RestoreSession(*data, id);
  if (!info.ok()) {
    spdlog::warn("state dir: cannot restore {}: {}", name, std::string(info.status().message()));
    // Out of capacity is worth a retry; anything else (a corrupt file, another model's
    // snapshot) is lost state: the caller must not silently get a fresh session instead.
    const absl::StatusCode code = absl::IsResourceExhausted(info.status())
                                      ? absl::StatusCode::kResourceExhausted
                                      : absl::StatusCode::kDataLoss;
    return absl::Status(
        code, absl::StrCat("session_id: the stored snapshot ", name, " cannot be restored (",
                           info.status().message(), "); delete the session to start it over"));
  }
  owned_[name] = *stamp;
  spdlog::info("restored session {} from {} (position {})", name, dir_, info->position);
  return absl::OkStatus();
}

absl::Status StateDirectory::SaveLocked(const std::string& id) {
  auto snap = engine_->SnapshotSession(id);
  if (!snap.ok()) return snap.status();
  const std::string name = SnapshotFileName(id);
  absl::Status s = WriteFileAtomically(dir_, Path(name), *snap, tmp_tag_, ++tmp_counter_);
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
    if (LoadLocked(id).ok()) ++restored;
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
    // Shared: every change is written through, so only sessions never saved here need it
    // (rewriting the others could only put an older copy over another replica's newer one).
    if (shared_ && owned_.count(name) > 0) continue;
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
    } else if (!absl::IsNotFound(s) && !absl::IsFailedPrecondition(s) && !absl::IsDataLoss(s)) {
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

absl::Status StateDirectory::Sync(const std::string& id) {
  // Alone on the directory, a session the engine holds is current: no lock, no file access.
  if (!shared_ && engine_->GetSession(id).ok()) return absl::OkStatus();
  absl::MutexLock lock(&mu_);
  auto info = engine_->GetSession(id);
  if (absl::IsNotFound(info.status())) {
    absl::Status s = LoadLocked(id);
    return absl::IsNotFound(s) ? absl::OkStatus() : s;
  }
  const std::string name = SnapshotFileName(id);
  if (!info.ok() || info->generating || !ChangedElsewhereLocked(name)) return absl::OkStatus();
  // Another replica saved (or deleted) this session after we last did: its state is newer.
  if (!engine_->DeleteSession(id).ok()) return absl::OkStatus();  // became busy: keep it
  owned_.erase(name);
  absl::Status s = LoadLocked(id);
  if (s.ok()) {
    spdlog::info("session {}: replaced a stale copy with the shared directory's", name);
  } else if (absl::IsNotFound(s)) {
    spdlog::info("session {}: deleted on another replica; dropped here", name);
    return absl::OkStatus();
  }
  return s;
}

bool StateDirectory::Forget(const std::string& id) {
  absl::MutexLock lock(&mu_);
  const std::string name = SnapshotFileName(id);
  owned_.erase(name);
  return std::remove(Path(name).c_str()) == 0;
}

void StateDirectory::Persist(const std::string& id, std::function<void(absl::Status)> done) {
  {
    absl::MutexLock lock(&queue_mu_);
    if (!stopping_) {
      queue_.emplace_back(id, std::move(done));
      return;
    }
  }
  done(absl::OkStatus());  // stopped: the drain's SaveAll writes it
}

void StateDirectory::WriterLoop() {
  while (true) {
    std::pair<std::string, std::function<void(absl::Status)>> job;
    absl::Status saved;
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
        // The file would be a turn behind: remove it rather than let a replica resume from it.
        // The session stays here; the next periodic round saves it again (it has no stamp).
        const std::string name = SnapshotFileName(job.first);
        std::remove(Path(name).c_str());
        owned_.erase(name);
        spdlog::error("write-through save of {} failed: {}", name, std::string(s.message()));
        saved = s;
      }
    }
    job.second(saved);
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
