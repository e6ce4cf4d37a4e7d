// The serving engine against a real (small, random-weight) RetNet on the CPU: batching equals
// running alone, multi-turn equals one parallel pass, fork/snapshot/spill continue exactly, and
// capacity, queue, TTL, cancellation, deadline and busy cases give their defined outcomes.
#include "engine/engine.h"

#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "common/utf8.h"
#include "engine/snapshot.h"
#include "model/retnet.h"
#include "model/tokenizer.h"

namespace retnet::engine {
namespace {

constexpr int64_t kVocab = 258;

std::shared_ptr<const model::RetNet> SmallModel(uint64_t seed = 5) {
  model::ModelConfig c;
  c.num_layers = 2;
  c.hidden_size = 32;
  c.num_heads = 2;
  c.key_dim = 32;
  c.value_dim = 64;
  c.vocab_size = kVocab;
  c.ffn = model::FfnKind::kSwiGlu;
  c.ffn_dim = 64;
  auto m = model::RetNet::CreateRandom(c, seed, {});
  EXPECT_TRUE(m.ok()) << m.status();
  return std::shared_ptr<const model::RetNet>(std::move(m).value());
}

// Records one generation; waits are bounded.
class TestSink : public TokenSink {
 public:
  void OnToken(TokenEvent e) override {
    absl::MutexLock lock(&mu_);
    events_.push_back(std::move(e));
  }
  void OnFinish(Finish f) override {
    absl::MutexLock lock(&mu_);
    finish_ = std::move(f);
  }
  bool WaitFinish(absl::Duration timeout = absl::Seconds(120)) {
    absl::MutexLock lock(&mu_);
    return mu_.AwaitWithTimeout(absl::Condition(
                                    +[](TestSink* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
                                      return s->finish_.has_value();
                                    },
                                    this),
                                timeout);
  }
  bool WaitTokens(size_t n, absl::Duration timeout = absl::Seconds(120)) {
    absl::MutexLock lock(&mu_);
    auto ready = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return events_.size() >= n || finish_.has_value();
    };
    return mu_.AwaitWithTimeout(absl::Condition(&ready), timeout) && events_.size() >= n;
  }
  std::vector<int64_t> tokens() {
    absl::MutexLock lock(&mu_);
    std::vector<int64_t> out;
    for (const auto& e : events_) out.push_back(e.token);
    return out;
  }
  std::vector<float> logprobs() {
    absl::MutexLock lock(&mu_);
    std::vector<float> out;
    for (const auto& e : events_) out.push_back(e.logprob);
    return out;
  }
  std::string bytes() {
    absl::MutexLock lock(&mu_);
    std::string out;
    for (const auto& e : events_) out += e.bytes;
    return out;
  }
  std::string text() {
    absl::MutexLock lock(&mu_);
    std::string out;
    for (const auto& e : events_) out += e.text;
    return out + (finish_ ? finish_->text : "");
  }
  Finish finish() {
    absl::MutexLock lock(&mu_);
    return *finish_;
  }

 private:
  absl::Mutex mu_;
  std::vector<TokenEvent> events_ ABSL_GUARDED_BY(mu_);
  std::optional<Finish> finish_ ABSL_GUARDED_BY(mu_);
};

std::vector<int64_t> Bytes(const std::string& s) {
  return std::vector<int64_t>(s.begin(), s.end());
}

SamplingParams Greedy(int64_t n) {
  SamplingParams p;
  p.temperature = 0;
  p.max_new_tokens = n;
  p.ignore_eos = true;
  p.logprobs = 0;
  return p;
}

class EngineTest : public ::testing::Test {
 protected:
  std::unique_ptr<Engine> MakeEngine(EngineOptions options = {},
                                     std::shared_ptr<const model::RetNet> m = nullptr) {
    if (options.prefill_token_budget == EngineOptions{}.prefill_token_budget)
      options.prefill_token_budget = 48;
    options.prefill_chunk_size = 16;
    auto e = Engine::Create(m ? m : model_, tokenizer_, options);
    EXPECT_TRUE(e.ok()) << e.status();
    return std::move(e).value();
  }

  // Runs one turn to completion.
  std::shared_ptr<TestSink> Run(Engine& e, const std::string& session,
                                const std::vector<int64_t>& prompt, const SamplingParams& p) {
    auto sink = std::make_shared<TestSink>();
    auto g = e.Submit({session, prompt, p, std::nullopt}, sink);
    EXPECT_TRUE(g.ok()) << g.status();
    EXPECT_TRUE(sink->WaitFinish());
    return sink;
  }

