// The engine loop: admission, budgeted chunkwise prefill, one batched recurrent step, sampling,
// delivery. Runs on the engine thread only.
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/strings.h"
#include "engine/engine.h"
#include "engine/engine_internal.h"

namespace retnet::engine {
namespace {

std::optional<FinishReason> Expired(const std::shared_ptr<Generation>& g,
                                    const GenerateRequest& req, absl::Time now) {
  if (g->cancelled()) return FinishReason::kCancelled;
  if (req.deadline.has_value() && now >= *req.deadline) return FinishReason::kDeadline;
  return std::nullopt;
}

}  // namespace

void Engine::Loop() {
  c10::InferenceMode guard;
  // OpenMP's thread count is a per-thread setting: set it on the thread that steps.
  if (options_.intra_op_threads > 0) at::set_num_threads(options_.intra_op_threads);
  loop_thread_.store(std::this_thread::get_id());
  next_expiry_ = absl::Now() + absl::Seconds(1);
  while (true) {
    try {
      if (!Iterate()) return;
    } catch (const std::exception& e) {
      FailAll(e.what());
    }
  }
}

// One iteration: control commands, admission, prefill, decode. Returns false when the engine is
// stopping.
bool Engine::Iterate() {
  {
    std::vector<std::unique_ptr<Request>> admitted;
    {
      absl::MutexLock lock(&mu_);
      while (!stopping_ && commands_.empty() && queue_.empty() && prefilling_.empty() &&
             decoding_.empty() && absl::Now() < next_expiry_) {
        wake_.WaitWithDeadline(&mu_, next_expiry_);
      }
      if (stopping_) return false;
    }
    // Between two steps: create, fork, delete, snapshot, restore, as queued.
    RunCommands();
    {
      absl::MutexLock lock(&mu_);
      admitted.swap(queue_);
    }
    // Admission: make the session resident (a reload, maybe a spill: copies without the lock)
    // and line up its tokens.
    std::vector<std::pair<std::unique_ptr<Request>, absl::Status>> refused;
    std::vector<std::pair<std::unique_ptr<Request>, FinishReason>> expired;
    // New sessions that found every slot busy: next iteration, in their order. Requests behind
    // them go ahead (a resident session needs no slot; blocking it could deadlock the pool).
    std::vector<std::unique_ptr<Request>> waiting;
    const absl::Time admitted_at = absl::Now();
    for (auto& r : admitted) {
      Session& s = *r->session;
      if (auto reason = Expired(r->generation, r->req, admitted_at)) {
        expired.emplace_back(std::move(r), *reason);
        continue;
      }
      bool all_busy = false;
      absl::Status status = MakeResident(s, &all_busy);
      if (!status.ok() && all_busy && s.unallocated) {
        waiting.push_back(std::move(r));
        continue;
      }
      if (!status.ok()) {
        refused.emplace_back(std::move(r), status);
        continue;
      }
      {
        absl::MutexLock lock(&mu_);
        if (r->req.sampling.seed.has_value()) {
          s.seed = *r->req.sampling.seed;
          s.counter = 0;
        }
        if (s.pending.has_value()) {
          r->to_prefill.push_back(*s.pending);
          r->pending_in_front = true;
          s.pending.reset();
        }
      }
      r->to_prefill.insert(r->to_prefill.end(), r->req.prompt.begin(), r->req.prompt.end());
      if (r->req.prefill_only && !r->to_prefill.empty()) {
        r->held = r->to_prefill.back();
        r->held_in_history = r->pending_in_front && r->to_prefill.size() == 1;
        r->to_prefill.pop_back();
      }
      prefilling_.push_back(std::move(r));
    }
    if (!waiting.empty()) {
      absl::MutexLock lock(&mu_);
      queue_.insert(queue_.begin(), std::make_move_iterator(waiting.begin()),
                    std::make_move_iterator(waiting.end()));
    }
    for (auto& [r, status] : refused) FinishRequest(*r, FinishReason::kError, status);
    for (auto& [r, reason] : expired) FinishRequest(*r, reason);
    const absl::Time now = absl::Now();
    if (now >= next_expiry_) {
      ExpireOnLoop(now);
      next_expiry_ = now + std::min(absl::Seconds(1), options_.session_ttl);
    }
    Prefill();
    Decode();
  }
  return true;
}

// Last resort when a tensor operation throws outside the model's own error handling (e.g. device
// memory exhausted while sampling): every running request ends with an error and its session's
// state, possibly half-updated, is marked lost.
void Engine::FailAll(const std::string& what) {
  const std::string message = common::FirstLine(what);
  std::vector<std::unique_ptr<Request>> failed;
  {
    absl::MutexLock lock(&mu_);
    for (int64_t b = static_cast<int64_t>(decoding_.size()) - 1; b >= 0; --b) {
      decoding_[b]->session->broken = true;
      --active_;
      failed.push_back(std::move(decoding_[b]));
    }
    decoding_.clear();
    for (auto& r : prefilling_) {
      r->session->broken = true;
      failed.push_back(std::move(r));
    }
    prefilling_.clear();
    for (auto& r : queue_) {
      if (r != nullptr) failed.push_back(std::move(r));
    }
    queue_.clear();
  }
  for (auto& r : failed) {
    FinishRequest(*r, FinishReason::kError,
                  absl::InternalError(absl::StrCat("engine step failed: ", message)));
  }
}

// A request that ends before its first prefill chunk gives its session back the pending token
// that admission took (it is in neither the state nor the pending slot otherwise).
void Engine::RestorePending(Request& r) {
  if (!r.pending_in_front || r.prefilled != 0) return;
  absl::MutexLock lock(&mu_);
  r.session->pending = r.to_prefill.empty() ? *r.held : r.to_prefill[0];
}

void Engine::Prefill() {
  int64_t budget = options_.prefill_token_budget;
  const absl::Time now = absl::Now();
  for (auto it = prefilling_.begin(); it != prefilling_.end();) {
    Request& r = **it;
    if (auto reason = Expired(r.generation, r.req, now)) {
      RestorePending(r);
      FinishRequest(r, *reason);
      it = prefilling_.erase(it);
      continue;
    }
    if (r.prefilled == r.to_prefill.size() && r.req.prefill_only) {  // absorbed: done
      if (r.held.has_value()) {
        absl::MutexLock lock(&mu_);
        r.session->pending = *r.held;
        if (!r.held_in_history) r.session->history.push_back(*r.held);
      }
      FinishRequest(r, FinishReason::kLength);
      it = prefilling_.erase(it);
      continue;
    }
    if (r.prefilled == r.to_prefill.size()) {  // prompt done: waits for its first sample
      ++it;
      continue;
    }
    if (budget <= 0) {
      ++it;
      continue;
    }
    Session& s = *r.session;
    const int64_t n =
        std::min<int64_t>(budget, static_cast<int64_t>(r.to_prefill.size() - r.prefilled));
    std::vector<int64_t> chunk(r.to_prefill.begin() + static_cast<int64_t>(r.prefilled),
                               r.to_prefill.begin() + static_cast<int64_t>(r.prefilled) + n);
    at::Tensor tokens = at::tensor(chunk, at::kLong).view({1, n}).to(model_->options().device);
    auto logits = model_->Chunkwise(tokens, SlotView(s.slot), s.position,
                                    options_.prefill_chunk_size, model::Outputs::kLast);
    if (!logits.ok()) {
      RestorePending(r);
      FinishRequest(r, FinishReason::kError, logits.status());
      it = prefilling_.erase(it);
      continue;
    }
    {
      absl::MutexLock lock(&mu_);
      s.position += n;
      for (int64_t i = 0; i < n; ++i) {
        if (r.prefilled + i == 0 && r.pending_in_front) continue;  // already in the history
        s.history.push_back(chunk[i]);
      }
    }
    r.prefilled += n;
    budget -= n;
    if (r.prefilled == r.to_prefill.size() && !r.req.prefill_only) r.logits = logits->view({1, -1});
    ++it;
  }
}

void Engine::Decode() {
  const absl::Time now = absl::Now();
  // Rows that stop before stepping (cancelled or past their deadline) leave the batch first.
  std::vector<std::pair<std::unique_ptr<Request>, FinishReason>> finished;
  {
    absl::MutexLock lock(&mu_);
    for (int64_t b = static_cast<int64_t>(decoding_.size()) - 1; b >= 0; --b) {
      if (auto reason = Expired(decoding_[b]->generation, decoding_[b]->req, now)) {
        --active_;
        std::swap(decoding_[b], decoding_.back());
        finished.emplace_back(std::move(decoding_.back()), *reason);
        decoding_.pop_back();
      }
    }
  }
  for (auto& [r, reason] : finished) FinishRequest(*r, reason);
  finished.clear();

  // Requests whose prompt is complete sample their first token in this iteration.
  std::vector<std::unique_ptr<Request>> joining;
  for (auto it = prefilling_.begin(); it != prefilling_.end();) {
    if ((*it)->logits.defined()) {
      joining.push_back(std::move(*it));
      it = prefilling_.erase(it);
    } else {
      ++it;
    }
  }
  int64_t batch = static_cast<int64_t>(decoding_.size());
  if (batch == 0 && joining.empty()) return;

  std::vector<at::Tensor> logits;
  if (batch > 0) {
    // Row b advances pool slot slots[b] in place: a session keeps its slot while resident.
    std::vector<int64_t> tokens(batch), positions(batch), slots(batch);
    for (int64_t b = 0; b < batch; ++b) {
      tokens[b] = decoding_[b]->output.back();
      positions[b] = decoding_[b]->session->position;
      slots[b] = decoding_[b]->session->slot;
    }
    const auto device = model_->options().device;
    auto step = model_->Step(at::tensor(tokens, at::kLong).to(device),
                             at::tensor(positions, at::kLong).to(device), pool_->state, slots);
    if (!step.ok()) {
      // The step may have advanced some layers of these states in place: they are lost.
      absl::MutexLock lock(&mu_);
      for (int64_t b = batch - 1; b >= 0; --b) {
        decoding_[b]->session->broken = true;
        --active_;
        finished.emplace_back(std::move(decoding_[b]), FinishReason::kError);
      }
      decoding_.clear();
      batch = 0;
    } else {
      absl::MutexLock lock(&mu_);
      for (auto& r : decoding_) {
        ++r->session->position;  // the pending token is now in the state
        r->session->pending.reset();
      }
      logits.push_back(*step);
    }
    for (auto& [r, reason] : finished) FinishRequest(*r, reason, step.status());
    finished.clear();
  }
  for (auto& r : joining) logits.push_back(r->logits);
  if (logits.empty()) return;

  // One sampling call for every row.
  std::vector<Request*> rows;
  for (auto& r : decoding_) rows.push_back(r.get());
  for (auto& r : joining) rows.push_back(r.get());
  std::vector<SampleRow> sample_rows(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    Request& r = *rows[i];
    SampleRow& row = sample_rows[i];
    row.params = &r.req.sampling;
    row.seed = r.session->seed;
    row.counter = r.session->counter;
    row.prompt_tokens = &r.session->history;
    row.output_tokens = &r.output;
    if (static_cast<int64_t>(r.output.size()) < r.req.sampling.min_tokens) {
      if (!r.req.sampling.ignore_eos) {
        row.suppress.insert(row.suppress.end(), eos_ids_.begin(), eos_ids_.end());
      }
      row.suppress.insert(row.suppress.end(), r.req.sampling.stop_token_ids.begin(),
                          r.req.sampling.stop_token_ids.end());
    }
  }
  absl::StatusOr<std::vector<SampleResult>> samples =
      SampleBatch(logits.size() == 1 ? logits[0] : at::cat(logits, 0), sample_rows);

  std::vector<bool> done(rows.size(), true);
  if (samples.ok()) {
    for (size_t i = 0; i < rows.size(); ++i) done[i] = Deliver(*rows[i], (*samples)[i]);
  } else {
    for (Request* r : rows) r->finish_reason = FinishReason::kError;
  }

  std::vector<std::unique_ptr<Request>> to_finish;
  {
    absl::MutexLock lock(&mu_);
    for (int64_t b = batch - 1; b >= 0; --b) {
      if (!done[b]) continue;
      --active_;
      std::swap(decoding_[b], decoding_.back());
      to_finish.push_back(std::move(decoding_.back()));
      decoding_.pop_back();
    }
    for (size_t j = 0; j < joining.size(); ++j) {
      if (done[batch + j]) {
        to_finish.push_back(std::move(joining[j]));
      } else {
        ++active_;
        decoding_.push_back(std::move(joining[j]));
      }
    }
  }
  for (auto& r : to_finish) FinishRequest(*r, r->finish_reason, samples.status());
}

bool Engine::Deliver(Request& r, const SampleResult& sample) {
  const SamplingParams& p = r.req.sampling;
  const int64_t token = sample.token;
  {
    absl::MutexLock lock(&mu_);
    r.session->pending = token;
    r.session->history.push_back(token);
    ++r.session->counter;
  }
  r.output.push_back(token);
  const bool is_eos =
      !p.ignore_eos && std::find(eos_ids_.begin(), eos_ids_.end(), token) != eos_ids_.end();
  const bool is_stop_id =
      std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) != p.stop_token_ids.end();
  TokenEvent event;
  event.token = token;
  event.bytes = tokenizer_->TokenBytes(token);
  if (!is_eos && !is_stop_id) event.text = r.matcher.Append(event.bytes);
  if (r.transcript.has_value()) r.transcript->Append(event.text);
  if (p.logprobs >= 0) {
    event.has_logprob = true;
    event.logprob = sample.logprob;
    event.top_logprobs = sample.top;
  }
  r.sink->OnToken(std::move(event));
  if (is_eos) {
    r.finish_reason = FinishReason::kEos;
    return true;
  }
  if (is_stop_id || r.matcher.stopped()) {
    r.finish_reason = FinishReason::kStop;
    return true;
  }
  if (static_cast<int64_t>(r.output.size()) >= p.max_new_tokens) {
    r.finish_reason = FinishReason::kLength;
    return true;
  }
  return false;
}

