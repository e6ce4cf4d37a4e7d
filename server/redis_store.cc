// File: server/redis_store.cc
#include "server/redis_store.h"

#include <hiredis/hiredis.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/strings.h"
#include "spdlog/spdlog.h"

namespace retnet::server {
namespace {

// Scripts: KEYS are always {lease, meta, snap} of one session. Errors the scripts raise on
// purpose start with "RETNET".
enum Script { kAcquire, kRenew, kWrite, kRelease, kVersion, kRead, kForget, kScripts };

// ARGV: owner, ttl_ms. {1, token, version, has_snapshot, last_writer} or {0, owner, pttl_ms}.
constexpr char kAcquireLua[] = R"lua(
local o = redis.call('HGET', KEYS[1], 'owner')
if o and o ~= ARGV[1] then return {0, o, redis.call('PTTL', KEYS[1])} end
local t
if o then
  t = tonumber(redis.call('HGET', KEYS[1], 'token'))
else
  t = redis.call('HINCRBY', KEYS[2], 'token', 1)
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', t)
  redis.call('PERSIST', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local m = redis.call('HMGET', KEYS[2], 'version', 'writer')
return {1, t, tonumber(m[1] or '0'), redis.call('EXISTS', KEYS[3]), m[2] or ''}
)lua";

// ARGV: owner, token, ttl_ms. 1 = renewed, 0 = not ours any more.
constexpr char kRenewLua[] = R"lua(
local l = redis.call('HMGET', KEYS[1], 'owner', 'token')
if l[1] ~= ARGV[1] or l[2] ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
)lua";

// KEYS[4]: the pending key the snapshot was SET to just before (pipelined, so the 8 MiB
// value is never copied through Lua). ARGV: owner, token ('0': no lease held, the write needs
// the lease free or ours), expected version (the one our copy was made from), idle lifetime in
// ms (0 = none). With a token the lease is released. Returns the new version; a refused write
// deletes the pending key.
constexpr char kWriteLua[] = R"lua(
local function refuse(why)
  redis.call('DEL', KEYS[4])
  return redis.error_reply(why)
end
if redis.call('EXISTS', KEYS[4]) == 0 then return refuse('RETNET NOPENDING') end
local l = redis.call('HMGET', KEYS[1], 'owner', 'token')
if ARGV[2] == '0' then
  if l[1] and l[1] ~= ARGV[1] then return refuse('RETNET BUSY') end
else
  if l[1] ~= ARGV[1] or l[2] ~= ARGV[2] then return refuse('RETNET LOST') end
  local f = tonumber(redis.call('HGET', KEYS[2], 'fence') or '0')
  if tonumber(ARGV[2]) < f then return refuse('RETNET LOST fenced') end
end
local v = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
if v ~= tonumber(ARGV[3]) and redis.call('EXISTS', KEYS[3]) == 1 then
  return refuse('RETNET EXISTS')
end
redis.call('RENAME', KEYS[4], KEYS[3])
v = v + 1
redis.call('HSET', KEYS[2], 'version', v, 'writer', ARGV[1])
if ARGV[4] ~= '0' then
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
else
  redis.call('PERSIST', KEYS[3])
  redis.call('PERSIST', KEYS[2])
end
if ARGV[2] ~= '0' then
  redis.call('HSET', KEYS[2], 'fence', ARGV[2])
  redis.call('DEL', KEYS[1])
end
return v
)lua";

// ARGV: owner, token. 1 = released.
constexpr char kReleaseLua[] = R"lua(
local l = redis.call('HMGET', KEYS[1], 'owner', 'token')
if l[1] ~= ARGV[1] or l[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
)lua";

// {version, has_snapshot}
constexpr char kVersionLua[] = R"lua(
return {tonumber(redis.call('HGET', KEYS[2], 'version') or '0'), redis.call('EXISTS', KEYS[3])}
)lua";

// {version, snapshot or nil}
constexpr char kReadLua[] = R"lua(
return {tonumber(redis.call('HGET', KEYS[2], 'version') or '0'), redis.call('GET', KEYS[3])}
)lua";

