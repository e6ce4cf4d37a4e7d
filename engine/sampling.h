// File: engine/sampling.h
//
// The serving engine's sampler: per-request sampling parameters, their validation, a
// counter-based random number generator, and batched sampling of the next token for B sessions
// from one [B, V] logits tensor on the model's device.
//
// Reproducibility: a row's random state is just (seed, counter). The draw of step `counter` uses
// u = UniformFromCounter(seed, counter) and nothing else, so a session can be snapshotted as two
// integers and resumed anywhere, and a row's token never depends on the other rows of its batch.
//
// Ownership and threading: everything here is a free function or a plain struct. SampleRow holds
// non-owning pointers that must stay valid for the duration of the SampleBatch call. Concurrent
// calls are safe (they share no state) as long as they do not write the same tensors.
#ifndef RETNET_ENGINE_SAMPLING_H_
#define RETNET_ENGINE_SAMPLING_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/sampling_params.h"

namespace retnet::engine {

// One session's row of a SampleBatch call.
struct SampleRow {
  const SamplingParams* params = nullptr;  // not owned; must be validated
  uint64_t seed = 0;                       // effective seed
  uint64_t counter = 0;  // draws so far (the caller increments it after each step)
  const std::vector<int64_t>* prompt_tokens = nullptr;  // for repetition_penalty; may be null
  const std::vector<int64_t>* output_tokens = nullptr;  // generated so far; may be null
  std::vector<int64_t> suppress;  // ids forbidden this step (EOS + stop ids before min_tokens)
};

struct SampleResult {
  int64_t token = -1;
  // Log prob of the chosen token under the model's distribution, i.e. log_softmax of the RAW
  // logits (before bias, penalties, suppression, temperature and filters); when logprobs >= 0.
  float logprob = 0;
  // The top-n (id, logprob) of the raw distribution, descending, when logprobs = n > 0. The
  // order among exactly equal log probs is unspecified.
  std::vector<std::pair<int64_t, float>> top;
};

// The logits after the processors that do not depend on temperature, in this order:
// logit_bias (added), repetition penalty (tokens in prompt or output: x > 0 ? x / r : x * r),
// presence and frequency penalties (x -= presence + frequency * count, tokens in the output),
// suppression (-inf). Returns a new float32 [B, V] tensor on the logits' device; `logits` is not
// modified. Only the listed token ids are touched (gather/scatter), never a host loop over V.
// InvalidArgument when the shapes do not match or a token id is outside [0, V).
absl::StatusOr<at::Tensor> ProcessLogits(const at::Tensor& logits,
                                         const std::vector<SampleRow>& rows);

// One call per engine step: `logits` float32 [B, V] on any device (CPU or CUDA), row b sampled
// with rows[b]. After ProcessLogits():
//   temperature == 0: argmax (the lowest id on ties);
//   otherwise: x / temperature -> softmax -> top_k (the k most probable) -> top_p (the smallest
//   prefix, by descending probability of the top_k-renormalised distribution, whose mass is
//   >= top_p) -> min_p (drops tokens with prob < min_p * max prob) -> inverse-CDF draw with
//   u = UniformFromCounter(seed, counter) over the kept tokens in descending-probability order
//   (ties by ascending id): the token whose cumulative interval [c_{i-1}, c_i) contains
//   u * (kept mass).
// All rows are processed by batched tensor ops; the per-row parameters travel to the device in
// one int64 and one float64 tensor, and the results come back in one device->host copy.
// InvalidArgument (naming the row) when the shapes do not match, a row has no params, or a
// token id is outside [0, V). Parameters are assumed validated (ValidateSamplingParams).
// If every token of a sampled row is forbidden, the row's token is unspecified but in [0, V).
absl::StatusOr<std::vector<SampleResult>> SampleBatch(const at::Tensor& logits,
                                                      const std::vector<SampleRow>& rows);

}  // namespace retnet::engine

#endif  // RETNET_ENGINE_SAMPLING_H_
