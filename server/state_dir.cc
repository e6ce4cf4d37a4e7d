#include "server/state_dir.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/strings.h"
#include "engine/snapshot.h"

namespace retnet::server {
namespace {

constexpr char kSuffix[] = ".snap";
constexpr size_t kSuffixLen = sizeof(kSuffix) - 1;
constexpr char kTmpPrefix[] = ".tmp.";
// Temporary files of another node (or of an older naming) are removed only when this old: a
// write in progress is younger by far.
constexpr time_t kForeignTmpAge = 3600;

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

std::string ErrnoText(int e) { return std::strerror(e != 0 ? e : EIO); }

// Writes `data` to `tmp`, flushes it to stable storage and renames it over `path`; then fsyncs
// the directory so that the rename survives a power loss. On any failure before the rename only
// `tmp` is removed: `path` is left exactly as it was. The message names the failing step.
absl::Status WriteFileAtomically(const std::string& dir, const std::string& tmp,
                                 const std::string& path, const std::string& data) {
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("create: ", ErrnoText(errno)));
  std::string failed;
  size_t off = 0;
  while (failed.empty() && off < data.size()) {
    const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      failed = absl::StrCat("write: ", ErrnoText(n < 0 ? errno : ENOSPC));
    } else {
      off += static_cast<size_t>(n);
    }
  }
  if (failed.empty() && ::fsync(fd) != 0) failed = absl::StrCat("fsync: ", ErrnoText(errno));
  // close() reports deferred write errors on network filesystems (ENOSPC, EDQUOT).
  if (::close(fd) != 0 && failed.empty()) failed = absl::StrCat("close: ", ErrnoText(errno));
  if (failed.empty() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    failed = absl::StrCat("rename: ", ErrnoText(errno));
  }
  if (!failed.empty()) {
    ::unlink(tmp.c_str());
    return absl::InternalError(failed);
  }
  // The new file is in place (and visible to other replicas) from here on, so a failure to
  // flush the directory is reported but does not fail the save.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0 || ::fsync(dfd) != 0) {
    spdlog::warn("state dir {}: fsync of the directory failed: {}", dir, ErrnoText(errno));
  }
  if (dfd >= 0) ::close(dfd);
  return absl::OkStatus();
}

// `mkdir -p`: every missing component of `dir`.
int MakeDirs(const std::string& dir) {
  for (size_t i = 1; i <= dir.size(); ++i) {
    if (i < dir.size() && dir[i] != '/') continue;
    const std::string part = dir.substr(0, i);
    if (::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) return errno;
  }
  return 0;
}

// Whether `pid` is certainly not a running process (kill() would reach it otherwise, or it
// belongs to another user: EPERM means it exists).
bool ProcessGone(int64_t pid) {
  if (pid <= 0 || pid > std::numeric_limits<pid_t>::max()) return false;
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

// Removes the temporary files crashed writers left in `dir` (see the header).
void RemoveStaleTemporaries(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  const time_t cutoff = ::time(nullptr) - kForeignTmpAge;
  int64_t removed = 0;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind(kTmpPrefix, 0) != 0) continue;
    const std::string path = dir + "/" + name;
    bool stale = false;
    // .tmp.<node>.<pid>.<n>
    std::vector<std::string> parts = absl::StrSplit(name.substr(sizeof(kTmpPrefix) - 1), '.');
    int64_t pid = 0;
    if (parts.size() == 3 && parts[0] == NodeTag() && absl::SimpleAtoi(parts[1], &pid)) {
      stale = pid == ::getpid() || ProcessGone(pid);
    }
    struct stat st;
    if (!stale && ::lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_mtime < cutoff) {
      stale = true;
    }
    if (stale && ::unlink(path.c_str()) == 0) ++removed;
  }
  ::closedir(d);
  if (removed > 0)
    spdlog::info("state dir {}: removed {} temporary files left by crashed writers", dir, removed);
}

}  // namespace