// ARGV: tombstone_ms. 1 when a snapshot was deleted.
constexpr char kForgetLua[] = R"lua(
local had = redis.call('DEL', KEYS[3])
redis.call('DEL', KEYS[1])
if had == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'version', 1)
  redis.call('HDEL', KEYS[2], 'writer')
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return had
)lua";

constexpr const char* kLua[kScripts] = {kAcquireLua, kRenewLua, kWriteLua, kReleaseLua,
                                        kVersionLua, kReadLua,  kForgetLua};
constexpr int64_t kTombstoneMs = int64_t{24} * 3600 * 1000;
// A pending snapshot whose write never ran (the connection broke in between) expires.
constexpr int64_t kPendingMs = 60 * 1000;

std::string Hex(const std::string& s) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(s.size() * 2);
  for (unsigned char c : s) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

std::string Hostname() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == 0) return "host";
  return buf;
}

}  // namespace

// One owned hiredis reply.
class RedisStore::Reply {
 public:
  explicit Reply(redisReply* r) : r_(r) {}
  Reply(Reply&& o) noexcept : r_(o.r_) { o.r_ = nullptr; }
  Reply& operator=(Reply&& o) noexcept {
    std::swap(r_, o.r_);
    return *this;
  }
  ~Reply() {
    if (r_ != nullptr) freeReplyObject(r_);
  }
  const redisReply* get() const { return r_; }
  bool is_error() const { return r_->type == REDIS_REPLY_ERROR; }
  std::string error() const { return std::string(r_->str, r_->len); }
  // Element `i` of an array reply as an integer (0 when it is not one).
  int64_t Int(size_t i) const {
    if (r_->type != REDIS_REPLY_ARRAY || i >= r_->elements) return 0;
    const redisReply* e = r_->element[i];
    if (e->type == REDIS_REPLY_INTEGER) return e->integer;
    int64_t v = 0;
    if (e->type == REDIS_REPLY_STRING && absl::SimpleAtoi(absl::string_view(e->str, e->len), &v))
      return v;
    return 0;
  }
  // Element `i` as bytes; nullopt-like empty with *nil = true when it is nil.
  std::string Str(size_t i, bool* nil = nullptr) const {
    if (nil != nullptr) *nil = true;
    if (r_->type != REDIS_REPLY_ARRAY || i >= r_->elements) return "";
    const redisReply* e = r_->element[i];
    if (e->type != REDIS_REPLY_STRING) return "";
    if (nil != nullptr) *nil = false;
    return std::string(e->str, e->len);
  }
  int64_t integer() const { return r_->type == REDIS_REPLY_INTEGER ? r_->integer : 0; }

 private:
  redisReply* r_;
};

// One blocking connection, authenticated, on its database, with the scripts' SHA1s.
class RedisStore::Connection {
 public:
  ~Connection() {
    if (c_ != nullptr) redisFree(c_);
  }
  static absl::StatusOr<std::unique_ptr<Connection>> Open(const RedisAddress& a,
                                                          absl::Duration timeout) {
    auto conn = std::unique_ptr<Connection>(new Connection);
    conn->c_ = redisConnectWithTimeout(a.host.c_str(), a.port, absl::ToTimeval(timeout));
    if (conn->c_ == nullptr) return absl::UnavailableError("cannot allocate a connection");
    if (conn->c_->err != 0) return absl::UnavailableError(conn->c_->errstr);
    redisSetTimeout(conn->c_, absl::ToTimeval(timeout));
    if (!a.password.empty()) {
      std::vector<std::string> auth = {"AUTH"};
      if (!a.user.empty()) auth.push_back(a.user);
      auth.push_back(a.password);
      ASSIGN_OR_RETURN(Reply r, conn->Command(auth));
      if (r.is_error()) return absl::PermissionDeniedError(absl::StrCat("AUTH: ", r.error()));
    }
    if (a.db != 0) {
      ASSIGN_OR_RETURN(Reply r, conn->Command({"SELECT", std::to_string(a.db)}));
      if (r.is_error()) return absl::InvalidArgumentError(absl::StrCat("SELECT: ", r.error()));
    }
    for (int i = 0; i < kScripts; ++i) {
      ASSIGN_OR_RETURN(Reply r, conn->Command({"SCRIPT", "LOAD", kLua[i]}));
      if (r.is_error() || r.get()->type != REDIS_REPLY_STRING) {
        return absl::PermissionDeniedError(
            absl::StrCat("SCRIPT LOAD: ", r.is_error() ? r.error() : "unexpected reply"));
      }
      conn->sha_[i].assign(r.get()->str, r.get()->len);
    }
    return conn;
  }