  std::shared_ptr<const model::RetNet> model_ = SmallModel();
  std::shared_ptr<const model::Tokenizer> tokenizer_ = model::MakeByteTokenizer(256, 257);
};

TEST_F(EngineTest, BatchedSessionsJoiningAndLeavingEqualEachAlone) {
  const std::vector<std::string> prompts = {
      "Hello there",
      "A much longer prompt that needs several prefill chunks "
      "because the budget is small",
      "x", "RetNet"};
  const std::vector<int64_t> lengths = {12, 30, 7, 22};
  std::vector<std::vector<int64_t>> alone;
  {
    auto e = MakeEngine();
    for (size_t i = 0; i < prompts.size(); ++i) {
      ASSERT_TRUE(e->CreateSession("s" + std::to_string(i)).ok());
      alone.push_back(
          Run(*e, "s" + std::to_string(i), Bytes(prompts[i]), Greedy(lengths[i]))->tokens());
      ASSERT_EQ(static_cast<int64_t>(alone.back().size()), lengths[i]);
    }
  }
  auto e = MakeEngine();
  std::vector<std::shared_ptr<TestSink>> sinks;
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(e->CreateSession("s" + std::to_string(i)).ok());
    sinks.push_back(std::make_shared<TestSink>());
  }
  // Sessions 0 and 1 start together; 2 joins once 0 has produced 4 tokens, 3 once 1 has 10.
  ASSERT_TRUE(
      e->Submit({"s0", Bytes(prompts[0]), Greedy(lengths[0]), std::nullopt}, sinks[0]).ok());
  ASSERT_TRUE(
      e->Submit({"s1", Bytes(prompts[1]), Greedy(lengths[1]), std::nullopt}, sinks[1]).ok());
  ASSERT_TRUE(sinks[0]->WaitTokens(4));
  ASSERT_TRUE(
      e->Submit({"s2", Bytes(prompts[2]), Greedy(lengths[2]), std::nullopt}, sinks[2]).ok());
  ASSERT_TRUE(sinks[1]->WaitTokens(10));
  ASSERT_TRUE(
      e->Submit({"s3", Bytes(prompts[3]), Greedy(lengths[3]), std::nullopt}, sinks[3]).ok());
  for (size_t i = 0; i < sinks.size(); ++i) {
    ASSERT_TRUE(sinks[i]->WaitFinish());
    EXPECT_EQ(sinks[i]->finish().reason, FinishReason::kLength);
    EXPECT_EQ(sinks[i]->tokens(), alone[i]) << "session " << i;
  }
}

// A sink that notes how many tokens another generation had produced when its own first arrived.
class WatchingSink : public TestSink {
 public:
  explicit WatchingSink(TestSink* other) : other_(other) {}
  void OnToken(TokenEvent e) override {
    if (!seen_first_) {
      seen_first_ = true;
      other_tokens_at_first_ = other_->tokens().size();
    }
    TestSink::OnToken(std::move(e));
  }
  size_t other_tokens_at_first() const { return other_tokens_at_first_; }

 private:
  TestSink* other_;
  bool seen_first_ = false;  // engine thread only
  size_t other_tokens_at_first_ = 0;
};

TEST_F(EngineTest, LongPromptIsPrefilledInBudgetedChunksBetweenDecodeSteps) {
  auto e = MakeEngine();  // budget 48 prompt tokens per iteration
  ASSERT_TRUE(e->CreateSession("talker").ok());
  ASSERT_TRUE(e->CreateSession("reader").ok());
  auto talker = std::make_shared<TestSink>();
  ASSERT_TRUE(e->Submit({"talker", Bytes("go"), Greedy(200), std::nullopt}, talker).ok());
  ASSERT_TRUE(talker->WaitTokens(1));
  auto reader = std::make_shared<WatchingSink>(talker.get());
  std::vector<int64_t> long_prompt(960, 'a');  // 20 iterations of prefill at 48 tokens each
  ASSERT_TRUE(e->Submit({"reader", long_prompt, Greedy(1), std::nullopt}, reader).ok());
  ASSERT_TRUE(reader->WaitFinish());
  // The talker kept decoding, one token per iteration, while the prompt was prefilled.
  EXPECT_GE(reader->other_tokens_at_first(), 20u);
  ASSERT_TRUE(talker->WaitFinish());
  EXPECT_EQ(e->GetSession("reader")->position, 960);
}

TEST_F(EngineTest, MultiTurnEqualsOneParallelPassOverTheConversation) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("chat").ok());
  const std::vector<int64_t> p1 = Bytes("First turn of the conversation. "),
                             p2 = Bytes(" And a second one.");
  auto t1 = Run(*e, "chat", p1, Greedy(9));
  auto t2 = Run(*e, "chat", p2, Greedy(11));
  // The conversation: p1, o1, p2, o2. The state holds all but the last token (pending).
  std::vector<int64_t> convo = p1;
  for (int64_t t : t1->tokens()) convo.push_back(t);
  convo.insert(convo.end(), p2.begin(), p2.end());
  for (int64_t t : t2->tokens()) convo.push_back(t);
  auto info = e->GetSession("chat");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->position, static_cast<int64_t>(convo.size()) - 1);
  EXPECT_EQ(info->pending_token, convo.back());
  EXPECT_EQ(t2->finish().position, info->position);

  c10::InferenceMode guard;
  at::Tensor tokens = at::tensor(convo, at::kLong).view({1, -1});
  at::Tensor logp = at::log_softmax(*model_->Parallel(tokens), -1)[0];
  auto check = [&](const std::vector<int64_t>& out, const std::vector<float>& lps,
                   int64_t first_pos) {
    for (size_t i = 0; i < out.size(); ++i) {
      at::Tensor row = logp[first_pos + static_cast<int64_t>(i) - 1];
      EXPECT_EQ(row.argmax().item<int64_t>(), out[i]) << "token " << i;
      EXPECT_NEAR(row[out[i]].item<float>(), lps[i], 1e-4) << "logprob " << i;
    }
  };
  check(t1->tokens(), t1->logprobs(), static_cast<int64_t>(p1.size()));
  check(t2->tokens(), t2->logprobs(),
        static_cast<int64_t>(p1.size() + t1->tokens().size() + p2.size()));
}

