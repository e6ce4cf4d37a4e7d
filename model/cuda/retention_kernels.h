// File: model/cuda/retention_kernels.h
//
// Fused CUDA kernels for the RetNet decode step, behind a plain C++ interface: raw device
// pointers, element strides and a cudaStream_t, no torch headers (so CI compiles them with the
// local nvcc even though its LibTorch has no CUDA). model/cuda/retention_cuda.cc wraps them for
// at::Tensor and the current stream; it is built only against a CUDA LibTorch.
//
//   RecurrentRetentionStep  one recurrent retention step for B sessions x H heads, in place in a
//                           state pool: rotary + 1/sqrt(d_k) on q and k, S <- gamma S + k v^T,
//                           o = q^T S (after the update), optional 1/sqrt(c_n) row factor.
//                           Every state element is read once and written once.
//   NormGate                row norm (RMSNorm or LayerNorm, fp32 math, optional fp32 affine),
//                           optionally times act(gate): the block pre-norms and the per-head
//                           group norm + swish gate, with the reference path's roundings.
//   GatedActivation         act(x[:, :F]) * x[:, F:2F] (SwiGLU / GLU on one fused projection).
//
// All kernels are enqueued on `stream`, never synchronise, allocate nothing and are safe to
// capture in a CUDA graph. They return the launch error (cudaSuccess when enqueued).
#ifndef RETNET_MODEL_CUDA_RETENTION_KERNELS_H_
#define RETNET_MODEL_CUDA_RETENTION_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace retnet::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class RotaryKind : int { kNone = 0, kRotateHalf = 1, kInterleaved = 2 };
enum class NormKind : int { kRms = 0, kLayer = 1 };
enum class ActKind : int { kSwish = 0, kGelu = 1 };

struct RetentionStepArgs {
  int batch = 0, heads = 0, dk = 0, dv = 0;
  // Projections of row b, head h: q + b * q_row_stride + h * dk (k likewise; v with dv).
  // One dtype for the three (they may be column slices of one fused q|k|v|g projection).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_row_stride = 0, k_row_stride = 0, v_row_stride = 0;
  DType in_dtype = DType::kFloat32;
  const int64_t* positions = nullptr;  // [B] absolute position of each row's token
  const float* log_decay = nullptr;    // [H] log(gamma_h); gamma = exp(log_decay)
  const float* theta = nullptr;        // [dk/2] rotary frequencies (unused for kNone)
  RotaryKind rotary = RotaryKind::kRotateHalf;
  float q_scale = 1.0f, k_scale = 1.0f;  // multiplied in after the rotation
  bool inv_sqrt_cn = false;              // o *= 1/sqrt(sum_{j<=n} gamma^j), n = position
  // State of row b, head h: state + slot * slot_stride + h * dk * dv, [dk, dv] row-major, where
  // slot = slots ? slots[b] : b. A negative slot marks a padding row (a CUDA-graph bucket larger
  // than the batch): its state is not touched and its output is zero.
  void* state = nullptr;
  DType state_dtype = DType::kFloat32;  // kFloat32, or kBFloat16 storage (fp32 math)
  int64_t slot_stride = 0;
  const int32_t* slots = nullptr;
  float* out = nullptr;  // [B, H, dv] contiguous, fp32
};

cudaError_t RecurrentRetentionStep(const RetentionStepArgs& a, cudaStream_t stream);

struct NormGateArgs {
  // Rows are (outer, inner) pairs, inner in [0, inner_rows), each `cols` wide and contiguous:
  // x + outer * x_outer_stride + inner * cols (gate and out likewise). Block norms: outer = B,
  // inner_rows = 1. Group norm: outer = B, inner_rows = H, cols = d_v.
  int outer_rows = 0, inner_rows = 1, cols = 0;
  const void* x = nullptr;
  DType x_dtype = DType::kFloat32;
  int64_t x_outer_stride = 0;
  const float* weight = nullptr;  // [cols] or null
  const float* bias = nullptr;    // [cols] or null
  NormKind kind = NormKind::kRms;
  float eps = 1e-6f;
  // Optional gate: out = round(round(act(gate)) * round(norm(x))) in the gate's dtype, which is
  // then also the output dtype. Without a gate: out = round(norm(x)) in out_dtype.
  const void* gate = nullptr;
  DType gate_dtype = DType::kFloat32;
  int64_t gate_outer_stride = 0;
  ActKind act = ActKind::kSwish;
  void* out = nullptr;
  DType out_dtype = DType::kFloat32;
  int64_t out_outer_stride = 0;
};

cudaError_t NormGate(const NormGateArgs& a, cudaStream_t stream);

struct GatedActivationArgs {
  int rows = 0, cols = 0;  // cols = F
  // a = x + r * x_row_stride + [0, F), b = a + F; out + r * cols (contiguous [rows, F]).
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  DType dtype = DType::kFloat32;  // of x and out
  ActKind act = ActKind::kSwish;
  void* out = nullptr;
};

cudaError_t GatedActivation(const GatedActivationArgs& a, cudaStream_t stream);

// Number of CUDA devices the runtime sees (0 when none or no driver); never fails.
int CudaDeviceCount();

// Whether the kernels were built for `device`'s architecture (a binary built for sm_90 only
// cannot launch them on an sm_80 GPU); never fails. Callers fall back to the reference path.
bool KernelsRunnableOn(int device);

// Host-side reference of RecurrentRetentionStep for fp32 inputs and state, in plain C++ (used by
// the kernel self-test binary; `a`'s pointers are host pointers here).
void RecurrentRetentionStepHost(const RetentionStepArgs& a);

}  // namespace retnet::cuda

#endif  // RETNET_MODEL_CUDA_RETENTION_KERNELS_H_