  // UNAVAILABLE when the connection failed (it must then be dropped); error replies are
  // returned as replies.
  absl::StatusOr<Reply> Command(const std::vector<std::string>& args) {
    if (!Append({args.begin(), args.end()})) return Failed("cannot queue the command");
    return Next();
  }

  // EVALSHA, or EVAL when Redis has forgotten the script (SCRIPT FLUSH).
  absl::StatusOr<Reply> Eval(int script, const std::vector<std::string>& keys,
                             const std::vector<std::string>& args) {
    std::vector<std::string> cmd = EvalSha(script, keys, args);
    absl::StatusOr<Reply> r = Command(cmd);  // before `cmd` is moved into the call below
    return ScriptLoaded(std::move(r), std::move(cmd), script);
  }

  // SET `key` `value` PX `px_ms`, then the script, in one round trip; the script's reply (the
  // SET's error reply when it failed, e.g. OOM).
  absl::StatusOr<Reply> SetThenEval(const std::string& key, const std::string& value, int64_t px_ms,
                                    int script, const std::vector<std::string>& keys,
                                    const std::vector<std::string>& args) {
    const std::string px = std::to_string(px_ms);
    std::vector<std::string> cmd = EvalSha(script, keys, args);
    if (!Append({"SET", key, value, "PX", px}) || !Append({cmd.begin(), cmd.end()})) {
      return Failed("cannot queue the write");
    }
    ASSIGN_OR_RETURN(Reply set, Next());
    absl::StatusOr<Reply> eval = Next();
    if (set.is_error()) return set;
    return ScriptLoaded(std::move(eval), std::move(cmd), script);
  }

  bool broken() const { return broken_ || c_->err != 0; }

 private:
  Connection() = default;

  // Queues one command; it is sent when the next reply is read. False: the connection failed.
  bool Append(const std::vector<absl::string_view>& args) {
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    argv.reserve(args.size());
    lens.reserve(args.size());
    for (absl::string_view a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    if (redisAppendCommandArgv(c_, static_cast<int>(args.size()), argv.data(), lens.data()) ==
        REDIS_OK) {
      return true;
    }
    broken_ = true;
    return false;
  }

  // The next queued command's reply.
  absl::StatusOr<Reply> Next() {
    void* r = nullptr;
    if (redisGetReply(c_, &r) != REDIS_OK || r == nullptr) return Failed("no reply");
    return Reply(static_cast<redisReply*>(r));
  }

  absl::Status Failed(const char* what) {
    broken_ = true;
    return absl::UnavailableError(c_->err != 0 ? c_->errstr : what);
  }

  std::vector<std::string> EvalSha(int script, const std::vector<std::string>& keys,
                                   const std::vector<std::string>& args) const {
    std::vector<std::string> cmd = {"EVALSHA", sha_[script], std::to_string(keys.size())};
    cmd.insert(cmd.end(), keys.begin(), keys.end());
    cmd.insert(cmd.end(), args.begin(), args.end());
    return cmd;
  }

  // `r`, the reply of EVALSHA `cmd`; when Redis did not know the script, the reply of EVAL.
  absl::StatusOr<Reply> ScriptLoaded(absl::StatusOr<Reply> r, std::vector<std::string> cmd,
                                     int script) {
    if (r.ok() && r->is_error() && absl::StartsWith(r->error(), "NOSCRIPT")) {
      cmd[0] = "EVAL";
      cmd[1] = kLua[script];
      return Command(cmd);
    }
    return r;
  }
  redisContext* c_ = nullptr;
  bool broken_ = false;
  std::string sha_[kScripts];
};

std::string RedisAddress::Describe() const {
  return absl::StrCat("redis://", host, ":", port, "/", db);
}

absl::StatusOr<RedisAddress> ParseRedisUrl(const std::string& url) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--session-store: ", why, " (want redis://[[user]:password@]host[:port][/db])"));
  };
  if (absl::StartsWith(url, "rediss://")) {
    return bad(
        "rediss:// (TLS) is not supported: this build's hiredis (0.14) has no TLS; reach "
        "Redis over a private network or a TLS tunnel");
  }
  if (!absl::StartsWith(url, "redis://")) return bad("not a redis:// URL");
  std::string rest = url.substr(8);
  RedisAddress a;
  const size_t at = rest.rfind('@');
  if (at != std::string::npos) {
    const std::string cred = rest.substr(0, at);
    rest = rest.substr(at + 1);
    const size_t colon = cred.find(':');
    if (colon == std::string::npos) {
      a.password = cred;
    } else {
      a.user = cred.substr(0, colon);
      a.password = cred.substr(colon + 1);
    }
  }
  const size_t slash = rest.find('/');
  if (slash != std::string::npos) {
    const std::string db = rest.substr(slash + 1);
    rest = rest.substr(0, slash);
    if (!db.empty() && (!absl::SimpleAtoi(db, &a.db) || a.db < 0 || a.db > 65535)) {
      return bad(absl::StrCat("database '", db, "' is not a number"));
    }
  }
  std::string port;
  if (!rest.empty() && rest.front() == '[') {  // [IPv6]:port
    const size_t close = rest.find(']');
    if (close == std::string::npos) return bad("unclosed '['");
    if (close + 1 < rest.size()) {
      if (rest[close + 1] != ':') return bad("junk after ']'");
      port = rest.substr(close + 2);
    }
    rest = rest.substr(1, close - 1);
  } else if (const size_t colon = rest.rfind(':'); colon != std::string::npos) {
    port = rest.substr(colon + 1);
    rest = rest.substr(0, colon);
  }
  if (!port.empty() && (!absl::SimpleAtoi(port, &a.port) || a.port <= 0 || a.port > 65535)) {
    return bad(absl::StrCat("port '", port, "' is not a port"));
  }
  if (rest.empty()) return bad("no host");
  a.host = rest;
  return a;
}