const std::string& NodeTag() {
  static const std::string* const tag = [] {
    std::string boot;
    std::ifstream("/proc/sys/kernel/random/boot_id") >> boot;
    char ns[256];
    const ssize_t n = ::readlink("/proc/self/ns/pid", ns, sizeof(ns));
    uint64_t hash = 0;
    if (!boot.empty() && n > 0) {
      hash = common::Fnv1a(absl::StrCat(boot, "/", std::string(ns, static_cast<size_t>(n))));
    } else {  // no way to tell which pids are ours: never match another process's files
      std::random_device rd;
      hash = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    }
    return new std::string(absl::StrCat(absl::Hex(hash, absl::kZeroPad16)));
  }();
  return *tag;
}

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

absl::Status StateDirectory::Prepare(const std::string& dir) {
  auto bad = [&dir](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("state dir ", dir, ": ", why));
  };
  if (dir.empty()) return bad("empty path");
  if (const int e = MakeDirs(dir); e != 0)
    return bad(absl::StrCat("cannot create: ", ErrnoText(e)));
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) return bad(ErrnoText(errno));
  if (!S_ISDIR(st.st_mode)) return bad("not a directory");
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return bad(absl::StrCat("cannot list: ", ErrnoText(errno)));
  ::closedir(d);
  // Permission bits do not tell (root, read-only mounts, ACLs): create and remove a file.
  const std::string probe = absl::StrCat(dir, "/", kTmpPrefix, NodeTag(), ".", ::getpid(), ".0");
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return bad(absl::StrCat("not writable: ", ErrnoText(errno)));
  ::close(fd);
  if (::unlink(probe.c_str()) != 0)
    return bad(absl::StrCat("cannot remove files: ", ErrnoText(errno)));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<StateDirectory>> StateDirectory::Open(std::string dir,
                                                                     StateDirectoryOptions options,
                                                                     engine::Engine* engine) {
  absl::Status ready = Prepare(dir);
  if (!ready.ok()) return ready;
  // One server per directory: two would each overwrite the other's turns.
  const int lock_fd = ::open((dir + "/.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock_fd < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--state-dir ", dir, ": cannot open .lock: ", std::strerror(errno)));
  }
  if (::flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(lock_fd);
    return absl::FailedPreconditionError(absl::StrCat(
        "--state-dir ", dir,
        ": in use by another retnet-server (a state directory is one server's; replicas share "
        "sessions through --session-store)"));
  }
  RemoveStaleTemporaries(dir);
  auto opened = std::unique_ptr<StateDirectory>(
      new StateDirectory(std::move(dir), std::move(options), engine));
  opened->lock_fd_ = lock_fd;
  return opened;
}

// Holds one session's lock; see the header. The analysis cannot name a lock looked up at run
// time, so the guard is the proof instead: the functions that need the lock take one.
class StateDirectory::SessionGuard {
 public:
  SessionGuard(StateDirectory* dir, std::string id) ABSL_NO_THREAD_SAFETY_ANALYSIS
      : dir_(dir),
        id_(std::move(id)),
        name_(SnapshotFileName(id_)) {
    {
      absl::MutexLock lock(&dir_->locks_mu_);
      std::unique_ptr<SessionLock>& slot = dir_->locks_[name_];
      if (!slot) slot = std::make_unique<SessionLock>();
      lock_ = slot.get();
      ++lock_->users;
    }
    lock_->mu.Lock();
  }
  ~SessionGuard() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    lock_->mu.Unlock();
    absl::MutexLock lock(&dir_->locks_mu_);
    if (--lock_->users == 0) dir_->locks_.erase(name_);
  }
  SessionGuard(const SessionGuard&) = delete;
  SessionGuard& operator=(const SessionGuard&) = delete;

  const std::string& id() const { return id_; }
  const std::string& name() const { return name_; }  // the snapshot's file name

 private:
  StateDirectory* const dir_;
  const std::string id_;
  const std::string name_;
  SessionLock* lock_ = nullptr;
};

