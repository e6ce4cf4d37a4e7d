// File: model/retnet.h
//
// The RetNet model API: one configurable network (see config.h) and its three equivalent forms.
//
//   Parallel   whole sequences from position 0, no state: O = (Q K^T ⊙ D) V.
//   Chunkwise  continues a state from position `start`, chunk by chunk (chunk size C): the state
//              after the call is exactly the state after the last real token (no padding exists:
//              a final partial chunk is run at its own length). Prefill uses this form.
//   Step       one recurrent step for B sessions at once, each at its own position; the state
//              rows are updated in place (O(1) work and memory per token).
//
// State: one fp32 tensor [num_layers, B, H, d_k, d_v] per batch (key-major, like fla); row b
// belongs to one session; its position is kept by the caller. A serving engine keeps a pool
// [num_layers, slots, H, d_k, d_v] and passes `pool.narrow(1, first, B)`, a view, so that the step
// advances the pool's rows in place without gathering or scattering them.
// Masks, decays, the retention sums and the state are fp32 whatever the weight dtype.
//
// Ownership and threading: a RetNet owns its weights and is immutable after creation. All const
// methods may run concurrently from several threads provided that they are given distinct state
// tensors. Methods set c10::InferenceMode themselves.
#ifndef RETNET_MODEL_RETNET_H_
#define RETNET_MODEL_RETNET_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace retnet::model {

namespace cuda {
class StepGraphCache;  // model/cuda/retention_cuda.h
}  // namespace cuda
namespace cpu {
struct StepWeights;  // model/cpu_step.h
class StepWorkspace;
}  // namespace cpu

// Per-layer buffers: log decay log(gamma_h) [H] and rotary frequencies theta [d_k/2], fp32.
struct LayerBuffers {
  at::Tensor log_decay;
  at::Tensor theta;
};

// Weights by internal name (see ExpectedTensors()) plus one LayerBuffers per layer.
struct ModelWeights {
  std::map<std::string, at::Tensor> tensors;
  std::vector<LayerBuffers> buffers;
};

// Default buffers: log(1 - 2^(-5-h)) and the config's rotary frequencies.
LayerBuffers DefaultBuffers(const ModelConfig& config);

struct ModelOptions {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // kFloat, kBFloat16 or kHalf
  // Which implementation runs Step and the chunkwise prefill (the function is the same):
  //   kAuto       the fast path: on a CUDA device when this build has the CUDA kernels
  //               (RetNet::CudaKernelsCompiled()), on the CPU for float32 weights; the reference
  //               ops otherwise. The environment variable RETNET_FUSED_RETENTION=0 turns kAuto
  //               into kReference on CUDA, RETNET_CPU_FAST_PATH=0 on the CPU.
  //   kReference  always the eager reference ops (kept for tests and as the baseline).
  //   kFast       the fast path wherever it exists: on CUDA the fused kernels (model/cuda/),
  //               CUDA graphs and the batched chunkwise prefill; on the CPU the batched
  //               chunkwise prefill and, for float32 weights, the hand-written step
  //               (model/cpu_step.h: GEMMs into preallocated buffers, one fused pass per
  //               (session, head)); bfloat16/float16 CPU steps fall back to the reference.
  enum class Path { kAuto, kReference, kFast };
  Path path = Path::kAuto;
  // Fast path on CUDA: replay each decode step from a CUDA graph captured per power-of-two batch
  // bucket (up to 1024 rows). RETNET_CUDA_GRAPHS=0 in the environment turns it off.
  bool cuda_graphs = true;
};

// Parses "cpu"/"cuda"/"cuda:N" and "float32"/"bfloat16"/"float16"; InvalidArgument otherwise
// (also when CUDA is requested but not available).
absl::StatusOr<at::Device> ParseDevice(const std::string& name);
absl::StatusOr<at::ScalarType> ParseDtype(const std::string& name);

enum class Outputs { kAll, kLast };