RedisStore::RedisStore(RedisStoreOptions options, engine::Engine* engine)
    : options_(std::move(options)),
      engine_(engine),
      owner_(absl::StrCat(Hostname(), "/", ::getpid(), "/", common::RandomHexId("", 8))),
      metrics_(options_.metrics) {
  if (metrics_ != nullptr) metrics_->EnableStoreMetrics();
  const int n = std::max(1, options_.writers);
  for (int i = 0; i < n; ++i) writers_.emplace_back([this] { WriterLoop(); });
  renewer_ = std::thread([this] { RenewLoop(); });
}

absl::StatusOr<std::unique_ptr<RedisStore>> RedisStore::Open(RedisStoreOptions options,
                                                             engine::Engine* engine) {
  if (options.lease_ttl < absl::Milliseconds(100)) {
    return absl::InvalidArgumentError("--session-lease-ttl-ms: at least 100");
  }
  if (options.lease_wait < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--session-lease-wait-ms: must not be negative");
  }
  if (options.timeout < absl::Milliseconds(1)) {
    return absl::InvalidArgumentError("--session-store-timeout-ms: at least 1");
  }
  auto first = Connection::Open(options.address, options.timeout);
  if (!first.ok()) {
    if (!absl::IsUnavailable(first.status())) {
      return absl::InvalidArgumentError(absl::StrCat("--session-store ", options.address.Describe(),
                                                     ": ", first.status().message()));
    }
    spdlog::warn("session store {} unreachable for now ({}); calls answer UNAVAILABLE until it is",
                 options.address.Describe(), std::string(first.status().message()));
  }
  auto store = std::unique_ptr<RedisStore>(new RedisStore(std::move(options), engine));
  if (first.ok()) store->Give(*std::move(first));
  spdlog::info("session store {} (owner {}, lease {} ms, wait {} ms)", store->Describe(),
               store->owner_, absl::ToInt64Milliseconds(store->options_.lease_ttl),
               absl::ToInt64Milliseconds(store->options_.lease_wait));
  return store;
}

RedisStore::~RedisStore() { Stop(); }

std::string RedisStore::Key(const std::string& id, const char* what) const {
  return absl::StrCat(options_.prefix, "{", Hex(id), "}:", what);
}

