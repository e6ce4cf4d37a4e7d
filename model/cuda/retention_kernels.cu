// File: model/cuda/retention_kernels.cu — see retention_kernels.h.
//
// RecurrentRetentionStep: grid (B * H, ceil(dv / tile)), 256 threads. A block owns one
// (session, head) and a tile of `tile` state columns; each thread owns VEC adjacent columns and
// walks the rows i = r0, r0 + groups, ... of the tile, so a warp touches contiguous row segments
// (coalesced) and every state element is loaded once, updated (decay, then + k_i v_j) and stored
// once; the readout o_j = sum_i q_i S_ij uses the updated value from registers. The per-thread
// partial sums over rows are reduced through shared memory. q and k (rotated, scaled, fp32) are
// staged in shared memory once per block. The tile shrinks for small batches so that the grid
// still covers the SMs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <vector>

#include "model/cuda/retention_kernels.h"

namespace retnet::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float ToFloat(T x);
template <>
__device__ __forceinline__ float ToFloat<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float ToFloat<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}

// Rounds through T (what storing an fp32 result in a T tensor does).
template <typename T>
__device__ __forceinline__ float Round(float x) {
  return ToFloat<T>(FromFloat<T>(x));
}

__device__ __forceinline__ float Act(float x, ActKind act) {
  if (act == ActKind::kSwish) return x / (1.0f + expf(-x));
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}

// VEC consecutive state values: one 16-byte (fp32) or 8-byte (bf16) access when VEC == 4.
template <typename TS, int VEC>
struct StateIo {
  static __device__ __forceinline__ void Load(const TS* p, float* s) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) s[e] = ToFloat<TS>(p[e]);
  }
  static __device__ __forceinline__ void Store(TS* p, const float* s) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = FromFloat<TS>(s[e]);
  }
};
template <>
struct StateIo<float, 4> {
  static __device__ __forceinline__ void Load(const float* p, float* s) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    s[0] = x.x;
    s[1] = x.y;
    s[2] = x.z;
    s[3] = x.w;
  }
  static __device__ __forceinline__ void Store(float* p, const float* s) {
    *reinterpret_cast<float4*>(p) = make_float4(s[0], s[1], s[2], s[3]);
  }
};
template <>
struct StateIo<__nv_bfloat16, 4> {
  static __device__ __forceinline__ void Load(const __nv_bfloat16* p, float* s) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
    const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
    const float2 fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
    s[0] = fa.x;
    s[1] = fa.y;
    s[2] = fb.x;
    s[3] = fb.y;
  }
  static __device__ __forceinline__ void Store(__nv_bfloat16* p, const float* s) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(s[0], s[1]);
    const __nv_bfloat162 b = __floats2bfloat162_rn(s[2], s[3]);
    uint2 raw;
    raw.x = *reinterpret_cast<const unsigned int*>(&a);
    raw.y = *reinterpret_cast<const unsigned int*>(&b);
    *reinterpret_cast<uint2*>(p) = raw;
  }
};

// Rotated and scaled element i of a head vector x[0, dk): the reference's
// cat(a cos - b sin, b cos + a sin) (rotate-half) or the interleaved pairs, each product and sum
// rounded separately (no contraction), angle = float(position) * theta.
template <typename TI>
__device__ __forceinline__ float RotatedElement(const TI* x, int i, int dk, float pos,
                                                const float* theta, RotaryKind rotary,
                                                float scale) {
  float y;
  if (rotary == RotaryKind::kNone) {
    y = ToFloat<TI>(x[i]);
  } else {
    const int half = dk / 2;
    int p, ia, ib;
    bool first;
    if (rotary == RotaryKind::kRotateHalf) {
      p = i < half ? i : i - half;
      ia = p;
      ib = p + half;
      first = i < half;
    } else {
      p = i / 2;
      ia = 2 * p;
      ib = 2 * p + 1;
      first = (i % 2) == 0;
    }
    const float angle = __fmul_rn(pos, theta[p]);
    const float c = cosf(angle), s = sinf(angle);
    const float a = ToFloat<TI>(x[ia]), b = ToFloat<TI>(x[ib]);
    y = first ? __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s))
              : __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
  return scale == 1.0f ? y : __fmul_rn(y, scale);
}