StateDirectory::StateDirectory(std::string dir, StateDirectoryOptions options,
                               engine::Engine* engine)
    : dir_(std::move(dir)),
      shared_(options.shared),
      engine_(engine),
      tmp_prefix_(absl::StrCat(dir_, "/", kTmpPrefix, NodeTag(), ".", ::getpid(), ".")),
      on_save_(std::move(options.on_save)) {
  const int n = std::max(1, options.writers);
  writers_.reserve(n);
  for (int i = 0; i < n; ++i) writers_.emplace_back([this] { WriterLoop(); });
}

StateDirectory::~StateDirectory() {
  StopWriter();
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the directory's lock
}

void StateDirectory::StopWriter() {
  absl::MutexLock stop(&stop_mu_);
  {
    absl::MutexLock lock(&queue_mu_);
    stopping_ = true;
  }
  for (std::thread& t : writers_) {
    if (t.joinable()) t.join();
  }
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

absl::Status StateDirectory::Load(const SessionGuard& g) {
  const std::string& name = g.name();
  const std::optional<Stamp> stamp = StatFile(name);
  if (!stamp) return absl::NotFoundError(absl::StrCat(name, ": no snapshot"));
  auto data = ReadFileToString(Path(name));
  if (!data.ok()) return absl::NotFoundError(absl::StrCat(name, ": no snapshot"));
  auto info = engine_->RestoreSession(*data, g.id());
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
  {
    absl::MutexLock lock(&mu_);
    owned_[name] = Saved{*stamp, Version::Of(*info)};
    failing_.erase(name);
  }
  spdlog::info("restored session {} from {} (position {})", name, dir_, info->position);
  return absl::OkStatus();
}

absl::Status StateDirectory::Save(const SessionGuard& g) {
  // The version is read before the snapshot is taken: a turn that ends in between makes the
  // file newer than the recorded version, so the next round writes it again (never the reverse).
  auto info = engine_->GetSession(g.id());
  if (!info.ok()) return info.status();
  if (info->generating) {
    return absl::FailedPreconditionError(absl::StrCat("session '", g.id(), "' is generating"));
  }
  auto snap = engine_->SnapshotSession(g.id());
  if (!snap.ok()) return snap.status();
  const std::string& name = g.name();
  const std::string tmp = absl::StrCat(tmp_prefix_, ++tmp_counter_);
  absl::Status s = WriteFileAtomically(dir_, tmp, Path(name), *snap);
  if (!s.ok()) return absl::InternalError(absl::StrCat("writing ", name, ": ", s.message()));
  const std::optional<Stamp> stamp = StatFile(name);
  bool recovered = false;
  {
    absl::MutexLock lock(&mu_);
    if (stamp) {
      owned_[name] = Saved{*stamp, Version::Of(*info)};
    } else {
      owned_.erase(name);  // renamed, then removed at once (another replica's delete)
    }
    recovered = failing_.erase(name) > 0;
  }
  if (recovered) spdlog::info("state dir: {} saved again", name);
  return absl::OkStatus();
}

void StateDirectory::Disown(const std::string& name) {
  absl::MutexLock lock(&mu_);
  owned_.erase(name);
}

bool StateDirectory::RollBack(const SessionGuard& g) {
  const std::string& name = g.name();
  absl::Status deleted = engine_->DeleteSession(g.id());
  if (!deleted.ok() && !absl::IsNotFound(deleted)) return false;  // generating again
  Disown(name);
  absl::Status loaded = Load(g);
  if (absl::IsNotFound(loaded)) {
    spdlog::warn("state dir: {} had no saved state; the session is removed", name);
  } else if (!loaded.ok()) {
    // Not held here now; its next use restores the file (Sync).
    spdlog::warn("state dir: rolling {} back: {}", name, std::string(loaded.message()));
  }
  return true;
}

void StateDirectory::NoteFailure(const std::string& name, const absl::Status& s) {
  std::string why(s.message());
  absl::MutexLock lock(&mu_);
  auto it = failing_.find(name);
  if (it != failing_.end() && it->second == why) return;
  spdlog::error("state dir {}: snapshot of {} failed (its previous file is kept): {}", dir_, name,
                why);
  failing_[name] = std::move(why);
}

bool StateDirectory::ChangedElsewhere(const SessionGuard& g) const {
  if (!shared_) return false;
  Stamp last;
  {
    absl::MutexLock lock(&mu_);
    auto it = owned_.find(g.name());
    if (it == owned_.end()) return false;  // never written or read here: nothing to compare
    last = it->second.stamp;
  }
  const std::optional<Stamp> now = StatFile(g.name());
  return !now || !(*now == last);
}

int64_t StateDirectory::RestoreAll() {
  int64_t restored = 0;
  for (const std::string& name : ListSnapshots(dir_)) {
    std::string id;
    if (!HexDecode(name.substr(0, name.size() - kSuffixLen), &id)) continue;
    // An unreadable file is not owned, so it stays on disk: a restart with the right model
    // may want it.
    SessionGuard g(this, id);
    if (Load(g).ok()) ++restored;
  }
  return restored;
}

SaveReport StateDirectory::SaveAll() {
  SaveReport report;
  std::set<std::string> present;
  for (const auto& info : engine_->ListSessions()) {
    if (IsOneShotSession(info.id)) continue;  // deleted when its generation ends
    const std::string name = SnapshotFileName(info.id);
    present.insert(name);
    ++report.sessions;
    if (info.generating) {
      ++report.busy;  // its previous file (if any) stays until a round after its turn
      continue;
    }
    SessionGuard g(this, info.id);
    bool unchanged = false;
    {
      absl::MutexLock lock(&mu_);
      auto it = owned_.find(name);
      unchanged = it != owned_.end() && it->second.version == Version::Of(info);
    }
    if (unchanged) {
      // As on disk. (Shared: if another replica wrote it since, its file is newer still; the
      // next call here replaces this copy, see Sync.)
      ++report.unchanged;
      continue;
    }
    if (ChangedElsewhere(g)) {
      // Another replica has served this session since: our copy is stale. Drop it rather
      // than overwrite the newer file.
      (void)engine_->DeleteSession(info.id);
      Disown(name);
      --report.sessions;
      continue;
    }
    absl::Status s = Save(g);
    if (absl::IsNotFound(s)) {  // deleted meanwhile
      --report.sessions;
      continue;
    }
    if (s.ok()) {
      ++report.written;
    } else if (absl::IsFailedPrecondition(s)) {
      ++report.busy;  // a turn started meanwhile
    } else {
      ++report.failed;
      NoteFailure(name, s);
    }
  }
  // This server's sessions that are gone (expired or deleted): their files go too, unless
  // another replica has written them since.
  std::vector<std::string> gone;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [name, saved] : owned_) {
      if (present.count(name) == 0) gone.push_back(name);
    }
  }
  for (const std::string& name : gone) {
    std::string id;
    if (!HexDecode(name.substr(0, name.size() - kSuffixLen), &id)) continue;
    SessionGuard g(this, id);
    // Created, restored or saved again since the listing above: not gone.
    if (engine_->GetSession(id).ok()) continue;
    {
      absl::MutexLock lock(&mu_);
      if (owned_.count(name) == 0) continue;  // forgotten or rolled back meanwhile
    }
    if (!ChangedElsewhere(g)) std::remove(Path(name).c_str());
    absl::MutexLock lock(&mu_);
    failing_.erase(name);
    owned_.erase(name);
  }
  absl::MutexLock lock(&mu_);
  for (auto it = failing_.begin(); it != failing_.end();) {
    it = present.count(it->first) == 0 ? failing_.erase(it) : std::next(it);
  }
  return report;
}