class RetNet {
 public:
  // Validates every tensor against ExpectedTensors(config) and moves the weights to the device
  // and dtype in `options` (norm weights, buffers stay fp32).
  static absl::StatusOr<std::unique_ptr<RetNet>> Create(ModelConfig config, ModelWeights weights,
                                                        const ModelOptions& options);
  // A model with deterministic random weights (tests and benchmarks).
  static absl::StatusOr<std::unique_ptr<RetNet>> CreateRandom(ModelConfig config, uint64_t seed,
                                                              const ModelOptions& options);

  // Whether this build contains the fused CUDA kernels (a CUDA LibTorch build, RETNET_CUDA).
  static bool CudaKernelsCompiled();

  const ModelConfig& config() const { return config_; }
  // Which paths this model runs (resolved from ModelOptions::path at creation).
  bool fused_step() const { return fused_step_; }
  bool cpu_fast_step() const { return cpu_weights_ != nullptr; }
  bool fast_prefill() const { return fast_prefill_; }
  bool cuda_graphs() const { return graphs_ != nullptr; }
  const ModelOptions& options() const { return options_; }
  // 64-bit fingerprint of the config and the weights as loaded (sums and a sample of every
  // tensor): equal for the same checkpoint, different for another model. Used by snapshots.
  uint64_t fingerprint() const { return fingerprint_; }

  // [num_layers, batch, H, d_k, d_v]
  std::vector<int64_t> StateShape(int64_t batch) const;
  // Bytes of one session's state (fp32), excluding its 8-byte position.
  int64_t StateBytesPerSession() const;
  // A zero state for `batch` sessions on the model's device.
  at::Tensor NewState(int64_t batch) const;

  // `input`: tokens int64 [B, T] for a language model, or features [B, T, D] for a backbone.
  // Returns logits [B, T, V] (or hidden [B, T, D]) as float32.
  absl::StatusOr<at::Tensor> Parallel(const at::Tensor& input) const;

  // Continues `state` ([L, B, H, d_k, d_v] fp32, updated in place) from absolute position
  // `start` over `input` ([B, T] or [B, T, D]) in chunks of `chunk_size` (0 = one chunk).
  // Returns outputs for every position, or only the last one ([B, 1, ...]) with Outputs::kLast.
  absl::StatusOr<at::Tensor> Chunkwise(const at::Tensor& input, const at::Tensor& state,
                                       int64_t start, int64_t chunk_size,
                                       Outputs outputs = Outputs::kAll) const;

  // One recurrent step: `input` tokens int64 [B] (or features [B, D]); `positions` int64 [B] on
  // any device, the absolute position of each row's token; `state` [L, B, H, d_k, d_v] updated
  // in place. Returns logits [B, V] (or hidden [B, D]) float32. Precondition (not checked, to
  // keep the hot path free of device syncs): token ids are in [0, vocab_size).
  absl::StatusOr<at::Tensor> Step(const at::Tensor& input, const at::Tensor& positions,
                                  const at::Tensor& state) const;

  // Slot-indexed step: row b advances slot slots[b] of `pool` ([L, S, H, d_k, d_v] fp32, each
  // slot's per-layer block contiguous), in place; the other slots are untouched. `slots` must
  // be distinct and in [0, S) (checked: INVALID_ARGUMENT). This is what a serving engine calls:
  // the decoding sessions keep their slots, nothing is packed or copied.
  absl::StatusOr<at::Tensor> Step(const at::Tensor& input, const at::Tensor& positions,
                                  const at::Tensor& pool, const std::vector<int64_t>& slots) const;