template <typename TI, typename TS, int VEC>
__global__ void __launch_bounds__(kThreads)
    RetentionStepKernel(const RetentionStepArgs a, const int tile) {
  extern __shared__ float smem[];
  float* qs = smem;         // [dk]
  float* ks = smem + a.dk;  // [dk]
  float* red = ks + a.dk;   // [kThreads * VEC]
  const int b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
  const int slot = a.slots != nullptr ? a.slots[b] : b;
  const int c0 = blockIdx.y * tile;
  float* out = a.out + (static_cast<int64_t>(b) * a.heads + h) * a.dv;
  if (slot < 0) {  // padding row of a graph bucket: state untouched, output zero
    for (int j = threadIdx.x; j < tile && c0 + j < a.dv; j += blockDim.x) out[c0 + j] = 0.0f;
    return;
  }
  const float pos = static_cast<float>(a.positions[b]);
  const TI* q = static_cast<const TI*>(a.q) + b * a.q_row_stride + static_cast<int64_t>(h) * a.dk;
  const TI* k = static_cast<const TI*>(a.k) + b * a.k_row_stride + static_cast<int64_t>(h) * a.dk;
  const TI* v = static_cast<const TI*>(a.v) + b * a.v_row_stride + static_cast<int64_t>(h) * a.dv;
  for (int i = threadIdx.x; i < a.dk; i += blockDim.x) {
    qs[i] = RotatedElement(q, i, a.dk, pos, a.theta, a.rotary, a.q_scale);
    ks[i] = RotatedElement(k, i, a.dk, pos, a.theta, a.rotary, a.k_scale);
  }
  __syncthreads();

  const float lg = a.log_decay[h];
  const float gamma = expf(lg);
  const int per_row = tile / VEC;  // threads per state row
  const int groups = kThreads / per_row;
  const int cv = threadIdx.x % per_row, r0 = threadIdx.x / per_row;
  const int col = c0 + cv * VEC;  // VEC == 4 implies dv % 4 == 0, so col < dv covers all 4
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
  if (col < a.dv) {
    float vv[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) vv[e] = ToFloat<TI>(v[col + e]);
    TS* s = static_cast<TS*>(a.state) + slot * a.slot_stride +
            static_cast<int64_t>(h) * a.dk * a.dv + col;
    // kUnroll rows per iteration: all loads are issued before any store, so several memory
    // transactions are in flight per thread (the compiler cannot prove the rows do not alias).
    constexpr int kUnroll = 4;
    for (int i0 = r0; i0 < a.dk; i0 += kUnroll * groups) {
      float x[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = i0 + u * groups;
        if (i < a.dk) StateIo<TS, VEC>::Load(s + static_cast<int64_t>(i) * a.dv, x[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = i0 + u * groups;
        if (i >= a.dk) break;
        const float ki = ks[i], qi = qs[i];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          x[u][e] = fmaf(ki, vv[e], __fmul_rn(gamma, x[u][e]));  // S <- gamma S, S += k v^T
          acc[e] = fmaf(qi, x[u][e], acc[e]);
        }
        StateIo<TS, VEC>::Store(s + static_cast<int64_t>(i) * a.dv, x[u]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) red[r0 * tile + cv * VEC + e] = acc[e];
  __syncthreads();
  float alpha = 1.0f;
  if (a.inv_sqrt_cn) {
    alpha = rsqrtf(__fdiv_rn(expm1f(__fmul_rn(__fadd_rn(pos, 1.0f), lg)), expm1f(lg)));
  }
  for (int j = threadIdx.x; j < tile; j += blockDim.x) {
    if (c0 + j >= a.dv) break;
    float sum = 0.0f;
    for (int g = 0; g < groups; ++g) sum += red[g * tile + j];
    out[c0 + j] = a.inv_sqrt_cn ? __fmul_rn(sum, alpha) : sum;
  }
}

int SmCount() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    return 132;
  return sms;
}

template <typename TI, typename TS, int VEC>
cudaError_t LaunchStep(const RetentionStepArgs& a, cudaStream_t stream) {
  // Widest tile (fewest partial sums) that still gives about two blocks per SM.
  // tile / VEC threads per row must divide kThreads; narrow value heads get a narrow tile.
  constexpr int kMaxTile = 128, kMinTile = 8 * VEC;
  int tile = kMaxTile;
  while (tile > kMinTile && tile / 2 >= a.dv) tile /= 2;
  const int64_t target = 2 * static_cast<int64_t>(SmCount());
  while (tile > kMinTile &&
         static_cast<int64_t>(a.batch) * a.heads * ((a.dv + tile - 1) / tile) < target) {
    tile /= 2;
  }
  const dim3 grid(static_cast<unsigned>(a.batch * a.heads),
                  static_cast<unsigned>((a.dv + tile - 1) / tile));
  const size_t shmem = sizeof(float) * (2 * static_cast<size_t>(a.dk) + kThreads * VEC);
  if (shmem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(RetentionStepKernel<TI, TS, VEC>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shmem));
    if (e != cudaSuccess) return e;
  }
  RetentionStepKernel<TI, TS, VEC><<<grid, kThreads, shmem, stream>>>(a, tile);
  return cudaGetLastError();
}

template <typename TI, typename TS>
cudaError_t DispatchVec(const RetentionStepArgs& a, cudaStream_t stream) {
  const size_t align = sizeof(TS) * 4;
  const bool vec4 =
      a.dv % 4 == 0 && a.slot_stride % 4 == 0 && reinterpret_cast<uintptr_t>(a.state) % align == 0;
  return vec4 ? LaunchStep<TI, TS, 4>(a, stream) : LaunchStep<TI, TS, 1>(a, stream);
}

template <typename TI>
cudaError_t DispatchState(const RetentionStepArgs& a, cudaStream_t stream) {
  switch (a.state_dtype) {
    case DType::kFloat32:
      return DispatchVec<TI, float>(a, stream);
    case DType::kBFloat16:
      return DispatchVec<TI, __nv_bfloat16>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------------------------
// NormGate: one block per row, fp32 reductions (sum, then sum of squares around the mean for
// LayerNorm), warp shuffles + shared memory.

__device__ __forceinline__ float BlockSum(float x, float* shared) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += shared[w];
  return total;
}

template <typename TX, typename TG, typename TO>
__global__ void __launch_bounds__(kThreads) NormGateKernel(const NormGateArgs a) {
  __shared__ float shared[kThreads / 32];
  const int outer = blockIdx.x / a.inner_rows, inner = blockIdx.x % a.inner_rows;
  const TX* x =
      static_cast<const TX*>(a.x) + outer * a.x_outer_stride + static_cast<int64_t>(inner) * a.cols;
  TO* out =
      static_cast<TO*>(a.out) + outer * a.out_outer_stride + static_cast<int64_t>(inner) * a.cols;
  const TG* g = a.gate == nullptr ? nullptr
                                  : static_cast<const TG*>(a.gate) + outer * a.gate_outer_stride +
                                        static_cast<int64_t>(inner) * a.cols;
  const float n = static_cast<float>(a.cols);
  float mean = 0.0f, scale;
  if (a.kind == NormKind::kLayer) {
    float s = 0.0f;
    for (int j = threadIdx.x; j < a.cols; j += blockDim.x) s += ToFloat<TX>(x[j]);
    mean = BlockSum(s, shared) / n;
  }
  float ss = 0.0f;
  for (int j = threadIdx.x; j < a.cols; j += blockDim.x) {
    const float d = ToFloat<TX>(x[j]) - mean;
    ss += d * d;
  }
  scale = rsqrtf(BlockSum(ss, shared) / n + a.eps);
  for (int j = threadIdx.x; j < a.cols; j += blockDim.x) {
    float y = (ToFloat<TX>(x[j]) - mean) * scale;
    if (a.weight != nullptr) y *= a.weight[j];
    if (a.bias != nullptr) y += a.bias[j];
    if (g != nullptr) {
      const float act = Round<TG>(Act(ToFloat<TG>(g[j]), a.act));
      y = act * Round<TG>(y);
    }
    out[j] = FromFloat<TO>(y);
  }
}

template <typename TX, typename TG>
cudaError_t LaunchNormGate3(const NormGateArgs& a, cudaStream_t stream) {
  const int rows = a.outer_rows * a.inner_rows;
  const int threads = a.cols >= kThreads ? kThreads : ((a.cols + 31) / 32) * 32;
  switch (a.out_dtype) {
    case DType::kFloat32:
      NormGateKernel<TX, TG, float><<<rows, threads, 0, stream>>>(a);
      break;
    case DType::kBFloat16:
      NormGateKernel<TX, TG, __nv_bfloat16><<<rows, threads, 0, stream>>>(a);
      break;
    case DType::kFloat16:
      NormGateKernel<TX, TG, __half><<<rows, threads, 0, stream>>>(a);
      break;
  }
  return cudaGetLastError();
}

template <typename TX>
cudaError_t LaunchNormGate2(const NormGateArgs& a, cudaStream_t stream) {
  switch (a.gate == nullptr ? DType::kFloat32 : a.gate_dtype) {
    case DType::kFloat32:
      return LaunchNormGate3<TX, float>(a, stream);
    case DType::kBFloat16:
      return LaunchNormGate3<TX, __nv_bfloat16>(a, stream);
    case DType::kFloat16:
      return LaunchNormGate3<TX, __half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void GatedActivationKernel(const GatedActivationArgs a) {
  const int64_t n = static_cast<int64_t>(a.rows) * a.cols;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / a.cols, j = idx % a.cols;
    const T* x = static_cast<const T*>(a.x) + r * a.x_row_stride;
    const float act = Round<T>(Act(ToFloat<T>(x[j]), a.act));
    static_cast<T*>(a.out)[idx] = FromFloat<T>(act * ToFloat<T>(x[a.cols + j]));
  }
}

}  // namespace

cudaError_t RecurrentRetentionStep(const RetentionStepArgs& a, cudaStream_t stream) {
  if (a.batch <= 0) return cudaSuccess;
  if (a.heads <= 0 || a.dk <= 0 || a.dv <= 0 || a.q == nullptr || a.k == nullptr ||
      a.v == nullptr || a.positions == nullptr || a.log_decay == nullptr || a.state == nullptr ||
      a.out == nullptr ||
      (a.rotary != RotaryKind::kNone && (a.theta == nullptr || a.dk % 2 != 0))) {
    return cudaErrorInvalidValue;
  }
  switch (a.in_dtype) {
    case DType::kFloat32:
      return DispatchState<float>(a, stream);
    case DType::kBFloat16:
      return DispatchState<__nv_bfloat16>(a, stream);
    case DType::kFloat16:
      return DispatchState<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t NormGate(const NormGateArgs& a, cudaStream_t stream) {
  if (a.outer_rows <= 0 || a.inner_rows <= 0) return cudaSuccess;
  if (a.cols <= 0 || a.x == nullptr || a.out == nullptr) return cudaErrorInvalidValue;
  if (a.gate != nullptr && a.gate_dtype != a.out_dtype) return cudaErrorInvalidValue;
  switch (a.x_dtype) {
    case DType::kFloat32:
      return LaunchNormGate2<float>(a, stream);
    case DType::kBFloat16:
      return LaunchNormGate2<__nv_bfloat16>(a, stream);
    case DType::kFloat16:
      return LaunchNormGate2<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t GatedActivation(const GatedActivationArgs& a, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(a.rows) * a.cols;
  if (n <= 0) return cudaSuccess;
  if (a.x == nullptr || a.out == nullptr) return cudaErrorInvalidValue;
  const int64_t blocks64 = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 ? blocks64 : 65535);
  switch (a.dtype) {
    case DType::kFloat32:
      GatedActivationKernel<float><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case DType::kBFloat16:
      GatedActivationKernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case DType::kFloat16:
      GatedActivationKernel<__half><<<blocks, kThreads, 0, stream>>>(a);
      break;
  }
  return cudaGetLastError();
}

bool KernelsRunnableOn(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  cudaFuncAttributes attr;
  const bool ok = cudaFuncGetAttributes(&attr, RetentionStepKernel<float, float, 4>) == cudaSuccess;
  (void)cudaGetLastError();
  (void)cudaSetDevice(previous);
  return ok;
}

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

void RecurrentRetentionStepHost(const RetentionStepArgs& a) {
  const int half = a.dk / 2;
  std::vector<float> q(a.dk), k(a.dk);
  for (int b = 0; b < a.batch; ++b) {
    const int slot = a.slots != nullptr ? a.slots[b] : b;
    for (int h = 0; h < a.heads; ++h) {
      float* out = a.out + (static_cast<int64_t>(b) * a.heads + h) * a.dv;
      if (slot < 0) {
        for (int j = 0; j < a.dv; ++j) out[j] = 0.0f;
        continue;
      }
      const float pos = static_cast<float>(a.positions[b]);
      const float* qi = static_cast<const float*>(a.q) + b * a.q_row_stride + h * a.dk;
      const float* ki = static_cast<const float*>(a.k) + b * a.k_row_stride + h * a.dk;
      const float* vi = static_cast<const float*>(a.v) + b * a.v_row_stride + h * a.dv;
      for (int i = 0; i < a.dk; ++i) {
        float yq = qi[i], yk = ki[i];
        if (a.rotary != RotaryKind::kNone) {
          const bool rh = a.rotary == RotaryKind::kRotateHalf;
          const int p = rh ? (i < half ? i : i - half) : i / 2;
          const int ia = rh ? p : 2 * p, ib = rh ? p + half : 2 * p + 1;
          const bool first = rh ? i < half : i % 2 == 0;
          const float c = std::cos(pos * a.theta[p]), s = std::sin(pos * a.theta[p]);
          yq = first ? qi[ia] * c - qi[ib] * s : qi[ib] * c + qi[ia] * s;
          yk = first ? ki[ia] * c - ki[ib] * s : ki[ib] * c + ki[ia] * s;
        }
        q[i] = yq * a.q_scale;
        k[i] = yk * a.k_scale;
      }
      const float lg = a.log_decay[h], gamma = std::exp(lg);
      float* s = static_cast<float*>(a.state) + slot * a.slot_stride +
                 static_cast<int64_t>(h) * a.dk * a.dv;
      for (int j = 0; j < a.dv; ++j) out[j] = 0.0f;
      for (int i = 0; i < a.dk; ++i) {
        for (int j = 0; j < a.dv; ++j) {
          float& x = s[static_cast<int64_t>(i) * a.dv + j];
          x = gamma * x + k[i] * vi[j];
          out[j] += q[i] * x;
        }
      }
      if (a.inv_sqrt_cn) {
        const float alpha = 1.0f / std::sqrt(std::expm1((pos + 1.0f) * lg) / std::expm1(lg));
        for (int j = 0; j < a.dv; ++j) out[j] *= alpha;
      }
    }
  }
}

}  // namespace retnet::cuda