SamplingParams Seeded(uint64_t seed, int64_t n) {
  SamplingParams p;
  p.temperature = 1.0;
  p.top_p = 0.95;
  p.seed = seed;
  p.max_new_tokens = n;
  p.ignore_eos = true;
  p.logprobs = 2;
  return p;
}

TEST_F(EngineTest, ForkWithTheSameSeedContinuesIdentically) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("a").ok());
  Run(*e, "a", Bytes("Once upon a time"), Seeded(1, 6));
  auto fork = e->ForkSession("a", "b");
  ASSERT_TRUE(fork.ok()) << fork.status();
  EXPECT_EQ(fork->position, e->GetSession("a")->position);
  auto a = Run(*e, "a", Bytes(" there"), Seeded(42, 25));
  auto b = Run(*e, "b", Bytes(" there"), Seeded(42, 25));
  EXPECT_EQ(a->tokens(), b->tokens());
  EXPECT_EQ(a->logprobs(), b->logprobs());
  auto c = Run(*e, "b", Bytes(" there"), Seeded(43, 25));  // another seed, another path
  EXPECT_NE(c->tokens(), a->tokens());
}

TEST_F(EngineTest, SnapshotRestoreContinuesBitExactly) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("a").ok());
  Run(*e, "a", Bytes("The state of a session"), Seeded(3, 5));
  auto snap = e->SnapshotSession("a");
  ASSERT_TRUE(snap.ok()) << snap.status();
  auto restored = e->RestoreSession(*snap, "r");
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(restored->position, e->GetSession("a")->position);
  // No seed on the request: both continue the snapshotted sampler state.
  SamplingParams p = Seeded(0, 20);
  p.seed.reset();
  auto a = Run(*e, "a", Bytes(" goes on"), p);
  auto r = Run(*e, "r", Bytes(" goes on"), p);
  EXPECT_EQ(a->tokens(), r->tokens());
  EXPECT_EQ(a->logprobs(), r->logprobs());  // bit-exact

  // Corruption and a foreign model are refused.
  std::string bad = *snap;
  bad[bad.size() / 2] ^= 0x40;
  EXPECT_EQ(e->RestoreSession(bad).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e->RestoreSession(snap->substr(0, 20)).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto other = MakeEngine({}, SmallModel(99));
  auto foreign = other->RestoreSession(*snap);
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(foreign.status().message().find("different model"), std::string::npos);
}

TEST_F(EngineTest, SpilledSessionComesBackBitExactly) {
  EngineOptions small;
  small.max_sessions = 2;
  small.max_host_sessions = 4;
  auto e = MakeEngine(small);
  auto reference = MakeEngine();
  for (Engine* engine : {e.get(), reference.get()}) {
    ASSERT_TRUE(engine->CreateSession("a").ok());
    Run(*engine, "a", Bytes("spill me to the host"), Greedy(5));
  }
  // Two more sessions on a 2-slot pool push "a" (least recently used) out to host memory.
  ASSERT_TRUE(e->CreateSession("b").ok());
  ASSERT_TRUE(e->CreateSession("c").ok());
  EXPECT_FALSE(e->GetSession("a")->resident);
  EXPECT_EQ(e->Stats().spilled, 1);
  auto back = Run(*e, "a", Bytes(" and back"), Greedy(15));
  auto ref = Run(*reference, "a", Bytes(" and back"), Greedy(15));
  EXPECT_TRUE(e->GetSession("a")->resident);
  EXPECT_EQ(back->tokens(), ref->tokens());
  EXPECT_EQ(back->logprobs(), ref->logprobs());
}