absl::Mutex& RedisStore::Stripe(const std::string& id) {
  return stripes_[common::Fnv1a(id) % stripes_.size()];
}

std::unique_ptr<RedisStore::Connection> RedisStore::Take(absl::Status* error, bool* pooled) {
  if (pooled != nullptr) {
    *pooled = false;
    absl::MutexLock lock(&pool_mu_);
    if (!idle_.empty()) {
      *pooled = true;
      auto c = std::move(idle_.back());
      idle_.pop_back();
      return c;
    }
  }
  auto c = Connection::Open(options_.address, options_.timeout);
  if (!c.ok()) {
    *error = c.status();
    return nullptr;
  }
  return *std::move(c);
}

void RedisStore::Give(std::unique_ptr<Connection> c) {
  if (c == nullptr || c->broken()) return;
  absl::MutexLock lock(&pool_mu_);
  if (idle_.size() < 16) idle_.push_back(std::move(c));
}

absl::StatusOr<RedisStore::Reply> RedisStore::Eval(int script, const std::string& id,
                                                   std::vector<std::string> args, const char* op) {
  const std::vector<std::string> keys = {Key(id, "lease"), Key(id, "meta"), Key(id, "snap")};
  return Run(op, [&](Connection* c) { return c->Eval(script, keys, args); });
}

absl::StatusOr<RedisStore::Reply> RedisStore::Run(
    const char* op, const std::function<absl::StatusOr<Reply>(Connection*)>& call) {
  const absl::Time start = absl::Now();
  absl::Status error;
  bool pooled = false;
  std::unique_ptr<Connection> c = Take(&error, &pooled);
  absl::StatusOr<Reply> r = c == nullptr ? absl::StatusOr<Reply>(error) : call(c.get());
  if (!r.ok() && pooled) {
    // An idle connection that Redis closed (a restart, a failover, its idle timeout): once more
    // on a fresh one. Every call is safe to repeat: a write that did land the first time
    // released its lease, so its repeat is refused (LOST) and the turn fails, never doubles.
    c = Take(&error, nullptr);
    r = c == nullptr ? absl::StatusOr<Reply>(error) : call(c.get());
  }
  Give(std::move(c));
  const bool failed = !r.ok() || (r->is_error() && !absl::StartsWith(r->error(), "RETNET"));
  if (metrics_ != nullptr) {
    metrics_->ObserveStore(op, absl::ToDoubleSeconds(absl::Now() - start));
    if (failed) metrics_->CountStoreError(op);
  }
  if (!r.ok()) {
    return absl::UnavailableError(
        absl::StrCat("session store ", Describe(), ": ", r.status().message()));
  }
  if (failed) {  // OOM (maxmemory), READONLY (a replica), NOAUTH, ...
    return absl::UnavailableError(absl::StrCat("session store ", Describe(), ": ", r->error()));
  }
  return r;
}