absl::Status StateDirectory::Sync(const std::string& id) {
  // Alone on the directory, a session the engine holds is current: no lock, no file access.
  if (!shared_ && engine_->GetSession(id).ok()) return absl::OkStatus();
  SessionGuard g(this, id);
  auto info = engine_->GetSession(id);
  if (absl::IsNotFound(info.status())) {
    absl::Status s = Load(g);
    return absl::IsNotFound(s) ? absl::OkStatus() : s;
  }
  const std::string& name = g.name();
  if (!info.ok() || info->generating || !ChangedElsewhere(g)) return absl::OkStatus();
  // Another replica saved (or deleted) this session after we last did: its state is newer.
  if (!engine_->DeleteSession(id).ok()) return absl::OkStatus();  // became busy: keep it
  Disown(name);
  absl::Status s = Load(g);
  if (s.ok()) {
    spdlog::info("session {}: replaced a stale copy with the shared directory's", name);
  } else if (absl::IsNotFound(s)) {
    spdlog::info("session {}: deleted on another replica; dropped here", name);
    return absl::OkStatus();
  }
  return s;
}

bool StateDirectory::Forget(const std::string& id) {
  SessionGuard g(this, id);
  {
    absl::MutexLock lock(&mu_);
    owned_.erase(g.name());
    failing_.erase(g.name());
  }
  return std::remove(Path(g.name()).c_str()) == 0;
}