TEST_F(EngineTest, FullPoolIsResourceExhaustedWithTheNumbers) {
  EngineOptions small;
  small.max_sessions = 2;
  small.max_host_sessions = 0;
  auto e = MakeEngine(small);
  ASSERT_TRUE(e->CreateSession("a").ok());
  ASSERT_TRUE(e->CreateSession("b").ok());
  auto c = e->CreateSession("c");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(c.status().message().find("2 device slots"), std::string::npos) << c.status();
  EXPECT_EQ(e->CreateSession("a").status().code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(e->DeleteSession("a").ok());
  EXPECT_TRUE(e->CreateSession("c").ok());
  const PoolStats stats = e->Stats();
  EXPECT_EQ(stats.device_slots, 2);
  EXPECT_EQ(stats.free_slots, 0);
  EXPECT_EQ(stats.state_bytes_per_session, model_->StateBytesPerSession());
}

TEST_F(EngineTest, MemoryBudgetSizesThePool) {
  EngineOptions budget;
  budget.state_memory_bytes = 5 * model_->StateBytesPerSession() + 100;
  EXPECT_EQ(MakeEngine(budget)->Stats().device_slots, 5);
}

TEST_F(EngineTest, QueueLimitAndBusySession) {
  EngineOptions paused;
  paused.max_queued_requests = 1;
  paused.start_paused = true;
  auto e = MakeEngine(paused);
  ASSERT_TRUE(e->CreateSession("a").ok());
  ASSERT_TRUE(e->CreateSession("b").ok());
  auto sink_a = std::make_shared<TestSink>();
  ASSERT_TRUE(e->Submit({"a", Bytes("hi"), Greedy(3), std::nullopt}, sink_a).ok());
  auto busy =
      e->Submit({"a", Bytes("again"), Greedy(3), std::nullopt}, std::make_shared<TestSink>());
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(e->DeleteSession("a").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(e->SnapshotSession("a").status().code(), absl::StatusCode::kFailedPrecondition);
  auto full = e->Submit({"b", Bytes("hi"), Greedy(3), std::nullopt}, std::make_shared<TestSink>());
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  e->Start();
  ASSERT_TRUE(sink_a->WaitFinish());
  EXPECT_EQ(sink_a->tokens().size(), 3u);
  EXPECT_TRUE(
      e->Submit({"b", Bytes("hi"), Greedy(3), std::nullopt}, std::make_shared<TestSink>()).ok());
}

TEST_F(EngineTest, IdleSessionsExpireAfterTheTtl) {
  EngineOptions ttl;
  ttl.session_ttl = absl::Minutes(5);
  auto e = MakeEngine(ttl);
  ASSERT_TRUE(e->CreateSession("old").ok());
  EXPECT_EQ(e->ExpireIdleSessions(absl::Now() + absl::Minutes(4)), 0);
  EXPECT_EQ(e->ExpireIdleSessions(absl::Now() + absl::Minutes(6)), 1);
  EXPECT_EQ(e->GetSession("old").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(e->Stats().free_slots, e->Stats().device_slots);
}

TEST_F(EngineTest, CancelledGenerationLeavesAUsableSession) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("a").ok());
  const std::vector<int64_t> prompt = Bytes("Tell me a very long story");
  auto sink = std::make_shared<TestSink>();
  auto g = e->Submit({"a", prompt, Greedy(4000), std::nullopt}, sink);
  ASSERT_TRUE(g.ok());
  ASSERT_TRUE(sink->WaitTokens(3));
  (*g)->Cancel();
  ASSERT_TRUE(sink->WaitFinish());
  const Finish f = sink->finish();
  EXPECT_EQ(f.reason, FinishReason::kCancelled);
  const std::vector<int64_t> out = sink->tokens();
  ASSERT_GE(out.size(), 3u);
  ASSERT_LT(out.size(), 4000u);
  // Defined semantics: every produced token is in the conversation; the last one is pending.
  auto info = e->GetSession("a");
  EXPECT_EQ(info->position, static_cast<int64_t>(prompt.size() + out.size()) - 1);
  EXPECT_EQ(info->pending_token, out.back());
  EXPECT_FALSE(info->generating);
  // And the session continues exactly like the uncancelled conversation would.
  auto next = Run(*e, "a", Bytes("!"), Greedy(4));
  std::vector<int64_t> convo = prompt;
  convo.insert(convo.end(), out.begin(), out.end());
  convo.push_back('!');
  c10::InferenceMode guard;
  at::Tensor logits = *model_->Parallel(at::tensor(convo, at::kLong).view({1, -1}));
  EXPECT_EQ(logits[0][-1].argmax().item<int64_t>(), next->tokens()[0]);
}

TEST_F(EngineTest, DeadlineEndsTheGenerationAndKeepsTheSession) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("a").ok());
  auto sink = std::make_shared<TestSink>();
  ASSERT_TRUE(e->Submit({"a", Bytes("late"), Greedy(4000), absl::Now()}, sink).ok());
  ASSERT_TRUE(sink->WaitFinish());
  EXPECT_EQ(sink->finish().reason, FinishReason::kDeadline);
  EXPECT_LT(sink->tokens().size(), 4000u);
  EXPECT_EQ(Run(*e, "a", Bytes("x"), Greedy(2))->tokens().size(), 2u);
}

TEST_F(EngineTest, AGenerationEndingBeforePrefillKeepsThePendingToken) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("a").ok());
  Run(*e, "a", Bytes("first"), Greedy(4));
  const SessionInfo before = *e->GetSession("a");
  ASSERT_TRUE(before.pending_token.has_value());
  auto sink = std::make_shared<TestSink>();
  ASSERT_TRUE(e->Submit({"a", Bytes("x"), Greedy(5), absl::Now() - absl::Seconds(1)}, sink).ok());
  ASSERT_TRUE(sink->WaitFinish());
  EXPECT_EQ(sink->finish().reason, FinishReason::kDeadline);
  const SessionInfo after = *e->GetSession("a");
  EXPECT_EQ(after.position, before.position);
  EXPECT_EQ(after.pending_token, before.pending_token);
}

TEST_F(EngineTest, ASpilledSessionComesBackWhenTheHostIsFull) {
  EngineOptions tight;
  tight.max_sessions = 2;
  tight.max_host_sessions = 1;
  auto e = MakeEngine(tight);
  ASSERT_TRUE(e->CreateSession("a").ok());
  Run(*e, "a", Bytes("one"), Greedy(2));
  ASSERT_TRUE(e->CreateSession("b").ok());
  ASSERT_TRUE(e->CreateSession("c").ok());  // spills "a": the host is now full
  EXPECT_EQ(e->Stats().spilled, 1);
  auto back = Run(*e, "a", Bytes(" two"), Greedy(3));  // swaps with the LRU of b and c
  EXPECT_EQ(back->finish().reason, FinishReason::kLength);
  EXPECT_TRUE(e->GetSession("a")->resident);
  EXPECT_EQ(e->Stats().spilled, 1);
}