absl::Status RedisStore::Align(const std::string& id, int64_t version, bool has) {
  auto info = engine_->GetSession(id);
  const bool have = info.ok();
  bool current = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(id);
    current = it != entries_.end() && it->second.known && it->second.version == version;
  }
  if (have && (current || info->generating)) return absl::OkStatus();
  if (!has) {
    if (!have) return absl::OkStatus();
    bool known = false;
    {
      absl::MutexLock lock(&mu_);
      auto it = entries_.find(id);
      known = it != entries_.end() && it->second.known;
    }
    if (!known) return absl::OkStatus();  // new here, not written yet
    // It was stored, and is not any more: deleted on another replica.
    if (engine_->DeleteSession(id).ok()) spdlog::info("session {}: deleted elsewhere", Hex(id));
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(id);
    if (it != entries_.end()) it->second.known = false;
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(Reply r, Eval(kRead, id, {}, "read"));
  bool nil = true;
  const std::string data = r.Str(1, &nil);
  const int64_t read_version = r.Int(0);
  if (have) (void)engine_->DeleteSession(id);
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(id);
    if (it != entries_.end()) it->second.known = false;
  }
  if (nil) return absl::OkStatus();  // deleted meanwhile
  auto restored = engine_->RestoreSession(data, id);
  if (!restored.ok()) {
    spdlog::warn("session store: cannot restore {}: {}", Hex(id),
                 std::string(restored.status().message()));
    const absl::StatusCode code = absl::IsResourceExhausted(restored.status())
                                      ? absl::StatusCode::kResourceExhausted
                                      : absl::StatusCode::kDataLoss;
    return absl::Status(
        code, absl::StrCat("session_id: the stored snapshot cannot be restored (",
                           restored.status().message(), "); delete the session to start it over"));
  }
  absl::MutexLock lock(&mu_);
  Entry& e = entries_[id];
  e.version = read_version;
  e.known = true;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> RedisStore::Acquire(const std::string& id) {
  const absl::Time deadline = absl::Now() + options_.lease_wait;
  int64_t hold = 0;
  {
    absl::MutexLock lock(&mu_);
    struct Arg {
      RedisStore* self;
      const std::string* id;
    } arg{this, &id};
    const bool free =
        mu_.AwaitWithDeadline(absl::Condition(
                                  +[](Arg* a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                    auto it = a->self->entries_.find(*a->id);
                                    return it == a->self->entries_.end() || it->second.hold == 0;
                                  },
                                  &arg),
                              deadline);
    if (!free) {
      if (metrics_ != nullptr) metrics_->CountLeaseRefused();
      return absl::UnavailableError(
          "session_id: another turn of this session is running on this replica; retry when it "
          "ends");
    }
    hold = ++next_hold_;
    entries_[id].hold = hold;
  }
  auto give_up = [&](absl::Status s) {
    absl::MutexLock lock(&mu_);
    entries_[id].hold = 0;
    return s;
  };
  const std::string ttl = std::to_string(absl::ToInt64Milliseconds(options_.lease_ttl));
  absl::Duration backoff = absl::Milliseconds(2);
  int64_t token = 0, version = 0;
  bool has = false;
  while (true) {
    auto r = Eval(kAcquire, id, {owner_, ttl}, "acquire");
    if (!r.ok()) return give_up(r.status());
    if (r->Int(0) == 1) {
      token = r->Int(1);
      version = r->Int(2);
      has = r->Int(3) == 1;
      const std::string writer = r->Str(4);
      if (!writer.empty() && writer != owner_ && metrics_ != nullptr) {
        metrics_->CountLeaseHandover();
      }
      break;
    }
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      if (metrics_ != nullptr) metrics_->CountLeaseRefused();
      spdlog::debug("session {}: lease held by {} ({} ms left); turn refused", Hex(id), r->Str(1),
                    r->Int(2));
      return give_up(absl::UnavailableError(absl::StrCat(
          "session_id: the session is in a turn on another replica (its lease ends within ",
          std::max<int64_t>(0, r->Int(2)), " ms); retry")));
    }
    absl::Duration pause = std::min(backoff, deadline - now);
    if (r->Int(2) > 0) pause = std::min(pause, absl::Milliseconds(r->Int(2)));
    absl::SleepFor(std::max(pause, absl::Milliseconds(1)));
    backoff = std::min(backoff * 2, absl::Milliseconds(50));
  }
  {
    absl::MutexLock lock(&mu_);
    entries_[id].token = token;
  }
  absl::Status aligned;
  {
    absl::MutexLock stripe(&Stripe(id));
    aligned = Align(id, version, has);
  }
  if (!aligned.ok()) {
    (void)Eval(kRelease, id, {owner_, std::to_string(token)}, "release");
    return give_up(aligned);
  }
  return hold;
}

absl::Status RedisStore::Sync(const std::string& id) {
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(id);
    if (it != entries_.end() && it->second.hold != 0) return absl::OkStatus();  // ours now
  }
  ASSIGN_OR_RETURN(Reply r, Eval(kVersion, id, {}, "version"));
  absl::MutexLock stripe(&Stripe(id));
  return Align(id, r.Int(0), r.Int(1) == 1);
}

bool RedisStore::Forget(const std::string& id) {
  auto r = Eval(kForget, id, {std::to_string(kTombstoneMs)}, "delete");
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(id);
    if (it != entries_.end()) {
      if (it->second.hold != 0) {
        it->second.known = false;
      } else {
        entries_.erase(it);
      }
    }
  }
  if (!r.ok()) {
    spdlog::warn("session store: deleting {}: {}", Hex(id), std::string(r.status().message()));
    return false;
  }
  return r->integer() == 1;
}

