// File: server/state_dir.h
//
// The state directory: one snapshot file per session (`<hex of the session id>.snap`), so
// sessions survive restarts and can move between replicas that share the directory.
//
// Writes. A snapshot is written to a temporary file in the same directory
// (`.tmp.<node>.<pid>.<n>`, see below), flushed with fsync, renamed over the session's file and
// the directory is fsynced. A write that fails at any step removes only its temporary file: the
// session's previous file and the stamp recorded for it stay exactly as they were, so a failed
// write never destroys the last good snapshot.
//
// What is written. The directory remembers, per session it wrote or read, the file's stamp
// (mtime, size, inode) and the session's version at that moment (created and last-used times,
// position, pending token: every turn's end and every creation, fork, import or restore changes
// it). A periodic round (SaveAll) writes only the sessions whose version differs from their last
// save, so unchanged sessions cost nothing and a round is short.
//
// Alone (shared = false) the server restores every file at start and saves sessions on drain
// and periodically. A failed periodic or drain write leaves the session as it is in memory and
// still different from its file, so the next round retries it; SaveAll counts the failures.
//
// Write-through (shared = true; --state-dir-write-through), the mode that replicas once shared
// a directory in (now they share --session-store, server/redis_store.h):
//  - a session is restored where it is next used (Sync), not at start;
//  - every turn is saved before its end is sent (write-through, on a writer thread), so the
//    file is always the session's latest acknowledged state when a gateway moves it;
//  - a failed write-through is an error for its caller (UNAVAILABLE, "not saved to the state
//    directory: <reason>"), and the session is rolled back: the engine's copy is replaced by the
//    previous good file (or removed, when it never had one), so this replica and any other one
//    continue from the same, last acknowledged, state. If the session's next turn has already
//    started by then it cannot be rolled back; that turn's own save decides;
//  - a replica remembers the file it last wrote or read for each session; when another replica
//    has saved that session since, the local copy is stale and is replaced by the file (or
//    dropped, when the file was deleted);
//  - a session created by a fork, an import or CreateSession is saved before the reply;
//  - the periodic round saves only sessions that differ from their last save (never saved, or a
//    rollback that could not happen), never over a file another replica wrote since, and
//    removes files of sessions it held that are gone, unless another replica wrote them since.
// A directory belongs to one server: Open() takes an exclusive flock() on `<dir>/.lock` and a
// second server on it is refused (FAILED_PRECONDITION).
//
// Temporary files. Their names carry the writer's node (a hash of the kernel's boot id and the
// writer's pid namespace, so that a pid means the same process) and pid. Open() removes those
// of this node whose process is gone (or that carry this process's own pid: nothing is written
// yet) and, whatever their name, those older than an hour (other nodes' leftovers); a live
// replica's temporary files on this node are kept.
//
// Writers and locks. Queued saves (Persist) run on `writers` threads (default 2). Each session
// has its own FIFO of saves: a writer takes a session, runs its oldest save and gives the
// session back, so two saves of one session never run at once and always run in the order
// they were queued, while saves of different sessions run in parallel. Every read or write of
// one session's file (restore, sync, save, rollback, forget) holds that session's lock, and
// only that one: restoring session A never waits behind a write of session B. The bookkeeping
// (owned_, failing_) has its own short lock, never held across disk or engine calls.
//
// Threading: every method is thread-safe; Persist() returns at once and calls `done` from a
// writer thread. The engine must outlive this object, and StopWriter() must run before it goes.
#ifndef RETNET_SERVER_STATE_DIR_H_
#define RETNET_SERVER_STATE_DIR_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "server/server.h"
#include "server/service.h"

namespace retnet::server {

absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// The outcome of one SaveAll() round, over the sessions this server holds (sessions superseded
// by another replica's newer file, and sessions deleted meanwhile, are not counted).
struct SaveReport {
  int64_t sessions = 0;   // = written + unchanged + busy + failed
  int64_t written = 0;    // written by this round
  int64_t unchanged = 0;  // already on disk as they are
  int64_t busy = 0;       // generating: written by a round after their turn ends
  int64_t failed = 0;     // could not be written; their previous file (if any) is kept
  int64_t saved() const { return written + unchanged; }
};

// What a queued save (Persist) goes through, for SaveHook (server/server.h declares it).
enum class SaveEvent : int {
  kQueued,  // Persist() queued it (called with the queue's lock held: the hook must not call in)
  kBegin,   // a writer took it (before the session's lock)
  kEnd,     // its `done` has returned; the session's next save may start
};

struct StateDirectoryOptions {
  bool shared = false;  // replicas share the directory (see above)
  int writers = 2;      // threads running queued saves (at least 1)
  // For tests, may be empty: sees every queued save, numbered in queue order.
  SaveHook on_save;
};

class StateDirectory final : public SessionStore {
 public:
  // Creates `dir` (and its parents) if needed and checks that it is a directory this process
  // can list and write (by creating and removing a probe file). INVALID_ARGUMENT otherwise, with
  // one line naming the path and the reason.
  static absl::Status Prepare(const std::string& dir);
  // Prepare(), then removes the temporary files that crashed writers left (see above).
  static absl::StatusOr<std::unique_ptr<StateDirectory>> Open(std::string dir,
                                                              StateDirectoryOptions options,
                                                              engine::Engine* engine);
  ~StateDirectory() override;