TEST_F(EngineTest, RestoreRefusesAHistoryThatDoesNotFit) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("a").ok());
  Run(*e, "a", Bytes("history"), Greedy(3));
  auto data = DecodeSnapshot(*e->SnapshotSession("a"));
  ASSERT_TRUE(data.ok());
  SnapshotData bad_id = *data;
  bad_id.history[0] = kVocab + 5;
  EXPECT_EQ(e->RestoreSession(EncodeSnapshot(bad_id)).status().code(),
            absl::StatusCode::kInvalidArgument);
  SnapshotData short_history = *data;
  short_history.history.pop_back();
  EXPECT_EQ(e->RestoreSession(EncodeSnapshot(short_history)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(e->RestoreSession(EncodeSnapshot(*data)).ok());
}

TEST_F(EngineTest, StopStringsStopTokensAndMinTokens) {
  auto e = MakeEngine();
  const std::vector<int64_t> prompt = Bytes("abc");
  ASSERT_TRUE(e->CreateSession("free").ok());
  auto free_run = Run(*e, "free", prompt, Greedy(40));
  const std::string text = free_run->text();
  const std::vector<int64_t> tokens = free_run->tokens();
  ASSERT_EQ(free_run->bytes().size(), 40u);                  // byte tokens: one byte each
  EXPECT_EQ(text, common::SanitizeUtf8(free_run->bytes()));  // text is always valid UTF-8

  // A stop string taken from the middle of the unconstrained output (as text: stop strings
  // match the sanitized text).
  const std::string stop = text.substr(text.size() / 3, 3);
  const size_t at = text.find(stop);
  SamplingParams p = Greedy(40);
  p.stop_strings = {stop};
  ASSERT_TRUE(e->CreateSession("s").ok());
  auto stopped = Run(*e, "s", prompt, p);
  EXPECT_EQ(stopped->finish().reason, FinishReason::kStop);
  EXPECT_EQ(stopped->finish().stop_string, stop);
  EXPECT_EQ(stopped->text(), text.substr(0, at));  // never a partial stop string
  // It stops at the first token whose text completes the stop string, and not before.
  const std::vector<int64_t> got = stopped->tokens();
  ASSERT_LE(got.size(), tokens.size());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), tokens.begin()));
  common::Utf8Sanitizer streamed;
  std::string seen;
  size_t completes = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    seen += streamed.Append(std::string(1, static_cast<char>(tokens[i])));
    if (seen.find(stop) != std::string::npos) {
      completes = i + 1;
      break;
    }
  }
  EXPECT_EQ(got.size(), completes);

  // A stop token id ends at its first occurrence; min_tokens suppresses it before that.
  const int64_t stop_id = tokens[5];
  const size_t first = std::find(tokens.begin(), tokens.end(), stop_id) - tokens.begin();
  p = Greedy(40);
  p.stop_token_ids = {stop_id};
  ASSERT_TRUE(e->CreateSession("t").ok());
  auto by_id = Run(*e, "t", prompt, p);
  EXPECT_EQ(by_id->finish().reason, FinishReason::kStop);
  EXPECT_EQ(by_id->tokens().size(), first + 1);
  p.min_tokens = static_cast<int64_t>(first) + 2;
  ASSERT_TRUE(e->CreateSession("m").ok());
  auto min_run = Run(*e, "m", prompt, p);
  EXPECT_GE(min_run->tokens().size(), first + 2);
  for (size_t i = 0; i + 1 < static_cast<size_t>(p.min_tokens); ++i)
    EXPECT_NE(min_run->tokens()[i], stop_id);
}

TEST_F(EngineTest, InvalidRequestsNameTheField) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("a").ok());
  auto submit = [&](const std::string& id, std::vector<int64_t> prompt, SamplingParams p) {
    return e->Submit({id, std::move(prompt), p, std::nullopt}, std::make_shared<TestSink>())
        .status();
  };
  SamplingParams neg = Greedy(3);
  neg.temperature = -1;
  absl::Status s = submit("a", Bytes("x"), neg);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("temperature"), std::string::npos) << s;
  s = submit("a", {}, Greedy(3));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("prompt"), std::string::npos) << s;
  s = submit("a", {kVocab}, Greedy(3));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("prompt"), std::string::npos) << s;
  s = submit("a", Bytes("x"), Greedy(1'000'000));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("max_new_tokens"), std::string::npos) << s;
  EXPECT_EQ(submit("nope", Bytes("x"), Greedy(3)).code(), absl::StatusCode::kNotFound);
  EngineOptions limits;
  limits.max_prompt_tokens = 4;
  auto limited = MakeEngine(limits);
  ASSERT_TRUE(limited->CreateSession("a").ok());
  s = limited
          ->Submit({"a", Bytes("too long"), Greedy(3), std::nullopt}, std::make_shared<TestSink>())
          .status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  // The bad requests harmed nothing: the session still works.
  EXPECT_EQ(Run(*e, "a", Bytes("ok"), Greedy(3))->tokens().size(), 3u);
}