void RedisStore::Release(const std::string& id, int64_t hold) {
  absl::MutexLock lock(&queue_mu_);
  queue_.push_back(Job{id, hold, /*write=*/false, nullptr});
}

void RedisStore::Persist(const std::string& id, std::function<void(absl::Status)> done,
                         int64_t hold) {
  {
    absl::MutexLock lock(&queue_mu_);
    if (!stopping_) {
      queue_.push_back(Job{id, hold, /*write=*/true, std::move(done)});
      return;
    }
  }
  done(absl::UnavailableError("server is stopping; the session was not saved"));
}

void RedisStore::Drop(const std::string& id) {
  (void)engine_->DeleteSession(id);
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it != entries_.end()) it->second.known = false;
}

absl::Status RedisStore::Write(const Job& job) {
  const std::string& id = job.id;
  int64_t token = 0, expected = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(id);
    if (job.hold != 0 && (it == entries_.end() || it->second.hold != job.hold)) {
      return absl::InternalError("session store: a write for a turn that does not hold it");
    }
    if (it != entries_.end()) {
      token = job.hold != 0 ? it->second.token : 0;
      expected = it->second.known ? it->second.version : 0;
    }
  }
  auto release = [&] {
    if (token != 0) (void)Eval(kRelease, id, {owner_, std::to_string(token)}, "release");
  };
  absl::MutexLock stripe(&Stripe(id));
  auto info = engine_->GetSession(id);
  // Deleted meanwhile (or at the end of its turn: delete_session_at_end); a generating session
  // is another turn's, which writes it when it ends.
  if (!info.ok() || info->generating) {
    release();
    return absl::OkStatus();
  }
  auto snap = engine_->SnapshotSession(id);
  if (!snap.ok()) {
    release();
    return snap.status();
  }
  // The snapshot goes to a pending key of this write alone (a key per write: a writer whose
  // lease was taken over can never rename another's bytes into place), and the script renames
  // it over the snapshot only while the lease and fence allow.
  const std::string pending =
      Key(id, absl::StrCat("pending:", owner_, ":", pending_seq_.fetch_add(1) + 1).c_str());
  const std::vector<std::string> keys = {Key(id, "lease"), Key(id, "meta"), Key(id, "snap"),
                                         pending};
  const std::vector<std::string> args = {
      owner_, std::to_string(token), std::to_string(expected),
      std::to_string(absl::ToInt64Milliseconds(options_.session_ttl))};
  auto r = Run("write", [&](Connection* c) {
    return c->SetThenEval(pending, *snap, kPendingMs, kWrite, keys, args);
  });
  if (r.ok() && !r->is_error()) {
    absl::MutexLock lock(&mu_);
    Entry& e = entries_[id];
    e.version = r->integer();
    e.known = true;
    return absl::OkStatus();
  }
  // Not written: this copy is not what the store holds. Dropping it puts the session back to
  // its last stored state (restored on its next use, here or elsewhere).
  Drop(id);
  if (!r.ok()) {
    release();
    spdlog::error("session store: writing {} failed (its last stored state stays): {}", Hex(id),
                  std::string(r.status().message()));
    return absl::UnavailableError(absl::StrCat("not saved to the session store (",
                                               r.status().message(),
                                               "); the session is back at its last saved state"));
  }
  const std::string why = r->error();
  if (absl::StartsWith(why, "RETNET LOST")) {
    if (metrics_ != nullptr) metrics_->CountLeaseLost();
    spdlog::warn("session {}: lease lost during the turn ({}); the turn is not saved", Hex(id),
                 why);
    return absl::UnavailableError(
        "session_id: this replica lost the session's lease during the turn (the turn outlived "
        "--session-lease-ttl-ms without a renewal, or the session was deleted): the turn was not "
        "saved; the session continues from its last saved turn");
  }
  if (absl::StartsWith(why, "RETNET BUSY")) {
    return absl::UnavailableError("session_id: the session is in a turn on another replica; retry");
  }
  if (absl::StartsWith(why, "RETNET EXISTS")) {
    return absl::AlreadyExistsError("session_id: a session with this id exists");
  }
  return absl::UnavailableError(absl::StrCat("not saved to the session store (", why,
                                             "); the session is back at its last saved state"));
}