  // At start (not shared): restores every readable snapshot; unreadable ones are kept on disk.
  int64_t RestoreAll();
  // Writes every idle session that changed since its last save; removes the files of this
  // server's sessions that are gone. A failure is logged once per session and reason.
  SaveReport SaveAll();
  // Waits until every queued save is done (their `done` callbacks included).
  void Flush();
  // Finishes the queued saves and stops the writer threads. Idempotent.
  void StopWriter();

  absl::Status Sync(const std::string& id) override;
  bool Forget(const std::string& id) override;
  bool write_through() const override { return shared_; }
  void Persist(const std::string& id, std::function<void(absl::Status)> done,
               int64_t hold = 0) override;

  const std::string& dir() const { return dir_; }

 private:
  struct Stamp {
    int64_t mtime_ns = 0, size = 0;
    uint64_t inode = 0;
    bool operator==(const Stamp& o) const {
      return mtime_ns == o.mtime_ns && size == o.size && inode == o.inode;
    }
  };
  // What the engine reports about a session that changes whenever its snapshot would.
  struct Version {
    absl::Time created, last_used;
    int64_t position = 0;
    std::optional<int64_t> pending_token;
    static Version Of(const engine::SessionInfo& info) {
      return {info.created, info.last_used, info.position, info.pending_token};
    }
    bool operator==(const Version& o) const {
      return created == o.created && last_used == o.last_used && position == o.position &&
             pending_token == o.pending_token;
    }
  };
  // A file this server wrote or read, and the session as it was then.
  struct Saved {
    Stamp stamp;
    Version version;
  };

  // Holds session `id`'s lock (see the file comment) for its lifetime; the functions below that
  // take one touch only that session's file and engine copy. Lock order: a session's lock, then
  // mu_; never the other way round, and never two session locks at once.
  class SessionGuard;
  struct SessionLock {
    absl::Mutex mu;
    int users = 0;  // guards holding or waiting for `mu` (under locks_mu_)
  };
  struct Job {
    std::string id;
    int64_t seq = 0;  // queue order, for the hook
    std::function<void(absl::Status)> done;
  };

  StateDirectory(std::string dir, StateDirectoryOptions options, engine::Engine* engine);
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::optional<Stamp> StatFile(const std::string& name) const;
  // Restores the session from its file; records the file's stamp. NOT_FOUND: no file.
  absl::Status Load(const SessionGuard& g);
  // Snapshots the session into its file; records the new stamp and version. On failure the
  // previous file and record are untouched. FAILED_PRECONDITION: generating.
  absl::Status Save(const SessionGuard& g);
  // After a failed write-through: puts the engine's copy back to the file's state (or removes
  // it when there is no file). False when it could not (the session is generating again).
  bool RollBack(const SessionGuard& g);
  // Shared: another replica saved or deleted the session's file after we last wrote or read it.
  bool ChangedElsewhere(const SessionGuard& g) const;
  void Disown(const std::string& name);
  // Logs a failed save of `name` unless the same failure was logged last time.
  void NoteFailure(const std::string& name, const absl::Status& s);
  void WriterLoop();

  const std::string dir_;
  const bool shared_;
  engine::Engine* const engine_;
  const std::string tmp_prefix_;  // "<dir>/.tmp.<node>.<pid>."
  const SaveHook on_save_;
  std::atomic<int64_t> tmp_counter_{0};

  // The bookkeeping; held only around map accesses.
  mutable absl::Mutex mu_;
  // Files of the sessions this server held, as of its last write or read of each.
  std::map<std::string, Saved> owned_ ABSL_GUARDED_BY(mu_);
  // Sessions whose last save failed, with the reason logged.
  std::map<std::string, std::string> failing_ ABSL_GUARDED_BY(mu_);

  // The per-session locks, created on first use and dropped when no guard uses them.
  absl::Mutex locks_mu_;
  std::map<std::string, std::unique_ptr<SessionLock>> locks_ ABSL_GUARDED_BY(locks_mu_);

  // The queued saves: a FIFO per session, and the sessions that have some and no writer.
  absl::Mutex queue_mu_;
  std::map<std::string, std::deque<Job>> pending_ ABSL_GUARDED_BY(queue_mu_);
  std::deque<std::string> ready_ ABSL_GUARDED_BY(queue_mu_);
  std::set<std::string> writing_ ABSL_GUARDED_BY(queue_mu_);  // a writer holds one of its saves
  bool stopping_ ABSL_GUARDED_BY(queue_mu_) = false;
  int64_t queued_total_ ABSL_GUARDED_BY(queue_mu_) = 0;
  std::vector<std::thread> writers_;
  absl::Mutex stop_mu_;  // serializes StopWriter() callers
  int lock_fd_ = -1;     // <dir>/.lock, flock()ed while this object lives
};

// Session ids may hold '/' (key tags): file names use hex.
std::string SnapshotFileName(const std::string& session_id);

// This node's tag in temporary file names: 16 hex digits of FNV-1a 64 over
// "<boot id>/<readlink /proc/self/ns/pid>" (processes with the same tag see each other's pids);
// a random tag when /proc does not tell.
const std::string& NodeTag();

}  // namespace retnet::server

#endif  // RETNET_SERVER_STATE_DIR_H_