// One owner: create, fork, snapshot, restore, delete and the spills they force all run on the
// engine thread between steps, so a session decoding meanwhile keeps its slot and its exact
// tokens while others join the batch, leave it, and move between device and host.
TEST_F(EngineTest, ControlOperationsDuringDecodingLeaveItsTokensIdentical) {
  const std::vector<int64_t> prompt = Bytes("The long conversation");
  constexpr int64_t kLength = 400;
  std::vector<int64_t> alone;
  {
    auto e = MakeEngine();
    ASSERT_TRUE(e->CreateSession("a").ok());
    alone = Run(*e, "a", prompt, Greedy(kLength))->tokens();
  }
  EngineOptions options;
  options.max_sessions = 3;  // "a" plus two: the third session of a round spills one to host
  options.max_host_sessions = 16;
  auto e = MakeEngine(options);
  ASSERT_TRUE(e->CreateSession("a").ok());
  auto sink = std::make_shared<TestSink>();
  ASSERT_TRUE(e->Submit({"a", prompt, Greedy(kLength), std::nullopt}, sink).ok());
  ASSERT_TRUE(sink->WaitTokens(1));
  int rounds_while_decoding = 0;
  for (int i = 0; i < 200 && sink->tokens().size() < static_cast<size_t>(kLength); ++i) {
    ++rounds_while_decoding;
    const std::string c = "c" + std::to_string(i), f = "f" + std::to_string(i),
                      r = "r" + std::to_string(i);
    ASSERT_TRUE(e->CreateSession(c).ok());
    EXPECT_EQ(Run(*e, c, Bytes("side"), Greedy(3))->tokens().size(), 3u);  // joins and leaves
    ASSERT_TRUE(e->ForkSession(c, f).ok());
    auto snap = e->SnapshotSession(f);
    ASSERT_TRUE(snap.ok()) << snap.status();
    auto restored = e->RestoreSession(*snap, r);  // a fourth session: one idle one spills
    ASSERT_TRUE(restored.ok()) << restored.status();
    EXPECT_GE(e->Stats().spilled, 1);
    for (const std::string& id : {c, f, r}) ASSERT_TRUE(e->DeleteSession(id).ok()) << id;
  }
  ASSERT_TRUE(sink->WaitFinish());
  EXPECT_GE(rounds_while_decoding, 1);
  EXPECT_EQ(sink->tokens(), alone);
  EXPECT_EQ(e->Stats().sessions, 1);
}

// A sink runs on the engine thread; control operations it calls run there at once instead of
// waiting for the loop (which would wait for the sink).
class ForkingSink : public TestSink {
 public:
  ForkingSink(Engine* e, std::string id) : engine_(e), id_(std::move(id)) {}
  void OnFinish(Finish f) override {
    snapshot_ = engine_->SnapshotSession(id_);
    fork_ = engine_->ForkSession(id_, id_ + "-fork");
    TestSink::OnFinish(std::move(f));
  }
  absl::StatusOr<std::string> snapshot_ = absl::UnknownError("unset");
  absl::StatusOr<SessionInfo> fork_ = absl::UnknownError("unset");

 private:
  Engine* engine_;
  std::string id_;
};

TEST_F(EngineTest, ASinkMayCallControlOperations) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("s").ok());
  auto sink = std::make_shared<ForkingSink>(e.get(), "s");
  ASSERT_TRUE(e->Submit({"s", Bytes("hello"), Greedy(6), std::nullopt}, sink).ok());
  ASSERT_TRUE(sink->WaitFinish());
  ASSERT_TRUE(sink->snapshot_.ok()) << sink->snapshot_.status();
  ASSERT_TRUE(sink->fork_.ok()) << sink->fork_.status();
  EXPECT_EQ(sink->fork_->position, e->GetSession("s")->position);
  // The fork continues exactly as the original does.
  auto a = Run(*e, "s", {}, Greedy(8))->tokens();
  auto b = Run(*e, "s-fork", {}, Greedy(8))->tokens();
  EXPECT_EQ(a, b);
}

// A snapshot written by an older server (format version 1, FNV-1a checksum) restores and
// continues exactly like the session it was taken from.
TEST_F(EngineTest, SnapshotFromAnOlderVersionRestores) {
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("s").ok());
  Run(*e, "s", Bytes("The first turn"), Greedy(5));
  auto snap = e->SnapshotSession("s");
  ASSERT_TRUE(snap.ok()) << snap.status();
  auto decoded = DecodeSnapshot(*snap);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  auto restored = e->RestoreSession(EncodeSnapshot(*decoded, 1), "old");
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(Run(*e, "old", Bytes(" and more"), Greedy(9))->tokens(),
            Run(*e, "s", Bytes(" and more"), Greedy(9))->tokens());
}