void RedisStore::WriterLoop() {
  while (true) {
    Job job;
    {
      absl::MutexLock lock(&queue_mu_);
      queue_mu_.Await(absl::Condition(
          +[](RedisStore* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) {
            return self->stopping_ || !self->queue_.empty();
          },
          this));
      if (queue_.empty()) return;  // stopping, nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
    }
    if (job.write) {
      absl::Status s = Write(job);
      if (job.done) job.done(s);
    } else {
      int64_t token = 0;
      {
        absl::MutexLock lock(&mu_);
        auto it = entries_.find(job.id);
        if (it != entries_.end() && it->second.hold == job.hold) token = it->second.token;
      }
      if (token != 0) {
        auto r = Eval(kRelease, job.id, {owner_, std::to_string(token)}, "release");
        if (!r.ok()) {
          spdlog::warn("session store: releasing {}: {} (the lease expires by itself)", Hex(job.id),
                       std::string(r.status().message()));
        }
      }
    }
    if (job.hold != 0) {
      absl::MutexLock lock(&mu_);
      auto it = entries_.find(job.id);
      if (it != entries_.end() && it->second.hold == job.hold) {
        it->second.hold = 0;
        it->second.token = 0;
      }
    }
    absl::MutexLock lock(&queue_mu_);
    --running_;
  }
}

void RedisStore::RenewLoop() {
  const absl::Duration period = options_.lease_ttl / 3;
  const std::string ttl = std::to_string(absl::ToInt64Milliseconds(options_.lease_ttl));
  while (!stop_renew_.WaitForNotificationWithTimeout(period)) {
    std::vector<std::pair<std::string, int64_t>> held;
    {
      absl::MutexLock lock(&mu_);
      for (const auto& [id, e] : entries_) {
        if (e.hold != 0 && e.token != 0) held.emplace_back(id, e.token);
      }
    }
    for (const auto& [id, token] : held) {
      auto r = Eval(kRenew, id, {owner_, std::to_string(token), ttl}, "renew");
      if (r.ok() && r->integer() == 0) {
        bool still = false;
        {
          absl::MutexLock lock(&mu_);
          auto it = entries_.find(id);
          still = it != entries_.end() && it->second.token == token;
        }
        if (still) {
          if (metrics_ != nullptr) metrics_->CountLeaseLost();
          spdlog::warn("session {}: lease lost during a turn; its write will be refused", Hex(id));
        }
      }
    }
    // What is known of sessions the engine no longer holds goes (they are restored, and
    // compared again, on their next use).
    std::set<std::string> present;
    for (const auto& info : engine_->ListSessions()) present.insert(info.id);
    absl::MutexLock lock(&mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.hold == 0 && present.count(it->first) == 0 ? entries_.erase(it)
                                                                 : std::next(it);
    }
  }
}

void RedisStore::Flush() {
  absl::MutexLock lock(&queue_mu_);
  queue_mu_.Await(absl::Condition(
      +[](RedisStore* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) {
        return self->queue_.empty() && self->running_ == 0;
      },
      this));
}

void RedisStore::Stop() {
  absl::MutexLock stop(&stop_mu_);
  {
    absl::MutexLock lock(&queue_mu_);
    if (stopping_ && writers_.empty()) return;
    stopping_ = true;
  }
  for (std::thread& t : writers_) {
    if (t.joinable()) t.join();
  }
  writers_.clear();
  if (!stop_renew_.HasBeenNotified()) stop_renew_.Notify();
  if (renewer_.joinable()) renewer_.join();
  // Leases still held (turns that never ended) go now rather than at their TTL.
  std::vector<std::pair<std::string, int64_t>> held;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, e] : entries_) {
      if (e.hold != 0 && e.token != 0) held.emplace_back(id, e.token);
      e.hold = 0;
    }
  }
  for (const auto& [id, token] : held) {
    (void)Eval(kRelease, id, {owner_, std::to_string(token)}, "release");
  }
}

}  // namespace retnet::server