void StateDirectory::Persist(const std::string& id, std::function<void(absl::Status)> done,
                             int64_t /*hold*/) {
  {
    absl::MutexLock lock(&queue_mu_);
    if (!stopping_) {
      std::deque<Job>& jobs = pending_[id];
      jobs.push_back(Job{id, ++queued_total_, std::move(done)});
      if (on_save_) on_save_(id, queued_total_, SaveEvent::kQueued);
      // A session a writer holds goes back to ready_ when that writer is done with it.
      if (jobs.size() == 1 && writing_.count(id) == 0) ready_.push_back(id);
      return;
    }
  }
  done(absl::OkStatus());  // stopped: the drain's SaveAll writes it
}

void StateDirectory::WriterLoop() {
  while (true) {
    Job job;
    {
      absl::MutexLock lock(&queue_mu_);
      queue_mu_.Await(absl::Condition(
          +[](StateDirectory* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) {
            return self->stopping_ || !self->ready_.empty();
          },
          this));
      // Stopping, and no session is waiting for a writer: the sessions other writers hold come
      // back to ready_ only from those writers, which then take them again.
      if (ready_.empty()) return;
      const std::string id = std::move(ready_.front());
      ready_.pop_front();
      auto it = pending_.find(id);
      job = std::move(it->second.front());
      it->second.pop_front();
      writing_.insert(id);
    }
    if (on_save_) on_save_(job.id, job.seq, SaveEvent::kBegin);
    absl::Status saved;
    {
      SessionGuard g(this, job.id);
      absl::Status s = Save(g);
      // NOT_FOUND: deleted meanwhile; FAILED_PRECONDITION: its next turn already started and
      // will save it when it ends.
      if (!s.ok() && !absl::IsNotFound(s) && !absl::IsFailedPrecondition(s)) {
        // The file still holds the last acknowledged state: put the session back to it, so
        // that the caller's error means "this did not happen" here and on every replica.
        const bool rolled_back = RollBack(g);
        spdlog::error("write-through save of {} failed ({}): {}", g.name(),
                      rolled_back ? "rolled back to its previous file" : "not rolled back: busy",
                      std::string(s.message()));
        saved = absl::UnavailableError(
            absl::StrCat("not saved to the state directory: ", s.message(),
                         rolled_back ? "; the session is back at its last saved state" : ""));
      }
    }
    job.done(saved);
    if (on_save_) on_save_(job.id, job.seq, SaveEvent::kEnd);
    absl::MutexLock lock(&queue_mu_);
    writing_.erase(job.id);
    auto it = pending_.find(job.id);
    if (it->second.empty()) {
      pending_.erase(it);
    } else {
      ready_.push_back(job.id);  // its next save, behind the sessions already waiting
    }
  }
}

void StateDirectory::Flush() {
  absl::MutexLock lock(&queue_mu_);
  queue_mu_.Await(absl::Condition(
      +[](StateDirectory* self)
           ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) { return self->pending_.empty(); },
      this));
}

}  // namespace retnet::server