void Engine::FinishRequest(Request& r, FinishReason reason, absl::Status status) {
  Finish f;
  f.reason = reason;
  f.status = reason == FinishReason::kError ? status : absl::OkStatus();
  if (reason == FinishReason::kError && f.status.ok())
    f.status = absl::InternalError("generation failed");
  if (reason != FinishReason::kError) f.text = r.matcher.Flush();
  f.stop_string = r.matcher.matched_stop();
  f.prompt_tokens = r.prompt_tokens;
  f.completion_tokens = static_cast<int64_t>(r.output.size());
  const bool normal = reason == FinishReason::kLength || reason == FinishReason::kStop ||
                      reason == FinishReason::kEos;
  // Refused or expired before its first prefill chunk: the session is as it was.
  const bool untouched = !normal && r.prefilled == 0 && r.output.empty();
  if (normal && r.transcript.has_value()) r.transcript->Append(f.text);
  std::unique_ptr<Session> gone;  // a one-shot request's session, destroyed after the lock
  {
    absl::MutexLock lock(&mu_);
    r.session->busy = false;
    r.session->last_used = absl::Now();
    f.position = r.session->position;
    if (!untouched)
      r.session->transcript = normal ? r.transcript : std::optional<common::Transcript>();
    f.transcript = r.session->transcript;
    // Gone before the generation counts as ended (WaitIdle) and before the sink hears of it.
    if (r.req.delete_session_at_end) gone = EraseSessionLocked(sessions_.find(r.session->id));
    --busy_;
  }
  r.session = nullptr;
  r.sink->OnFinish(std::move(f));
}

}  // namespace retnet::engine
