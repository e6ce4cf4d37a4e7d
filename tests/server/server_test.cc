// retnet-server over real sockets: servers on 127.0.0.1 port 0 (in-process and as a separate
// process), real gRPC clients, the built-in default model.
#include "server/server.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
#include <utime.h>

#include <atomic>
#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "retnet/v1/retnet.grpc.pb.h"
#include "server/executor.h"
#include "server/state_dir.h"

namespace retnet::server {
namespace {

namespace v1 = ::retnet::v1;

std::string TempDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/" + name + "_XXXXXX";
  EXPECT_NE(::mkdtemp(dir.data()), nullptr);
  return dir;
}

struct Result {
  grpc::Status status;
  std::vector<int64_t> tokens;
  std::string text;
  int chunks = 0;
  v1::Final final;
};

v1::GenerateRequest Greedy(const std::string& session, const std::string& text, int64_t n) {
  v1::GenerateRequest req;
  req.set_session_id(session);
  req.set_create_session(true);
  req.set_text(text);
  req.mutable_sampling()->set_temperature(0);
  req.mutable_stopping()->set_max_new_tokens(n);
  req.mutable_stopping()->set_ignore_eos(true);
  return req;
}

class Client {
 public:
  explicit Client(int port, const std::string& key = "")
      : stub_(v1::RetNet::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                                      grpc::InsecureChannelCredentials()))),
        key_(key) {}

  void Prepare(grpc::ClientContext* ctx, absl::Duration timeout = absl::Seconds(120)) const {
    ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout));
    if (!key_.empty()) ctx->AddMetadata("authorization", "Bearer " + key_);
  }

  // Reads a whole Generate stream; `stop_after` cancels after that many chunks (0 = never).
  Result Generate(const v1::GenerateRequest& req, int stop_after = 0,
                  absl::Duration timeout = absl::Seconds(120)) const {
    grpc::ClientContext ctx;
    Prepare(&ctx, timeout);
    auto reader = stub_->Generate(&ctx, req);
    Result r;
    v1::GenerateResponse msg;
    while (reader->Read(&msg)) {
      if (msg.has_chunk()) {
        ++r.chunks;
        for (const auto& t : msg.chunk().tokens()) {
          r.tokens.push_back(t.id());
          r.text += t.text();
        }
        if (stop_after > 0 && r.chunks >= stop_after) ctx.TryCancel();
      } else {
        r.final = msg.final();
        r.text += msg.final().text();
      }
    }
    r.status = reader->Finish();
    return r;
  }

  v1::RetNet::Stub* stub() const { return stub_.get(); }

  std::string Export(const std::string& id, int* chunks) const {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    v1::ExportSessionRequest req;
    req.set_session_id(id);
    auto reader = stub_->ExportSession(&ctx, req);
    v1::SnapshotChunk chunk;
    std::string data;
    *chunks = 0;
    while (reader->Read(&chunk)) {
      data += chunk.data();
      ++*chunks;
    }
    EXPECT_TRUE(reader->Finish().ok());
    return data;
  }

  grpc::Status Import(const std::string& id, const std::string& data, size_t piece) const {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    v1::Session session;
    auto writer = stub_->ImportSession(&ctx, &session);
    for (size_t off = 0; off < data.size(); off += piece) {
      v1::ImportSessionRequest req;
      if (off == 0) req.set_session_id(id);
      req.set_data(data.substr(off, piece));
      writer->Write(req);
    }
    writer->WritesDone();
    return writer->Finish();
  }

  absl::StatusOr<v1::Session> Get(const std::string& id) const {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    v1::GetSessionRequest req;
    req.set_session_id(id);
    v1::Session s;
    grpc::Status st = stub_->GetSession(&ctx, req, &s);
    if (!st.ok())
      return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
    return s;
  }

 private:
  std::unique_ptr<v1::RetNet::Stub> stub_;
  std::string key_;
};

