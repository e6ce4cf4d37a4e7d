// File: server/state_dir.h
//
// The state directory: one snapshot file per session (`<hex of the session id>.snap`, written
// atomically), so sessions survive restarts and can move between replicas that share the
// directory.
//
// Alone (shared = false) the server restores every file at start and saves every session on
// drain and periodically. Shared by replicas (shared = true):
//  - a session is restored where it is next used (Sync), not at start;
//  - every turn is saved before its end is sent (write-through, on the writer thread), so the
//    file is always the session's latest state when a gateway moves it;
//  - a replica remembers the file it last wrote or read for each session (mtime, size, inode);
//    when another replica has saved that session since, the local copy is stale and is replaced
//    by the file (or dropped, when the file was deleted);
//  - a session created by a fork, an import or CreateSession is saved before the reply;
//  - the periodic round saves only sessions never saved (a failed write-through removes the
//    file and the stamp, so it is saved again), and removes files of sessions it held that are
//    gone, unless another replica wrote them since.
// One session must be served by one replica at a time; the directory does not arbitrate two
// replicas continuing the same session at once.
//
// Threading: every method is thread-safe; Persist() returns at once and calls `done` from the
// writer thread. The engine must outlive this object, and StopWriter() must run before it goes.
#ifndef RETNET_SERVER_STATE_DIR_H_
#define RETNET_SERVER_STATE_DIR_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/engine.h"
#include "server/service.h"

namespace retnet::server {

absl::StatusOr<std::string> ReadFileToString(const std::string& path);

class StateDirectory final : public SessionStore {
 public:
  // Creates `dir` if needed.
  static absl::StatusOr<std::unique_ptr<StateDirectory>> Open(std::string dir, bool shared,
                                                              engine::Engine* engine);
  ~StateDirectory() override;

  // At start (not shared): restores every readable snapshot; unreadable ones are kept on disk.
  int64_t RestoreAll();
  // Saves every idle session; removes the files of this server's sessions that are gone.
  // Returns how many were written.
  int64_t SaveAll();
  // Waits until every queued save is done (their `done` callbacks included).
  void Flush();
  // Finishes the queued saves and stops the writer thread. Idempotent.
  void StopWriter();

  absl::Status Sync(const std::string& id) override;
  bool Forget(const std::string& id) override;
  bool write_through() const override { return shared_; }
  void Persist(const std::string& id, std::function<void(absl::Status)> done) override;

  const std::string& dir() const { return dir_; }

 private:
  struct Stamp {
    int64_t mtime_ns = 0, size = 0;
    uint64_t inode = 0;
    bool operator==(const Stamp& o) const {
      return mtime_ns == o.mtime_ns && size == o.size && inode == o.inode;
    }
  };

  StateDirectory(std::string dir, bool shared, engine::Engine* engine);
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::optional<Stamp> StatFile(const std::string& name) const;
  // Restores session `id` from its file; records the file's stamp. NOT_FOUND: no file.
  absl::Status LoadLocked(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Snapshots session `id` into its file; records the new stamp.
  absl::Status SaveLocked(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Shared: another replica saved or deleted `name` after we last wrote or read it.
  bool ChangedElsewhereLocked(const std::string& name) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WriterLoop();

  const std::string dir_;
  const bool shared_;
  engine::Engine* const engine_;
  const std::string tmp_tag_;

  mutable absl::Mutex mu_;
  // Files of the sessions this server held, with the stamp of its last write or read.
  std::map<std::string, Stamp> owned_ ABSL_GUARDED_BY(mu_);
  int64_t tmp_counter_ ABSL_GUARDED_BY(mu_) = 0;

  absl::Mutex queue_mu_;
  std::deque<std::pair<std::string, std::function<void(absl::Status)>>> queue_ ABSL_GUARDED_BY(queue_mu_);
  bool stopping_ ABSL_GUARDED_BY(queue_mu_) = false;
  bool saving_ ABSL_GUARDED_BY(queue_mu_) = false;  // the writer holds a job
  std::thread writer_;
};

// Session ids may hold '/' (key tags): file names use hex.
std::string SnapshotFileName(const std::string& session_id);

}  // namespace retnet::server

#endif  // RETNET_SERVER_STATE_DIR_H_
