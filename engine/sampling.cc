#include "engine/sampling.h"

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace retnet::engine {
namespace {

// Messages name the field as the wire API spells it (retnet.v1.GenerateRequest): the engine's
// SamplingParams merges `sampling`, `stopping` and `logprobs`.
absl::Status Bad(const std::string& field, const std::string& why) {
  std::string path;
  if (field == "max_new_tokens" || field == "min_tokens" || field == "stop_token_ids" ||
      field == "ignore_eos") {
    path = "stopping." + field;
  } else if (field == "stop_strings") {
    path = "stopping.stop";
  } else if (field == "logprobs") {
    path = "logprobs";
  } else {
    path = "sampling." + field;
  }
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", why));
}

bool InVocab(int64_t id, int64_t vocab_size) { return id >= 0 && id < vocab_size; }

uint64_t Mix(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ULL;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return z;
}

// Everything a SampleBatch/ProcessLogits call needs, gathered on the host. Index lists name only
// the touched (row, token) pairs; per-row parameters of the sampled rows are in `sample_rows`
// order.
struct Plan {
  int64_t batch = 0;
  int64_t vocab = 0;
  std::vector<int64_t> bias_rows, bias_ids;
  std::vector<double> bias_vals;
  std::vector<int64_t> pen_rows, pen_ids;
  std::vector<double> pen_rp, pen_sub;  // x' = (x > 0 ? x / rp : x * rp) - sub
  std::vector<int64_t> sup_rows, sup_ids;
  std::vector<int64_t> greedy_rows, sample_rows, top_k;
  std::vector<double> temperature, top_p, min_p, u;
  int32_t max_logprobs = -1;
};

// The plan's lists as tensors on the logits' device: one int64 and one float64 host->device copy.
struct DevicePlan {
  at::Tensor bias_rows, bias_ids, bias_vals;
  at::Tensor pen_rows, pen_ids, pen_rp, pen_sub;
  at::Tensor sup_rows, sup_ids;
  at::Tensor greedy_rows, sample_rows, top_k;
  at::Tensor temperature, top_p, min_p, u;
};

template <typename T>
at::Tensor Upload(const std::vector<const std::vector<T>*>& parts,
                  const std::vector<at::Tensor*>& outs, at::ScalarType dtype, at::Device device) {
  std::vector<T> all;
  for (const auto* p : parts) all.insert(all.end(), p->begin(), p->end());
  at::Tensor t;
  if (all.empty()) {
    t = at::empty({0}, at::TensorOptions().dtype(dtype).device(device));
  } else {
    t = at::from_blob(all.data(), {static_cast<int64_t>(all.size())}, at::dtype(dtype))
            .to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
  }
  int64_t offset = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const int64_t n = static_cast<int64_t>(parts[i]->size());
    *outs[i] = t.narrow(0, offset, n);
    offset += n;
  }
  return t;
}

DevicePlan ToDevice(const Plan& p, at::Device device) {
  DevicePlan d;
  Upload<int64_t>({&p.bias_rows, &p.bias_ids, &p.pen_rows, &p.pen_ids, &p.sup_rows, &p.sup_ids,
                   &p.greedy_rows, &p.sample_rows, &p.top_k},
                  {&d.bias_rows, &d.bias_ids, &d.pen_rows, &d.pen_ids, &d.sup_rows, &d.sup_ids,
                   &d.greedy_rows, &d.sample_rows, &d.top_k},
                  at::kLong, device);
  Upload<double>({&p.bias_vals, &p.pen_rp, &p.pen_sub, &p.temperature, &p.top_p, &p.min_p, &p.u},
                 {&d.bias_vals, &d.pen_rp, &d.pen_sub, &d.temperature, &d.top_p, &d.min_p, &d.u},
                 at::kDouble, device);
  return d;
}

absl::Status CheckIds(const std::vector<int64_t>* ids, int64_t vocab, size_t row,
                      const char* what) {
  if (ids == nullptr) return absl::OkStatus();
  for (int64_t id : *ids) {
    if (!InVocab(id, vocab)) {
      return absl::InvalidArgumentError(
          absl::StrCat("SampleBatch: row ", row, ": ", what, " token id ", id,
                       " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Plan> MakePlan(const at::Tensor& logits, const std::vector<SampleRow>& rows) {
  if (!logits.defined() || logits.dim() != 2 || logits.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError("SampleBatch: logits must be a float32 [B, V] tensor");
  }
  Plan plan;
  plan.batch = logits.size(0);
  plan.vocab = logits.size(1);
  if (plan.batch != static_cast<int64_t>(rows.size())) {
    return absl::InvalidArgumentError(absl::StrCat("SampleBatch: logits have ", plan.batch,
                                                   " rows but ", rows.size(), " rows were given"));
  }
  if (plan.vocab <= 0) return absl::InvalidArgumentError("SampleBatch: logits have no columns");
  const int64_t vocab = plan.vocab;

  std::vector<int64_t> out_sorted, prompt_sorted;
  for (size_t b = 0; b < rows.size(); ++b) {
    const SampleRow& row = rows[b];
    if (row.params == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("SampleBatch: row ", b, " has no params"));
    }
    const SamplingParams& sp = *row.params;
    const auto rb = static_cast<int64_t>(b);

    for (const auto& [id, bias] : sp.logit_bias) {
      if (!InVocab(id, vocab)) {
        return absl::InvalidArgumentError(
            absl::StrCat("SampleBatch: row ", b, ": logit_bias token id ", id,
                         " is outside the vocabulary [0, ", vocab, ")"));
      }
      plan.bias_rows.push_back(rb);
      plan.bias_ids.push_back(id);
      plan.bias_vals.push_back(bias);
    }

    // Penalties: one entry per distinct token of (prompt if repetition is on) ∪ output.
    const bool repetition = sp.repetition_penalty != 1.0;
    const bool additive = sp.presence_penalty != 0.0 || sp.frequency_penalty != 0.0;
    if (repetition || additive) {
      if (auto s = CheckIds(row.output_tokens, vocab, b, "output"); !s.ok()) return s;
      out_sorted.clear();
      prompt_sorted.clear();
      if (row.output_tokens != nullptr) out_sorted = *row.output_tokens;
      if (repetition && row.prompt_tokens != nullptr) {
        if (auto s = CheckIds(row.prompt_tokens, vocab, b, "prompt"); !s.ok()) return s;
        prompt_sorted = *row.prompt_tokens;
      }
      std::sort(out_sorted.begin(), out_sorted.end());
      std::sort(prompt_sorted.begin(), prompt_sorted.end());
      prompt_sorted.erase(std::unique(prompt_sorted.begin(), prompt_sorted.end()),
                          prompt_sorted.end());
      auto add = [&](int64_t id, int64_t count) {
        plan.pen_rows.push_back(rb);
        plan.pen_ids.push_back(id);
        plan.pen_rp.push_back(sp.repetition_penalty);
        plan.pen_sub.push_back(count > 0 ? sp.presence_penalty +
                                               sp.frequency_penalty * static_cast<double>(count)
                                         : 0.0);
      };
      size_t i = 0, j = 0;
      while (i < out_sorted.size() || j < prompt_sorted.size()) {
        if (i < out_sorted.size() &&
            (j == prompt_sorted.size() || out_sorted[i] <= prompt_sorted[j])) {
          const int64_t id = out_sorted[i];
          size_t end = i;
          while (end < out_sorted.size() && out_sorted[end] == id) ++end;
          add(id, static_cast<int64_t>(end - i));
          i = end;
          if (j < prompt_sorted.size() && prompt_sorted[j] == id) ++j;
        } else {
          add(prompt_sorted[j++], 0);
        }
      }
    }

    if (auto s = CheckIds(&row.suppress, vocab, b, "suppress"); !s.ok()) return s;
    for (int64_t id : row.suppress) {
      plan.sup_rows.push_back(rb);
      plan.sup_ids.push_back(id);
    }

    if (sp.temperature == 0.0) {
      plan.greedy_rows.push_back(rb);
    } else {
      plan.sample_rows.push_back(rb);
      plan.top_k.push_back(sp.top_k);
      plan.temperature.push_back(sp.temperature);
      plan.top_p.push_back(sp.top_p);
      plan.min_p.push_back(sp.min_p);
      plan.u.push_back(UniformFromCounter(row.seed, row.counter));
    }
    plan.max_logprobs = std::max(plan.max_logprobs, sp.logprobs);
  }
  return plan;
}

c10::List<c10::optional<at::Tensor>> Indices(const at::Tensor& rows, const at::Tensor& ids) {
  c10::List<c10::optional<at::Tensor>> list;
  list.push_back(rows);
  list.push_back(ids);
  return list;
}

// logit_bias, penalties, suppression on a fresh copy of the logits.
at::Tensor Process(const at::Tensor& logits, const Plan& p, const DevicePlan& d) {
  at::Tensor x = logits.clone(at::MemoryFormat::Contiguous);
  if (!p.bias_rows.empty()) {
    x.index_put_(Indices(d.bias_rows, d.bias_ids), d.bias_vals.to(at::kFloat),
                 /*accumulate=*/true);
  }
  if (!p.pen_rows.empty()) {
    const auto idx = Indices(d.pen_rows, d.pen_ids);
    const at::Tensor g = at::index(x, idx).to(at::kDouble);
    const at::Tensor penalised = at::where(g > 0, g / d.pen_rp, g * d.pen_rp) - d.pen_sub;
    x.index_put_(idx, penalised.to(at::kFloat));
  }
  if (!p.sup_rows.empty()) {
    x.index_put_(Indices(d.sup_rows, d.sup_ids),
                 at::full({}, -std::numeric_limits<float>::infinity(), x.options()));
  }
  return x;
}

// Argmax per row, the lowest id among equal maxima.
at::Tensor Greedy(const at::Tensor& x) {
  const int64_t vocab = x.size(1);
  const at::Tensor pos = at::arange(vocab, x.options().dtype(at::kLong)).unsqueeze(0);
  const at::Tensor is_max = x == x.amax({-1}, /*keepdim=*/true);
  return at::where(is_max, pos, vocab).amin({-1}).clamp_max(vocab - 1);
}

// temperature -> softmax -> top_k -> top_p -> min_p -> inverse-CDF draw, per row of x [S, V].
at::Tensor Draw(const at::Tensor& x, const DevicePlan& d) {
  const int64_t vocab = x.size(1);
  // Shifting by the row maximum first keeps tiny temperatures from overflowing to inf - inf.
  const at::Tensor scaled =
      (x - x.amax({-1}, /*keepdim=*/true)) / d.temperature.to(at::kFloat).unsqueeze(1);
  auto [sorted, order] = at::sort(scaled, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
  const at::Tensor probs = at::softmax(sorted, -1).to(at::kDouble);
  const at::Tensor pos = at::arange(vocab, x.options().dtype(at::kLong)).unsqueeze(0);

  // Every filter keeps a prefix of the descending order, so `keep` is a prefix too.
  at::Tensor keep = probs > 0;
  const at::Tensor k = at::where(d.top_k > 0, d.top_k, vocab).unsqueeze(1);
  keep = keep & (pos < k);
  at::Tensor kept = probs * keep;
  const at::Tensor cdf_k = kept.cumsum(-1);
  const at::Tensor mass_k = cdf_k.narrow(1, vocab - 1, 1);
  const at::Tensor top_p = d.top_p.unsqueeze(1);
  // Token i is needed while the mass before it is below top_p (of the top_k-renormalised mass).
  keep = keep & ((cdf_k - kept < top_p * mass_k) | (top_p >= 1.0) | (pos == 0));
  keep = keep & (probs >= d.min_p.unsqueeze(1) * probs.narrow(1, 0, 1));

  kept = probs * keep;
  const at::Tensor cdf = kept.cumsum(-1);
  const at::Tensor threshold = d.u.unsqueeze(1) * cdf.narrow(1, vocab - 1, 1);
  const at::Tensor n_keep = keep.sum(-1);
  const at::Tensor idx = at::minimum((cdf <= threshold).sum(-1), n_keep - 1).clamp_min(0);
  return order.gather(1, idx.unsqueeze(1)).squeeze(1);
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& p, int64_t vocab_size) {
  if (vocab_size <= 0) {
    return Bad("vocab_size", absl::StrCat("must be positive, got ", vocab_size));
  }
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature)) {
    return Bad("temperature", absl::StrCat("must be a finite value >= 0, got ", p.temperature));
  }
  if (p.top_k < 0) return Bad("top_k", absl::StrCat("must be >= 0 (0 = off), got ", p.top_k));
  if (!(p.top_p > 0 && p.top_p <= 1)) {
    return Bad("top_p", absl::StrCat("must be in (0, 1], got ", p.top_p));
  }
  if (!(p.min_p >= 0 && p.min_p < 1)) {
    return Bad("min_p", absl::StrCat("must be in [0, 1), got ", p.min_p));
  }
  if (!(p.repetition_penalty > 0) || !std::isfinite(p.repetition_penalty)) {
    return Bad("repetition_penalty",
               absl::StrCat("must be a finite value > 0, got ", p.repetition_penalty));
  }
  const double pf = kMaxPresenceFrequencyPenalty;
  if (!(p.presence_penalty >= -pf && p.presence_penalty <= pf)) {
    return Bad("presence_penalty", absl::StrCat("must be in [-2, 2], got ", p.presence_penalty));
  }
  if (!(p.frequency_penalty >= -pf && p.frequency_penalty <= pf)) {
    return Bad("frequency_penalty", absl::StrCat("must be in [-2, 2], got ", p.frequency_penalty));
  }
  std::vector<int64_t> bias_ids;
  for (const auto& [id, bias] : p.logit_bias) {
    if (!InVocab(id, vocab_size)) {
      return Bad("logit_bias",
                 absl::StrCat("token id ", id, " is outside the vocabulary [0, ", vocab_size, ")"));
    }
    if (!(bias >= -kMaxLogitBias && bias <= kMaxLogitBias)) {
      return Bad("logit_bias",
                 absl::StrCat("bias for token ", id, " must be in [-100, 100], got ", bias));
    }
    bias_ids.push_back(id);
  }
  std::sort(bias_ids.begin(), bias_ids.end());
  if (auto dup = std::adjacent_find(bias_ids.begin(), bias_ids.end()); dup != bias_ids.end()) {
    return Bad("logit_bias", absl::StrCat("token id ", *dup, " is listed more than once"));
  }
  if (p.max_new_tokens < 1) {
    return Bad("max_new_tokens", absl::StrCat("must be >= 1, got ", p.max_new_tokens));
  }
  if (p.min_tokens < 0 || p.min_tokens > p.max_new_tokens) {
    return Bad("min_tokens", absl::StrCat("must be in [0, max_new_tokens=", p.max_new_tokens,
                                          "], got ", p.min_tokens));
  }
  for (int64_t id : p.stop_token_ids) {
    if (!InVocab(id, vocab_size)) {
      return Bad("stop_token_ids",
                 absl::StrCat("token id ", id, " is outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  if (p.stop_strings.size() > static_cast<size_t>(kMaxStopStrings)) {
    return Bad("stop_strings",
               absl::StrCat("at most ", kMaxStopStrings, " strings, got ", p.stop_strings.size()));
  }
  for (size_t i = 0; i < p.stop_strings.size(); ++i) {
    if (p.stop_strings[i].empty())
      return Bad("stop_strings", absl::StrCat("entry ", i, " is empty"));
    if (p.stop_strings[i].size() > kMaxStopStringBytes) {
      return Bad("stop_strings", absl::StrCat("entry ", i, " is ", p.stop_strings[i].size(),
                                              " bytes, at most ", kMaxStopStringBytes));
    }
  }
  if (p.logprobs < -1 || p.logprobs > kMaxLogprobs) {
    return Bad("logprobs", absl::StrCat("must be -1 (none), 0 (chosen token) or in [1, ",
                                        kMaxLogprobs, "], got ", p.logprobs));
  }
  return absl::OkStatus();
}

uint64_t BitsFromCounter(uint64_t seed, uint64_t counter) {
  const uint64_t key = Mix(seed ^ 0x243F6A8885A308D3ULL);
  return Mix(Mix(key + (counter + 1) * 0x9E3779B97F4A7C15ULL) ^ key);
}

double UniformFromCounter(uint64_t seed, uint64_t counter) {
  return static_cast<double>(BitsFromCounter(seed, counter) >> 11) * 0x1.0p-53;
}

absl::StatusOr<at::Tensor> ProcessLogits(const at::Tensor& logits,
                                         const std::vector<SampleRow>& rows) {
  auto plan = MakePlan(logits, rows);
  if (!plan.ok()) return plan.status();
  c10::InferenceMode guard;
  return Process(logits, *plan, ToDevice(*plan, logits.device()));
}

absl::StatusOr<std::vector<SampleResult>> SampleBatch(const at::Tensor& logits,
                                                      const std::vector<SampleRow>& rows) {
  auto plan_or = MakePlan(logits, rows);
  if (!plan_or.ok()) return plan_or.status();
  const Plan& p = *plan_or;
  std::vector<SampleResult> results(rows.size());
  if (p.batch == 0) return results;

  // Host fast path, the common case of a CPU model: every row greedy with nothing to apply (no
  // bias, penalty, suppression or log probabilities) is an argmax over the raw logits, read in
  // place: no tensor op at all. Same rules as Greedy(): the first maximum; a row holding a NaN
  // gives vocab - 1.
  if (logits.device().is_cpu() && logits.is_contiguous() && p.sample_rows.empty() &&
      p.max_logprobs < 0 && p.bias_rows.empty() && p.pen_rows.empty() && p.sup_rows.empty()) {
    const float* x = logits.data_ptr<float>();
    for (int64_t b = 0; b < p.batch; ++b) {
      const float* row = x + b * p.vocab;
      int64_t best = 0;
      bool nan = false;
      for (int64_t v = 0; v < p.vocab; ++v) {
        nan = nan || std::isnan(row[v]);
        if (row[v] > row[best]) best = v;
      }
      results[b].token = nan ? p.vocab - 1 : best;
    }
    return results;
  }

  c10::InferenceMode guard;
  const DevicePlan d = ToDevice(p, logits.device());
  const at::Tensor x = Process(logits, p, d);

  const auto all = static_cast<size_t>(p.batch);
  at::Tensor tokens;
  at::Tensor greedy, sampled;
  if (!p.greedy_rows.empty()) {
    greedy = Greedy(p.greedy_rows.size() == all ? x : x.index_select(0, d.greedy_rows));
  }
  if (!p.sample_rows.empty()) {
    sampled = Draw(p.sample_rows.size() == all ? x : x.index_select(0, d.sample_rows), d);
  }
  if (!sampled.defined()) {
    tokens = greedy;
  } else if (!greedy.defined()) {
    tokens = sampled;
  } else {
    tokens = at::empty({p.batch}, greedy.options());
    tokens.index_copy_(0, d.greedy_rows, greedy);
    tokens.index_copy_(0, d.sample_rows, sampled);
  }

  if (p.max_logprobs < 0) {
    const at::Tensor host = tokens.to(at::kCPU).contiguous();
    const int64_t* t = host.data_ptr<int64_t>();
    for (size_t b = 0; b < all; ++b) results[b].token = t[b];
    return results;
  }

  // Logprobs of the raw distribution: tokens, chosen logprob, top ids, top logprobs in one
  // float64 tensor (ids < 2^53 are exact), copied to the host once.
  const at::Tensor lp = at::log_softmax(logits, -1);
  std::vector<at::Tensor> parts = {tokens.unsqueeze(1).to(at::kDouble),
                                   lp.gather(1, tokens.unsqueeze(1)).to(at::kDouble)};
  const int64_t n = std::min<int64_t>(p.max_logprobs, p.vocab);
  if (n > 0) {
    auto [values, ids] = lp.topk(n, -1, /*largest=*/true, /*sorted=*/true);
    parts.push_back(ids.to(at::kDouble));
    parts.push_back(values.to(at::kDouble));
  }
  const at::Tensor host = at::cat(parts, 1).to(at::kCPU).contiguous();
  const auto a = host.accessor<double, 2>();
  for (size_t b = 0; b < all; ++b) {
    SampleResult& r = results[b];
    r.token = static_cast<int64_t>(a[b][0]);
    const int32_t want = rows[b].params->logprobs;
    if (want < 0) continue;
    r.logprob = static_cast<float>(a[b][1]);
    const int64_t m = std::min<int64_t>(want, n);
    r.top.reserve(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) {
      r.top.emplace_back(static_cast<int64_t>(a[b][2 + i]), static_cast<float>(a[b][2 + n + i]));
    }
  }
  return results;
}

}  // namespace retnet::engine