ServerOptions LocalOptions() {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.max_sessions = 16;
  return o;
}

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = Server::Start(LocalOptions());
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(s).value();
    client_ = std::make_unique<Client>(server_->port());
  }
  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(ServerTest, GreedyStreamIsTheModelsGreedyTextAndSessionsContinue) {
  Result a = client_->Generate(Greedy("a", "And God said", 40));
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  EXPECT_EQ(a.tokens.size(), 40u);
  EXPECT_EQ(a.final.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(a.final.session_id(), "a");
  EXPECT_EQ(a.final.usage().completion_tokens(), 40);
  EXPECT_EQ(a.final.usage().prompt_tokens(), 13);  // BOS + 12 bytes
  EXPECT_EQ(a.final.usage().session_tokens_total(), 53);
  EXPECT_GT(a.final.usage().state_bytes(), 0);
  EXPECT_GT(a.final.timings().first_token_ns(), 0);
  // Byte-level tokens: the streamed text is exactly the bytes of the ids.
  std::string bytes;
  for (int64_t t : a.tokens) bytes.push_back(static_cast<char>(t));
  EXPECT_EQ(a.text, bytes);
  EXPECT_NE(a.text.find("the"), std::string::npos) << a.text;

  // The same request on a fresh session reproduces it; a follow-up turn continues the session.
  Result b = client_->Generate(Greedy("b", "And God said", 40));
  EXPECT_EQ(b.tokens, a.tokens);
  Result a2 = client_->Generate(Greedy("a", " unto", 10));
  ASSERT_TRUE(a2.status.ok());
  EXPECT_EQ(a2.final.usage().session_tokens_total(), 53 + 5 + 10);
  // Token-id prompts work too; a request that names no session is a one-shot request: it
  // leaves no session behind (and names none).
  v1::GenerateRequest by_ids = Greedy("", "", 3);
  by_ids.mutable_tokens()->add_ids('A');
  Result c = client_->Generate(by_ids);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  EXPECT_EQ(c.tokens.size(), 3u);
  EXPECT_TRUE(c.final.session_id().empty());
}

// One-shot requests cost no capacity: 2,000 of them, 8 at a time, against 4 device slots and 4
// host places all succeed, and none leaves a session behind; one cancelled mid-stream and one
// refused after its session was made leave nothing either.
TEST(ServerOneShotTest, ThousandsOfOneShotRequestsLeaveNothingBehind) {
  ServerOptions o = LocalOptions();
  o.max_sessions = 4;
  o.max_host_sessions = 4;
  auto server = Server::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  Client client((*server)->port());
  constexpr int kRequests = 2000, kThreads = 8;
  std::atomic<int> next{0}, ok{0};
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = next++; i < kRequests; i = next++) {
        Result r = client.Generate(Greedy("", i % 2 ? "Hi" : "And", 2));
        if (r.status.ok() && r.tokens.size() == 2 && r.final.session_id().empty()) {
          ++ok;
        } else if (errors[t].empty()) {
          errors[t] = absl::StrCat("request ", i, ": ", r.status.error_message());
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok.load(), kRequests) << absl::StrJoin(errors, "; ");
  // Cancelled after its first chunk, and refused (a bad sampling field) after admission.
  Result cancelled = client.Generate(Greedy("", "And God said", 200), /*stop_after=*/1);
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED);
  v1::GenerateRequest bad = Greedy("", "x", 2);
  bad.mutable_stopping()->add_stop_token_ids(-5);
  EXPECT_EQ(client.Generate(bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Nothing is left, listed or held (the cancelled generation ends within an engine iteration).
  ASSERT_TRUE((*server)->WaitIdle(absl::Seconds(60)));
  EXPECT_EQ((*server)->EngineSessions(), 0);
  grpc::ClientContext ctx;
  client.Prepare(&ctx);
  v1::ListSessionsResponse list;
  ASSERT_TRUE(client.stub()->ListSessions(&ctx, v1::ListSessionsRequest(), &list).ok());
  EXPECT_EQ(list.sessions_size(), 0);
  // And a named session still works, and stays.
  ASSERT_TRUE(client.Generate(Greedy("kept", "And", 2)).status.ok());
  EXPECT_TRUE(client.Get("kept").ok());
}

TEST_F(ServerTest, ConcurrentClientsOnDifferentSessions) {
  std::vector<Result> results(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      results[i] = client_->Generate(Greedy(absl::StrCat("c", i), "In the beginning", 30));
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, results[0].tokens) << "client " << i;
    EXPECT_EQ(results[i].tokens.size(), 30u);
  }
}

TEST_F(ServerTest, ChatStreamsTurnsOnOneSessionLikeGenerate) {
  grpc::ClientContext ctx;
  client_->Prepare(&ctx);
  auto stream = client_->stub()->Chat(&ctx);
  std::vector<std::vector<int64_t>> turns;
  for (const auto& [text, n] :
       std::vector<std::pair<std::string, int>>{{"Behold", 10}, {" and lo", 8}}) {
    v1::ChatRequest req;
    *req.mutable_turn() = Greedy(turns.empty() ? "chat" : "", text, n);
    ASSERT_TRUE(stream->Write(req));
    std::vector<int64_t> tokens;
    v1::GenerateResponse msg;
    while (stream->Read(&msg)) {
      if (msg.has_final()) {
        EXPECT_EQ(msg.final().session_id(), "chat");
        break;
      }
      for (const auto& t : msg.chunk().tokens()) tokens.push_back(t.id());
    }
    turns.push_back(tokens);
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  // The same turns through Generate on another session.
  EXPECT_EQ(client_->Generate(Greedy("gen", "Behold", 10)).tokens, turns[0]);
  EXPECT_EQ(client_->Generate(Greedy("gen", " and lo", 8)).tokens, turns[1]);
  EXPECT_EQ(client_->Get("chat")->position(), client_->Get("gen")->position());
}

TEST_F(ServerTest, ChatEndsCleanlyWhenTheClientHalfClosesRightAfterItsTurn) {
  grpc::ClientContext ctx;
  client_->Prepare(&ctx, absl::Seconds(60));
  auto stream = client_->stub()->Chat(&ctx);
  v1::ChatRequest req;
  *req.mutable_turn() = Greedy("halfclose", "Amen", 6);
  ASSERT_TRUE(stream->Write(req));
  stream->WritesDone();  // send, half-close, then read to the end
  int tokens = 0;
  bool final_seen = false;
  v1::GenerateResponse msg;
  while (stream->Read(&msg)) {
    if (msg.has_final()) final_seen = true;
    tokens += msg.chunk().tokens_size();
  }
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_TRUE(final_seen);
  EXPECT_EQ(tokens, 6);
}

TEST_F(ServerTest, SessionManagementRpcs) {
  grpc::ClientContext c1;
  client_->Prepare(&c1);
  v1::CreateSessionRequest create;
  create.set_session_id("managed");
  v1::Session session;
  ASSERT_TRUE(client_->stub()->CreateSession(&c1, create, &session).ok());
  EXPECT_EQ(session.position(), 0);
  grpc::ClientContext c2;
  client_->Prepare(&c2);
  EXPECT_EQ(client_->stub()->CreateSession(&c2, create, &session).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  ASSERT_TRUE(client_->Generate(Greedy("managed", "Blessed", 8)).status.ok());

  grpc::ClientContext c3;
  client_->Prepare(&c3);
  v1::ForkSessionRequest fork;
  fork.set_session_id("managed");
  fork.set_new_session_id("forked");
  ASSERT_TRUE(client_->stub()->ForkSession(&c3, fork, &session).ok());
  EXPECT_EQ(session.position(), client_->Get("managed")->position());
  EXPECT_EQ(client_->Generate(Greedy("forked", " are", 12)).tokens,
            client_->Generate(Greedy("managed", " are", 12)).tokens);

  grpc::ClientContext c4;
  client_->Prepare(&c4);
  v1::ListSessionsResponse list;
  ASSERT_TRUE(client_->stub()->ListSessions(&c4, v1::ListSessionsRequest(), &list).ok());
  std::vector<std::string> ids;
  for (const auto& s : list.sessions()) ids.push_back(s.session_id());
  EXPECT_EQ(ids, std::vector<std::string>({"forked", "managed"}));

  grpc::ClientContext c5;
  client_->Prepare(&c5);
  v1::DeleteSessionRequest del;
  del.set_session_id("forked");
  v1::DeleteSessionResponse deleted;
  ASSERT_TRUE(client_->stub()->DeleteSession(&c5, del, &deleted).ok());
  EXPECT_EQ(client_->Get("forked").status().code(), absl::StatusCode::kNotFound);

  grpc::ClientContext c6;
  client_->Prepare(&c6);
  v1::ModelInfo info;
  ASSERT_TRUE(client_->stub()->GetModelInfo(&c6, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.family(), "fla");
  EXPECT_EQ(info.vocab_size(), 258);
  EXPECT_EQ(info.state_bytes_per_session(), 4 * 4 * 64 * 128 * 4);
  EXPECT_EQ(info.device_slots(), 16);

  grpc::ClientContext c7, c8;
  client_->Prepare(&c7);
  client_->Prepare(&c8);
  v1::TokenizeRequest tok;
  tok.set_text("Hi");
  tok.set_add_bos(true);
  v1::TokenizeResponse ids_out;
  ASSERT_TRUE(client_->stub()->Tokenize(&c7, tok, &ids_out).ok());
  EXPECT_EQ(std::vector<int64_t>(ids_out.ids().begin(), ids_out.ids().end()),
            std::vector<int64_t>({256, 'H', 'i'}));
  v1::DetokenizeRequest detok;
  for (int64_t id : ids_out.ids()) detok.add_ids(id);
  v1::DetokenizeResponse text;
  ASSERT_TRUE(client_->stub()->Detokenize(&c8, detok, &text).ok());
  EXPECT_EQ(text.text(), "Hi");
}

TEST(ExecutorTest, BoundedQueueRefusesWhenFullAndShutdownDrains) {
  Executor ex("test", /*threads=*/1, /*max_queued=*/1);
  absl::Notification started, release;
  std::atomic<int> ran{0};
  ASSERT_TRUE(ex.Submit([&] {
                  started.Notify();
                  release.WaitForNotificationWithTimeout(absl::Seconds(60));
                  ++ran;
                }).ok());
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(absl::Seconds(60)));
  ASSERT_TRUE(ex.Submit([&] { ++ran; }).ok());  // waits: the only thread is busy
  const absl::Status full = ex.Submit([&] { ++ran; });
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_NE(full.message().find("queued"), absl::string_view::npos) << full;
  release.Notify();
  ex.Shutdown();
  EXPECT_EQ(ran.load(), 2);  // the queued item ran before the threads stopped
  EXPECT_EQ(ex.Submit([] {}).code(), absl::StatusCode::kUnavailable);
}

// Write-through with two writers: three saves of session "x" are queued while the first is held
// in the writer; they must run one at a time and in queue order, while session "y" is written
// by the other writer meanwhile (in parallel). Fails on a writer that takes a session another
// writer holds, on a session's saves out of order, and on writers that do not run in parallel.
TEST(StateDirWritersTest, OneSessionInOrderOtherSessionsInParallel) {
  struct Event {
    std::string id;
    int64_t seq;
    SaveEvent event;
  };
  absl::Mutex mu;
  std::vector<Event> events;
  std::map<std::string, int> queued;
  absl::Notification x_first_begun, x_three_queued, y_begun;
  ServerOptions o = LocalOptions();
  o.state_dir = TempDir("writers");
  o.state_dir_write_through = true;
  o.state_dir_writers = 2;
  o.on_state_dir_save = [&](const std::string& id, int64_t seq, SaveEvent event) {
    bool hold = false;
    {
      absl::MutexLock lock(&mu);
      events.push_back({id, seq, event});
      if (event == SaveEvent::kQueued && ++queued[id] == 3 && id == "x") x_three_queued.Notify();
      if (event == SaveEvent::kBegin && id == "y" && !y_begun.HasBeenNotified()) y_begun.Notify();
      if (event == SaveEvent::kBegin && id == "x" && !x_first_begun.HasBeenNotified()) {
        x_first_begun.Notify();
        hold = true;
      }
    }
    if (hold) {  // bounded: a broken server fails the checks below instead of hanging
      x_three_queued.WaitForNotificationWithTimeout(absl::Seconds(60));
      y_begun.WaitForNotificationWithTimeout(absl::Seconds(60));
    }
  };
  auto s = Server::Start(o);
  ASSERT_TRUE(s.ok()) << s.status();
  std::unique_ptr<Server> server = std::move(s).value();
  Client client(server->port());
  auto create = [&client](const std::string& id) {
    grpc::ClientContext ctx;
    client.Prepare(&ctx);
    v1::CreateSessionRequest req;
    req.set_session_id(id);
    v1::Session session;
    return client.stub()->CreateSession(&ctx, req, &session);
  };
  grpc::Status created_x, created_y;
  Result turn1, turn2;
  std::thread a([&] { created_x = create("x"); });  // save 1 of x: held in the writer
  ASSERT_TRUE(x_first_begun.WaitForNotificationWithTimeout(absl::Seconds(60)));
  // Save 2 of x: a turn on x (its Final waits for the save).
  std::thread b([&] { turn1 = client.Generate(Greedy("x", "In the", 4)); });
  {
    absl::MutexLock lock(&mu);
    auto two = [&queued] { return queued["x"] >= 2; };
    ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(&two), absl::Seconds(60)));
  }
  // Save 3 of x: the session is idle again (only the first turn's Final waits), so a second
  // turn runs and queues its save too.
  std::thread c([&] { turn2 = client.Generate(Greedy("x", " beginning", 4)); });
  ASSERT_TRUE(x_three_queued.WaitForNotificationWithTimeout(absl::Seconds(60)));
  // Another session is saved by the other writer while x's first save is still held.
  created_y = create("y");
  a.join();
  b.join();
  c.join();
  EXPECT_TRUE(created_x.ok()) << created_x.error_message();
  EXPECT_TRUE(created_y.ok()) << created_y.error_message();
  EXPECT_TRUE(turn1.status.ok()) << turn1.status.error_message();
  EXPECT_TRUE(turn2.status.ok()) << turn2.status.error_message();

  absl::MutexLock lock(&mu);
  std::vector<int64_t> x_queued, x_order;
  int x_running = 0;
  bool y_during_x = false;
  for (const Event& e : events) {
    if (e.id == "x" && e.event == SaveEvent::kQueued) x_queued.push_back(e.seq);
    if (e.id == "x" && e.event == SaveEvent::kBegin) {
      EXPECT_EQ(x_running, 0) << "two saves of one session ran at once (seq " << e.seq << ")";
      ++x_running;
      x_order.push_back(e.seq);
    }
    if (e.id == "x" && e.event == SaveEvent::kEnd) --x_running;
    if (e.id == "y" && e.event == SaveEvent::kBegin && x_running > 0) y_during_x = true;
  }
  EXPECT_EQ(x_queued.size(), 3u);
  EXPECT_EQ(x_order, x_queued) << "a session's saves ran out of queue order";
  EXPECT_TRUE(y_during_x) << "session y was not written while x's save was in progress";
}

TEST(ServerExportImportTest, SnapshotMovesBetweenServersInChunks) {
  ServerOptions o = LocalOptions();
  o.snapshot_chunk_bytes = 100'000;  // the 0.5 MiB state travels in several messages
  auto one = Server::Start(o);
  auto two = Server::Start(o);
  ASSERT_TRUE(one.ok() && two.ok());
  Client c1((*one)->port()), c2((*two)->port());
  ASSERT_TRUE(c1.Generate(Greedy("travel", "The LORD is my shepherd", 20)).status.ok());
  int chunks = 0;
  const std::string snapshot = c1.Export("travel", &chunks);
  EXPECT_GT(chunks, 4);
  ASSERT_TRUE(c2.Import("moved", snapshot, 64 * 1024).ok());
  EXPECT_EQ(c2.Get("moved")->position(), c1.Get("travel")->position());
  v1::GenerateRequest next = Greedy("", " I shall", 25);
  next.set_create_session(false);
  next.set_session_id("travel");
  Result here = c1.Generate(next);
  next.set_session_id("moved");
  Result there = c2.Generate(next);
  ASSERT_TRUE(here.status.ok() && there.status.ok());
  EXPECT_EQ(here.tokens, there.tokens);
  // A corrupted snapshot is refused.
  std::string bad = snapshot;
  bad[bad.size() / 3] ^= 1;
  EXPECT_EQ(c2.Import("bad", bad, 1 << 20).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ServerTest, CancellationMidStreamFreesTheSession) {
  Result r = client_->Generate(Greedy("long", "Long", 4000), /*stop_after=*/2);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_LT(r.tokens.size(), 4000u);
  // The engine notices within an iteration; wait (bounded) for the session to be idle again.
  bool idle = false;
  for (int i = 0; i < 500 && !idle; ++i) {
    idle = !client_->Get("long")->generating();
    if (!idle) absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_TRUE(idle);
  Result next = client_->Generate(Greedy("long", "!", 3));
  EXPECT_TRUE(next.status.ok()) << next.status.error_message();
}

TEST_F(ServerTest, DeadlineExceeded) {
  Result r = client_->Generate(Greedy("slow", "Slow", 4000), 0, absl::Milliseconds(300));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(r.tokens.size(), 4000u);
}

TEST_F(ServerTest, BadInputsGetTheirStatusWhileOtherStreamsContinue) {
  Result background;
  std::thread t([&] { background = client_->Generate(Greedy("bg", "Meanwhile", 300)); });
  v1::GenerateRequest bad = Greedy("x", "hi", 5);
  bad.mutable_sampling()->set_temperature(-1);
  Result r = client_->Generate(bad);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("temperature"), std::string::npos)
      << r.status.error_message();
  bad = Greedy("x", "hi", 5);
  bad.mutable_sampling()->set_top_p(1.5);
  EXPECT_EQ(client_->Generate(bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = Greedy("x", "", 5);
  bad.mutable_tokens()->add_ids(100000);
  r = client_->Generate(bad);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("tokens.ids[0]"), std::string::npos)
      << r.status.error_message();
  bad = Greedy("missing", "hi", 5);
  bad.set_create_session(false);
  EXPECT_EQ(client_->Generate(bad).status.error_code(), grpc::StatusCode::NOT_FOUND);
  bad = Greedy("x", "hi", 5);
  bad.mutable_stopping()->set_max_new_tokens(1'000'000);
  EXPECT_EQ(client_->Generate(bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = Greedy("bad id", "hi", 5);
  EXPECT_EQ(client_->Generate(bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // A second generation on a busy session.
  Result busy;
  for (int i = 0; i < 500; ++i) {  // bounded: until the background stream is known to run
    auto s = client_->Get("bg");
    if (s.ok() && s->generating()) {
      busy = client_->Generate(Greedy("bg", "again", 3));
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  t.join();
  EXPECT_EQ(busy.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(background.status.ok()) << background.status.error_message();
  EXPECT_EQ(background.tokens.size(), 300u);
}

TEST(ServerAuthTest, KeysAuthenticateAndSessionsArePrivate) {
  const std::string dir = TempDir("keys");
  std::ofstream(dir + "/keys") << "# two keys\nalpha-key\nbeta-key\n";
  ServerOptions o = LocalOptions();
  o.api_keys_file = dir + "/keys";
  auto server = Server::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  Client anonymous((*server)->port()), wrong((*server)->port(), "nope"),
      alpha((*server)->port(), "alpha-key"), beta((*server)->port(), "beta-key");
  EXPECT_EQ(anonymous.Generate(Greedy("s", "hi", 2)).status.error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(wrong.Generate(Greedy("s", "hi", 2)).status.error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(alpha.Generate(Greedy("mine", "hi", 2)).status.ok());
  EXPECT_TRUE(alpha.Get("mine").ok());
  EXPECT_EQ(beta.Get("mine").status().code(), absl::StatusCode::kNotFound);
  v1::GenerateRequest steal = Greedy("mine", "hi", 2);
  steal.set_create_session(false);
  EXPECT_EQ(beta.Generate(steal).status.error_code(), grpc::StatusCode::NOT_FOUND);
  grpc::ClientContext ctx;
  beta.Prepare(&ctx);
  v1::ListSessionsResponse list;
  ASSERT_TRUE(beta.stub()->ListSessions(&ctx, v1::ListSessionsRequest(), &list).ok());
  EXPECT_EQ(list.sessions_size(), 0);
}

// Parses Prometheus text exposition: every sample line is `name{labels} value`; returns the
// samples by "name{labels}".
std::map<std::string, double> ParsePrometheus(const std::string& text) {
  static const std::regex kSample(
      R"(^([a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})?) (-?[0-9.e+]+|\+Inf|NaN)$)");
  std::map<std::string, double> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) continue;
    std::smatch m;
    EXPECT_TRUE(std::regex_match(line, m, kSample)) << "not a Prometheus sample: " << line;
    if (m.size() > 3) out[m[1]] = std::stod(m[3]);
  }
  return out;
}

TEST(ServerMetricsTest, MetricsParseAndCountersMove) {
  ServerOptions o = LocalOptions();
  o.metrics_listen = "127.0.0.1:0";
  auto server = Server::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->metrics_port(), 0);
  httplib::Client http("127.0.0.1", (*server)->metrics_port());
  auto before = http.Get("/metrics");
  ASSERT_TRUE(before && before->status == 200);
  auto m0 = ParsePrometheus(before->body);
  EXPECT_EQ(m0["retnet_generation_tokens_total"], 0);
  Client c((*server)->port());
  ASSERT_TRUE(c.Generate(Greedy("m", "Praise", 25)).status.ok());
  v1::GenerateRequest bad = Greedy("m2", "x", 3);
  bad.mutable_sampling()->set_top_p(2);
  EXPECT_FALSE(c.Generate(bad).status.ok());
  auto after = http.Get("/metrics");
  ASSERT_TRUE(after && after->status == 200);
  auto m1 = ParsePrometheus(after->body);
  EXPECT_EQ(m1["retnet_generation_tokens_total"], 25);
  EXPECT_EQ(m1["retnet_time_to_first_token_seconds_count"], 1);
  EXPECT_EQ(m1["retnet_inter_token_latency_seconds_count"], 24);
  EXPECT_EQ(m1["retnet_e2e_request_latency_seconds_count"], 1);
  EXPECT_EQ(m1["retnet_requests_total{code=\"OK\"}"], 1);
  EXPECT_EQ(m1["retnet_requests_total{code=\"INVALID_ARGUMENT\"}"], 1);
  EXPECT_EQ(m1["retnet_sessions_resident"], 1);
  EXPECT_EQ(m1["retnet_state_bytes_resident"], m1["retnet_state_bytes_per_session"]);
  auto health = http.Get("/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
}

TEST(ServerTlsTest, TlsClientsConnectAndPlaintextClientsDoNot) {
  const std::string dir = TempDir("tls");
  const std::string cmd =
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
      "-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout " +
      dir + "/key.pem -out " + dir + "/cert.pem 2>/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "openssl could not make a test certificate";
  ServerOptions o = LocalOptions();
  o.tls_cert = dir + "/cert.pem";
  o.tls_key = dir + "/key.pem";
  auto server = Server::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  std::ifstream in(dir + "/cert.pem");
  std::string cert((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = cert;
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  auto secure = v1::RetNet::NewStub(grpc::CreateCustomChannel(
      absl::StrCat("127.0.0.1:", (*server)->port()), grpc::SslCredentials(ssl), args));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::ModelInfo info;
  ASSERT_TRUE(secure->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.vocab_size(), 258);
  Client plain((*server)->port());
  grpc::ClientContext ctx2;
  plain.Prepare(&ctx2, absl::Seconds(5));
  EXPECT_FALSE(plain.stub()->GetModelInfo(&ctx2, v1::GetModelInfoRequest(), &info).ok());
}

// grpc.health.v1.Health/Check through the generic stub (Debian ships no health stubs):
// the request {service: ""} is empty on the wire; SERVING is field 1 = 1, i.e. bytes 08 01.
int HealthStatus(int port) {
  auto channel =
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::ByteBuffer request, response;
  grpc::Slice empty("");
  request = grpc::ByteBuffer(&empty, 1);
  grpc::Status status;
  absl::Notification done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   status = s;
                   done.Notify();
                 });
  done.WaitForNotification();
  if (!status.ok()) return -static_cast<int>(status.error_code());
  std::vector<grpc::Slice> slices;
  (void)response.Dump(&slices);
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes.size() == 2 && bytes[0] == 0x08 ? bytes[1] : 0;
}

TEST(ServerLoadingTest, NotServingAndUnavailableWhileTheModelLoads) {
  ServerOptions o = LocalOptions();
  int health_while_loading = -1;
  grpc::StatusCode generate_while_loading = grpc::StatusCode::OK;
  o.on_listening = [&](int port) {
    health_while_loading = HealthStatus(port);
    generate_while_loading = Client(port).Generate(Greedy("early", "hi", 2)).status.error_code();
  };
  auto server = Server::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ(health_while_loading, 2);  // NOT_SERVING
  EXPECT_EQ(generate_while_loading, grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(HealthStatus((*server)->port()), 1);  // SERVING once loaded
  EXPECT_TRUE(Client((*server)->port()).Generate(Greedy("later", "hi", 2)).status.ok());
}

TEST_F(ServerTest, HealthReportsServing) { EXPECT_EQ(HealthStatus(server_->port()), 1); }

// The real binary: SIGTERM drains and saves every session; a restarted server restores them
// and they continue exactly as if there had been no restart.
class Process {
 public:
  Process(const std::string& state_dir, const std::string& port_file,
          const std::string& snapshot_interval = "60") {
    pid_ = ::fork();
    if (pid_ == 0) {
      const std::string bin = std::string(RETNET_SERVER_BIN);
      ::execl(bin.c_str(), bin.c_str(), "--listen", "127.0.0.1:0", "--state-dir", state_dir.c_str(),
              "--port-file", port_file.c_str(), "--metrics-listen", "127.0.0.1:0", "--http-listen",
              "127.0.0.1:0", "--snapshot-interval-s", snapshot_interval.c_str(), "--log-level",
              "info", static_cast<char*>(nullptr));
      ::_exit(127);
    }
  }
  void Kill() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  int Terminate() {
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    return status;
  }
  ~Process() {
    if (::waitpid(pid_, nullptr, WNOHANG) == 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

 private:
  pid_t pid_;
};

int WaitForPort(const std::string& port_file) {
  for (int i = 0; i < 3000; ++i) {  // bounded: up to 30 s for the model to load
    std::ifstream in(port_file);
    int port = 0;
    if (in >> port && port > 0) return port;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return 0;
}

TEST(ServerRestartTest, SigtermSavesSessionsAndARestartContinuesBitExactly) {
  const std::string dir = TempDir("state");
  std::string first_snapshot;
  std::vector<int64_t> continued_before;
  {
    Process p(dir, dir + "/port1");
    const int port = WaitForPort(dir + "/port1");
    ASSERT_GT(port, 0);
    Client c(port);
    ASSERT_TRUE(c.Generate(Greedy("keep", "Let there be light", 15)).status.ok());
    ASSERT_TRUE(c.Generate(Greedy("other", "Amen", 5)).status.ok());
    int chunks = 0;
    first_snapshot = c.Export("keep", &chunks);
    // What the uninterrupted server would say next, measured on a fork.
    grpc::ClientContext ctx;
    c.Prepare(&ctx);
    v1::ForkSessionRequest fork;
    fork.set_session_id("keep");
    fork.set_new_session_id("probe");
    v1::Session s;
    ASSERT_TRUE(c.stub()->ForkSession(&ctx, fork, &s).ok());
    v1::GenerateRequest next = Greedy("probe", ", and", 20);
    next.set_create_session(false);
    continued_before = c.Generate(next).tokens;
    v1::DeleteSessionRequest del;
    del.set_session_id("probe");
    grpc::ClientContext ctx2;
    c.Prepare(&ctx2);
    v1::DeleteSessionResponse deleted;
    ASSERT_TRUE(c.stub()->DeleteSession(&ctx2, del, &deleted).ok());
    const int status = p.Terminate();
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  }
  Process p(dir, dir + "/port2");
  const int port = WaitForPort(dir + "/port2");
  ASSERT_GT(port, 0);
  Client c(port);
  EXPECT_TRUE(c.Get("other").ok());
  EXPECT_EQ(c.Get("probe").status().code(), absl::StatusCode::kNotFound);
  int chunks = 0;
  EXPECT_EQ(c.Export("keep", &chunks), first_snapshot);  // bit-exact state and sampler
  v1::GenerateRequest next = Greedy("keep", ", and", 20);
  next.set_create_session(false);
  EXPECT_EQ(c.Generate(next).tokens, continued_before);
  // The snapshot exported by the first process imports into the second and continues the same.
  ASSERT_TRUE(c.Import("imported", first_snapshot, 100'000).ok());
  next.set_session_id("imported");
  EXPECT_EQ(c.Generate(next).tokens, continued_before);
  EXPECT_EQ(p.Terminate(), 0);
}

TEST(ServerRestartTest, AfterSigkillThePeriodicSnapshotIsRestored) {
  const std::string dir = TempDir("crash");
  std::string saved;
  {
    Process p(dir, dir + "/port1", "0.1");
    const int port = WaitForPort(dir + "/port1");
    ASSERT_GT(port, 0);
    Client c(port);
    ASSERT_TRUE(c.Generate(Greedy("durable", "Thou shalt", 12)).status.ok());
    int chunks = 0;
    saved = c.Export("durable", &chunks);
    // Wait (bounded) until a periodic snapshot of exactly this state is on disk.
    std::string hex;
    for (unsigned char ch : std::string("durable")) hex += absl::StrFormat("%02x", ch);
    bool on_disk = false;
    for (int i = 0; i < 1000 && !on_disk; ++i) {
      std::ifstream in(dir + "/" + hex + ".snap", std::ios::binary);
      std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      on_disk = bytes == saved;
      if (!on_disk) absl::SleepFor(absl::Milliseconds(10));
    }
    ASSERT_TRUE(on_disk);
    p.Kill();  // no drain, no final snapshot
  }
  // A half-written temporary file from the crash must not stop a clean start; an hour-old one
  // of the server's own naming is removed, a fresh one (another replica's write) is not.
  std::ofstream(dir + "/00.snap.tmp") << "partial";
  std::ofstream(dir + "/.tmp.1-dead.7") << "partial";
  std::ofstream(dir + "/.tmp.2-live.1") << "partial";
  const struct utimbuf old_times = {::time(nullptr) - 7200, ::time(nullptr) - 7200};
  ASSERT_EQ(::utime((dir + "/.tmp.1-dead.7").c_str(), &old_times), 0);
  std::ofstream(dir + "/6a756e6b.snap") << "not a snapshot";
  Process p(dir, dir + "/port2", "0.1");
  const int port = WaitForPort(dir + "/port2");
  ASSERT_GT(port, 0);
  Client c(port);
  int chunks = 0;
  EXPECT_EQ(c.Export("durable", &chunks), saved);
  EXPECT_FALSE(std::ifstream(dir + "/.tmp.1-dead.7").good());
  EXPECT_TRUE(std::ifstream(dir + "/.tmp.2-live.1").good());
  // Skipped at start; asked for by name, it is lost state (not a fresh session), and deleting
  // the session removes the file.
  EXPECT_EQ(c.Get("junk").status().code(), absl::StatusCode::kDataLoss);
  {
    grpc::ClientContext ctx;
    c.Prepare(&ctx);
    v1::DeleteSessionRequest del;
    del.set_session_id("junk");
    v1::DeleteSessionResponse resp;
    EXPECT_TRUE(c.stub()->DeleteSession(&ctx, del, &resp).ok());
  }
  EXPECT_EQ(c.Get("junk").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(p.Terminate(), 0);
}

}  // namespace
}  // namespace retnet::server