 private:
  struct Linear {
    at::Tensor w, b;
  };
  struct Norm {
    at::Tensor w, b;  // fp32; either may be undefined
  };
  struct Layer {
    Norm attn_norm, ffn_norm, inner_norm;
    Linear q, k, v, g, o;
    // Fast path on CUDA: q|k|v|g and act|lin as one weight each; the separate Linears above are
    // row views of them (no extra memory). Undefined otherwise.
    Linear qkvg, act_lin;
    at::Tensor gn_w, gn_b;  // fp32 [d_v]
    std::vector<Linear> mlp;
    Linear ffn_act, ffn_lin, ffn_out;
    at::Tensor log_decay, theta;  // fp32 on device
  };

  RetNet(ModelConfig config, const ModelOptions& options)
      : config_(std::move(config)), options_(options) {}

  absl::Status CheckState(const at::Tensor& state, int64_t batch) const;
  absl::Status CheckInput(const at::Tensor& input, int64_t dims) const;
  at::Tensor ApplyLinear(const Linear& l, const at::Tensor& x) const;
  at::Tensor ApplyNorm(const Norm& n, const at::Tensor& x, bool block) const;
  at::Tensor Rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const;
  at::Tensor Embed(const at::Tensor& input) const;
  at::Tensor Head(const at::Tensor& x) const;
  at::Tensor Ffn(const Layer& layer, const at::Tensor& x) const;
  // Gate, per-head norm and output projection of a retention output o [..., H, d_v] (fp32).
  at::Tensor MixOutput(const Layer& layer, const at::Tensor& o, const at::Tensor& g) const;
  // Retention over a [B, T, D] block from `start`; `state` ([B, H, d_k, d_v]) may be undefined.
  at::Tensor SequenceMixer(const Layer& layer, const at::Tensor& h, int64_t start,
                           const at::Tensor& state, int64_t chunk_size) const;
  at::Tensor Sequence(const at::Tensor& input, const at::Tensor& state, int64_t start,
                      int64_t chunk_size, Outputs outputs) const;
  at::Tensor ReferenceStep(const at::Tensor& input, const at::Tensor& positions,
                           const at::Tensor& state) const;
  // Step on `state` rows slots[b] (or b when `slots` is null), after the checks.
  at::Tensor StepRows(const at::Tensor& input, const at::Tensor& positions, const at::Tensor& state,
                      const std::vector<int64_t>* slots) const;
  std::shared_ptr<cpu::StepWeights> MakeCpuWeights() const;
  at::Tensor CpuStep(const at::Tensor& input, const at::Tensor& positions, const at::Tensor& state,
                     const std::vector<int64_t>* slots) const;
  // The fused decode step (model/cuda/; defined only in CUDA builds, RETNET_WITH_CUDA): layer
  // l's state rows are at state_base + l * layer_stride + slot * slot_stride, slot = slots[b]
  // (int32, -1 = padding) or b when `slots` is undefined. `positions` int64 [B] on the device.
  at::Tensor FusedStep(const at::Tensor& input, const at::Tensor& positions, float* state_base,
                       int64_t layer_stride, int64_t slot_stride, const at::Tensor& slots) const;

  ModelConfig config_;
  ModelOptions options_;
  uint64_t fingerprint_ = 0;
  at::ScalarType compute_dtype_ =
      at::kFloat;  // activations: the weight dtype, but fp32 for CPU fp16
  at::Tensor embed_, lm_head_;
  Norm embed_norm_, final_norm_;
  std::vector<Layer> layers_;
  bool fused_step_ = false;
  bool fast_prefill_ = false;
  // Captured decode steps (fast path on CUDA with graphs); shared_ptr so that the type stays
  // incomplete in builds without CUDA.
  std::shared_ptr<cuda::StepGraphCache> graphs_;
  // CPU fast step (float32 on the CPU, path kFast or kAuto): raw views of the weights above, and
  // idle workspaces (one is taken per call, so concurrent calls never share one).
  std::shared_ptr<cpu::StepWeights> cpu_weights_;
  mutable std::mutex workspace_mu_;
  mutable std::vector<std::shared_ptr<cpu::StepWorkspace>> workspaces_;
};

}  // namespace retnet::model

#endif  // RETNET_MODEL_RETNET_H_