// A one-shot request's new session costs nothing until admitted; while every slot holds a busy
// session it waits in the queue (not refused), then runs like a fresh session, and it is gone
// when it ends, however it ends.
TEST_F(EngineTest, OneShotSessionsWaitForASlotAndLeaveNothing) {
  auto e0 = MakeEngine();
  ASSERT_TRUE(e0->CreateSession("fresh").ok());
  const std::vector<int64_t> want = Run(*e0, "fresh", Bytes("One shot"), Greedy(6))->tokens();
  EngineOptions options;
  options.max_sessions = 1;
  options.max_host_sessions = 1;
  auto e = MakeEngine(options);
  ASSERT_TRUE(e->CreateSession("a").ok());
  auto busy = std::make_shared<TestSink>();
  ASSERT_TRUE(e->Submit({"a", Bytes("hold the slot"), Greedy(300), std::nullopt}, busy).ok());
  ASSERT_TRUE(busy->WaitTokens(1));
  GenerateRequest one{"o1", Bytes("One shot"), Greedy(6), std::nullopt};
  one.new_session = true;
  one.delete_session_at_end = true;
  auto sink = std::make_shared<TestSink>();
  ASSERT_TRUE(e->Submit(one, sink).ok());
  EXPECT_EQ(e->Submit(one, std::make_shared<TestSink>()).status().code(),
            absl::StatusCode::kAlreadyExists);
  auto cancelled = std::make_shared<TestSink>();
  GenerateRequest two = one;
  two.session_id = "o2";
  auto g = e->Submit(two, cancelled);
  ASSERT_TRUE(g.ok());
  (*g)->Cancel();  // while it waits for the slot
  ASSERT_TRUE(cancelled->WaitFinish());
  EXPECT_EQ(cancelled->finish().reason, FinishReason::kCancelled);
  ASSERT_TRUE(sink->WaitFinish());
  EXPECT_EQ(sink->finish().reason, FinishReason::kLength);
  EXPECT_EQ(sink->tokens(), want);
  ASSERT_TRUE(busy->WaitFinish());
  EXPECT_TRUE(e->WaitIdle(absl::Seconds(60)));
  EXPECT_FALSE(e->GetSession("o1").ok());
  EXPECT_FALSE(e->GetSession("o2").ok());
  EXPECT_EQ(e->Stats().sessions, 1);
}

// Every id of the checkpoint's EOS list (generation_config.json) ends a generation.
TEST_F(EngineTest, AnyIdOfTheEosListEndsTheGeneration) {
  std::vector<int64_t> free_run;
  {
    auto e = MakeEngine();
    ASSERT_TRUE(e->CreateSession("s").ok());
    free_run = Run(*e, "s", Bytes("Stop here"), Greedy(20))->tokens();
  }
  ASSERT_EQ(free_run.size(), 20u);
  const int64_t stop = free_run[6];
  const size_t first = std::find(free_run.begin(), free_run.end(), stop) - free_run.begin();
  model::ModelConfig c = model_->config();
  c.eos_token_ids = {stop};                        // besides the tokenizer's EOS (257)
  auto m = model::RetNet::CreateRandom(c, 5, {});  // SmallModel's weights
  ASSERT_TRUE(m.ok()) << m.status();
  auto e = MakeEngine({}, std::shared_ptr<const model::RetNet>(std::move(m).value()));
  ASSERT_TRUE(e->CreateSession("s").ok());
  SamplingParams p = Greedy(20);
  p.ignore_eos = false;
  auto sink = Run(*e, "s", Bytes("Stop here"), p);
  EXPECT_EQ(sink->finish().reason, FinishReason::kEos);
  EXPECT_EQ(sink->tokens(), std::vector<int64_t>(free_run.begin(), free_run.begin() + first + 1));
  EXPECT_EQ(e->model_summary().eos_token_ids.size(), 2u);
}

// Prefill once, fork, sample in each copy: the n > 1 of the OpenAI API.
TEST_F(EngineTest, PrefillOnlyLeavesTheLastTokenPendingForEachFork) {
  auto e = MakeEngine();
  const std::vector<int64_t> prompt = Bytes("The story of a fox and a hound");
  ASSERT_TRUE(e->CreateSession("direct").ok());
  auto direct = Run(*e, "direct", prompt, Greedy(20));

  ASSERT_TRUE(e->CreateSession("root").ok());
  auto sink = std::make_shared<TestSink>();
  GenerateRequest prefill{"root", prompt, Greedy(20), std::nullopt};
  prefill.prefill_only = true;
  ASSERT_TRUE(e->Submit(prefill, sink).ok());
  ASSERT_TRUE(sink->WaitFinish());
  EXPECT_TRUE(sink->tokens().empty());
  EXPECT_EQ(sink->finish().completion_tokens, 0);
  EXPECT_EQ(sink->finish().prompt_tokens, static_cast<int64_t>(prompt.size()));
  auto root = e->GetSession("root");
  ASSERT_TRUE(root.ok());
  EXPECT_EQ(root->position, static_cast<int64_t>(prompt.size()) - 1);
  ASSERT_TRUE(root->pending_token.has_value());
  EXPECT_EQ(*root->pending_token, prompt.back());

  ASSERT_TRUE(e->ForkSession("root", "copy").ok());
  auto a = Run(*e, "root", {}, Greedy(20));
  auto b = Run(*e, "copy", {}, Greedy(20));
  EXPECT_EQ(a->tokens(), direct->tokens());
  EXPECT_EQ(b->tokens(), direct->tokens());
  // The pending token was absorbed once: both sessions now hold the prompt and 19 tokens (the
  // 20th is pending), as the direct one does.
  EXPECT_EQ(e->GetSession("copy")->position, e->GetSession("direct")->position);

  // A prefill-only turn on a session whose pending token is its only input keeps it pending.
  auto again = std::make_shared<TestSink>();
  GenerateRequest nothing{"copy", {}, Greedy(5), std::nullopt};
  nothing.prefill_only = true;
  const auto before = e->GetSession("copy");
  ASSERT_TRUE(e->Submit(nothing, again).ok());
  ASSERT_TRUE(again->WaitFinish());
  const auto after = e->GetSession("copy");
  EXPECT_EQ(after->position, before->position);
  EXPECT_EQ(after->pending_token, before->pending_token);
}

