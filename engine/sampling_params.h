// File: engine/sampling_params.h
//
// Per-request sampling parameters, their validation and the counter-based RNG: the torch-free
// part of the sampler (sampling.h), so that the gRPC layer can use it without ATen headers.
// Plain structs and pure functions; thread-safe.
#ifndef RETNET_ENGINE_SAMPLING_PARAMS_H_
#define RETNET_ENGINE_SAMPLING_PARAMS_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace retnet::engine {

// Per-request sampling parameters (OpenAI/vLLM-like). Ranges are checked by
// ValidateSamplingParams().
struct SamplingParams {
  double temperature = 1.0;  // 0 = greedy; must be >= 0
  int64_t top_k = 0;         // 0 = off; >= 0
  double top_p = 1.0;        // (0, 1]
  double min_p = 0.0;        // [0, 1)
  // > 0; 1 = off. HF/CTRL style over the tokens seen in the prompt AND the output: positive
  // logits are divided by it, negative ones multiplied.
  double repetition_penalty = 1.0;
  double presence_penalty = 0.0;   // [-2, 2]; subtracted once from every token seen in the OUTPUT
  double frequency_penalty = 0.0;  // [-2, 2]; subtracted `count` times (count in the OUTPUT)
  // token id -> added to its logit; ids in [0, vocab), each at most once; bias in [-100, 100].
  std::vector<std::pair<int64_t, double>> logit_bias;
  std::optional<uint64_t> seed;  // per-request seed; absent = the engine picks one
  int64_t max_new_tokens = 128;  // >= 1 (the upper limit is the engine's business)
  // >= 0, <= max_new_tokens: EOS and the stop token ids are suppressed until this many tokens
  // were produced (the engine does this through SampleRow::suppress).
  int64_t min_tokens = 0;
  std::vector<int64_t> stop_token_ids;    // ids in [0, vocab)
  std::vector<std::string> stop_strings;  // non-empty strings, at most kMaxStopStrings
  bool ignore_eos = false;
  // -1 = none; 0 = log prob of the chosen token; n in [1, kMaxLogprobs] = chosen + top n.
  int32_t logprobs = -1;
};

inline constexpr int kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 1024;  // each
inline constexpr int32_t kMaxLogprobs = 20;
inline constexpr double kMaxLogitBias = 100.0;
inline constexpr double kMaxPresenceFrequencyPenalty = 2.0;

// OK, or InvalidArgument with a message naming the field, e.g.
// "sampling.top_p: must be in (0, 1], got 1.5". Non-finite values are rejected everywhere.
absl::Status ValidateSamplingParams(const SamplingParams& p, int64_t vocab_size);

// A counter-based generator: a pure function of (seed, counter) returning a double in [0, 1)
// with 53 random bits. Mixing (all arithmetic mod 2^64):
//   Mix(z)  = the SplitMix64 finaliser: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
//             z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31   (a bijection on 64 bits)
//   key     = Mix(seed ^ 0x243F6A8885A308D3)          (a per-seed key; pi's fractional digits)
//   bits    = Mix(Mix(key + (counter + 1) * 0x9E3779B97F4A7C15) ^ key)
//   result  = (bits >> 11) * 2^-53
// The first Mix of the key decorrelates neighbouring seeds (so seeds s and s + golden ratio do
// not share a shifted stream, as they would in plain SplitMix64); the two rounds over the
// Weyl sequence key + n * golden give well-mixed output for consecutive counters.
uint64_t BitsFromCounter(uint64_t seed, uint64_t counter);
double UniformFromCounter(uint64_t seed, uint64_t counter);

}  // namespace retnet::engine

#endif  // RETNET_ENGINE_SAMPLING_PARAMS_H_
