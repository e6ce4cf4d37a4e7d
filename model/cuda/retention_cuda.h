// File: model/cuda/retention_cuda.h
//
// Thin at::Tensor wrappers over the CUDA kernels of retention_kernels.h, on the current CUDA
// stream, plus the CUDA-graph cache of the decode step. Built only against a CUDA LibTorch
// (RETNET_CUDA; model/CMakeLists.txt), used by model/retnet.cc behind RETNET_WITH_CUDA.
// Includes no CUDA headers, so retnet.cc compiles with the C++ compiler alone.
//
// Every function only enqueues work (no device synchronisation, no host copies), so all of them
// may run inside a CUDA-graph capture. Errors throw c10::Error (RetNet turns them into Status).
#ifndef RETNET_MODEL_CUDA_RETENTION_CUDA_H_
#define RETNET_MODEL_CUDA_RETENTION_CUDA_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

namespace retnet::model::cuda {

enum class Rotary { kNone, kRotateHalf, kInterleaved };
enum class Norm { kRms, kLayer };
enum class Act { kSwish, kGelu };

struct StepParams {
  int64_t heads = 0, dk = 0, dv = 0;
  Rotary rotary = Rotary::kRotateHalf;
  float q_scale = 1.0f, k_scale = 1.0f;
  bool inv_sqrt_cn = false;
};

// Whether the fused kernels can launch on `device` (built for its architecture).
bool KernelsRunnable(const at::Device& device);

// One fused recurrent retention step (retnet::cuda::RecurrentRetentionStep): q, k [B, H*dk] and
// v [B, H*dv] (2-D, unit column stride, any row stride: slices of one fused projection), of one
// floating dtype; positions int64 [B]; log_decay fp32 [H]; theta fp32 [dk/2]. The state rows of
// row b are at state + slot * slot_stride (slot = slots[b], int32 [B], or b when undefined),
// fp32 or bf16 (`state_dtype`), updated in place. Returns o fp32 [B, H, dv].
at::Tensor RetentionStep(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& positions, const at::Tensor& log_decay,
                         const at::Tensor& theta, const StepParams& p, void* state,
                         at::ScalarType state_dtype, int64_t slot_stride, const at::Tensor& slots);

// Norm over the last `cols` of x viewed as [outer, inner_rows, cols] (x 2-D [outer,
// inner_rows * cols], unit column stride), fp32 math, optional fp32 weight/bias [cols]; with a
// gate ([outer, inner_rows * cols], same layout) returns act(gate) * norm(x) in the gate's dtype,
// otherwise norm(x) in `out_dtype`. Output contiguous [outer, inner_rows * cols].
at::Tensor NormGate(const at::Tensor& x, int64_t inner_rows, const at::Tensor& weight,
                    const at::Tensor& bias, Norm kind, double eps, const at::Tensor& gate, Act act,
                    at::ScalarType out_dtype);

// act(x[:, :F]) * x[:, F:2F] for x [B, >= 2F] (unit column stride); contiguous [B, F].
at::Tensor GatedActivation(const at::Tensor& x, int64_t f, Act act);

// CUDA-graph replay of a decode step, one graph per (power-of-two batch bucket, state location).
// The step body is captured with static token/position/slot buffers of the bucket's size; rows
// beyond the batch get slot -1, so they never touch any state. Thread-safe; replays are ordered
// across streams with an event.
class StepGraphCache {
 public:
  // Body: (tokens int64 [bucket], positions int64 [bucket], slots int32 [bucket]) -> logits
  // [bucket, V]; it must only enqueue work (capturable).
  using Body = std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>;
  static constexpr int64_t kMaxBucket = 1024;

  StepGraphCache();
  ~StepGraphCache();
  StepGraphCache(const StepGraphCache&) = delete;
  StepGraphCache& operator=(const StepGraphCache&) = delete;

  // Smallest power of two >= batch, or 0 when batch > kMaxBucket (run eagerly then).
  static int64_t Bucket(int64_t batch);

  // Replays (capturing on first use) the step for `tokens`/`positions` ([B] int64, any device);
  // `key` identifies the state rows the body writes (its base pointer and strides); `slots`
  // (int32 [B] on the device; undefined = rows 0..B-1) the state slot of each row. Returns a
  // fresh logits tensor [B, V].
  at::Tensor Run(const at::Tensor& tokens, const at::Tensor& positions,
                 std::tuple<uintptr_t, int64_t, int64_t> key, const Body& body,
                 const at::Tensor& slots = at::Tensor());

  // Number of captured graphs (tests).
  size_t size() const;

 private:
  struct Entry;
  struct State;
  mutable std::mutex mu_;
  std::unique_ptr<State> state_;
};

}  // namespace retnet::model::cuda

#endif  // RETNET_MODEL_CUDA_RETENTION_CUDA_H_