// The transcript is the text of each turn's prompt (transcript_text) followed by the text its
// reply streamed; forks, snapshots and restores carry it; expect_transcript makes a turn (or a new
// session) conditional on it; token ids without text, or a turn cut short after it began, make it
// unknown; a turn refused before it touched the state leaves it as it was.
TEST_F(EngineTest, TheTranscriptFollowsTheTextOfEachTurn) {
  using common::Transcript;
  auto e = MakeEngine();
  ASSERT_TRUE(e->CreateSession("t").ok());
  EXPECT_EQ(e->GetSession("t")->transcript, Transcript{});
  auto turn = [&](const std::string& session, const std::string& text,
                  std::optional<Transcript> expect, SamplingParams p) {
    GenerateRequest r{session, Bytes(text), p, std::nullopt};
    r.transcript_text = text;
    r.expect_transcript = expect;
    auto sink = std::make_shared<TestSink>();
    absl::Status s = e->Submit(std::move(r), sink).status();
    if (s.ok()) {
      EXPECT_TRUE(sink->WaitFinish());
    }
    return std::make_pair(s, sink);
  };
  SamplingParams stop = Greedy(12);
  stop.stop_strings = {"q"};
  auto [s1, first] = turn("t", "Hello there.", Transcript{}, stop);
  ASSERT_TRUE(s1.ok()) << s1;
  const Transcript after1 = Transcript::Of("Hello there." + first->text());
  EXPECT_EQ(first->finish().transcript, after1);
  EXPECT_EQ(e->GetSession("t")->transcript, after1);

  // A stale expectation is refused and changes nothing; the right one runs.
  const SessionInfo before = *e->GetSession("t");
  auto [stale, unused] = turn("t", " Next.", Transcript{}, Greedy(3));
  EXPECT_EQ(stale.code(), absl::StatusCode::kAborted) << stale;
  EXPECT_NE(stale.message().find("expect_transcript"), std::string::npos) << stale;
  EXPECT_EQ(e->GetSession("t")->position, before.position);
  EXPECT_FALSE(e->GetSession("t")->generating);
  auto [s2, second] = turn("t", " Next.", after1, Greedy(5));
  ASSERT_TRUE(s2.ok()) << s2;
  Transcript after2 = after1;
  after2.Append(" Next." + second->text());
  EXPECT_EQ(e->GetSession("t")->transcript, after2);
  EXPECT_TRUE(after2.IsPrefixOf("Hello there." + first->text() + " Next." + second->text() + "!"));

  // Forks, snapshots and restores carry it.
  ASSERT_TRUE(e->ForkSession("t", "f").ok());
  EXPECT_EQ(e->GetSession("f")->transcript, after2);
  auto snap = e->SnapshotSession("t");
  ASSERT_TRUE(snap.ok()) << snap.status();
  auto restored = e->RestoreSession(*snap, "r");
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(restored->transcript, after2);

  // A new session is conditional on the empty transcript.
  auto [bad_new, unused2] = [&] {
    GenerateRequest r{"n", Bytes("x"), Greedy(2), std::nullopt};
    r.new_session = true;
    r.expect_transcript = Transcript::Of("x");
    auto sink = std::make_shared<TestSink>();
    return std::make_pair(e->Submit(std::move(r), sink).status(), sink);
  }();
  EXPECT_EQ(bad_new.code(), absl::StatusCode::kAborted) << bad_new;
  EXPECT_EQ(e->GetSession("n").status().code(), absl::StatusCode::kNotFound);

  // Refused before the state changed (its deadline passed in the queue): left as it was.
  {
    GenerateRequest r{"f", Bytes("late"), Greedy(3), absl::Now() - absl::Seconds(1)};
    r.transcript_text = "late";
    auto sink = std::make_shared<TestSink>();
    ASSERT_TRUE(e->Submit(std::move(r), sink).ok());
    ASSERT_TRUE(sink->WaitFinish());
    EXPECT_EQ(sink->finish().reason, FinishReason::kDeadline);
    EXPECT_EQ(e->GetSession("f")->transcript, after2);
  }
  // Cancelled after it began: unknown.
  {
    GenerateRequest r{"f", Bytes("long"), Greedy(4000), std::nullopt};
    r.transcript_text = "long";
    auto sink = std::make_shared<TestSink>();
    auto g = e->Submit(std::move(r), sink);
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_TRUE(sink->WaitTokens(2));
    (*g)->Cancel();
    ASSERT_TRUE(sink->WaitFinish());
    EXPECT_EQ(sink->finish().reason, FinishReason::kCancelled);
    EXPECT_FALSE(e->GetSession("f")->transcript.has_value());
  }
  // Token ids that stand for no text: unknown, and it stays unknown.
  Run(*e, "r", Bytes("ids"), Greedy(2));
  EXPECT_FALSE(e->GetSession("r")->transcript.has_value());
  auto [s3, unused3] = turn("r", "text again", std::nullopt, Greedy(2));
  ASSERT_TRUE(s3.ok()) << s3;
  EXPECT_FALSE(e->GetSession("r")->transcript.has_value());
  auto [s4, unused4] = turn("r", "more", Transcript{}, Greedy(2));
  EXPECT_EQ(s4.code(), absl::StatusCode::kAborted) << s4;
}

}  // namespace
}  // namespace retnet::engine
