// retnet-cuda-selftest: the fused retention kernels against a plain C++ reference, without torch.
//
// With a CUDA device: random q/k/v/state for several shapes (d_v a multiple of 4 and not, rotary
// conventions, 1/sqrt(c_n), slot indices with a padding row, fp32 and bf16 inputs, fp32 and bf16
// state storage), one step on the GPU and on the host, max relative error printed and checked.
// Without one (CI): prints "skipped: no CUDA device" and exits 77 (ctest SKIP_RETURN_CODE).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "model/cuda/retention_kernels.h"

namespace {

using retnet::cuda::DType;
using retnet::cuda::RetentionStepArgs;
using retnet::cuda::RotaryKind;

bool Ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
  return false;
}

uint16_t ToBf16(float x) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float FromBf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

template <typename T>
T* Upload(const std::vector<T>& h) {
  void* d = nullptr;
  if (!Ok(cudaMalloc(&d, h.size() * sizeof(T) + 16), "cudaMalloc")) return nullptr;
  if (!Ok(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy")) {
    return nullptr;
  }
  return static_cast<T*>(d);
}

struct Case {
  int batch, heads, dk, dv;
  RotaryKind rotary;
  bool inv_sqrt_cn, padding, bf16_in, bf16_state;
};

// Returns the max error relative to the largest reference magnitude (outputs and state).
bool RunCase(const Case& c, double* err_out) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int slots_total = c.batch + 2;  // a pool larger than the batch; rows permuted
  const int64_t slot_stride = static_cast<int64_t>(c.heads) * c.dk * c.dv;
  const int64_t row = static_cast<int64_t>(c.heads) * (2 * c.dk + c.dv) + 7;  // fused-projection
  std::vector<float> qkv(static_cast<size_t>(c.batch * row));
  for (auto& x : qkv) x = normal(rng);
  if (c.bf16_in) {
    for (auto& x : qkv) x = FromBf16(ToBf16(x));
  }
  std::vector<float> state(static_cast<size_t>(slots_total * slot_stride));
  for (auto& x : state) x = 0.1f * normal(rng);
  if (c.bf16_state) {
    for (auto& x : state) x = FromBf16(ToBf16(x));
  }
  std::vector<int64_t> positions(c.batch);
  std::vector<int32_t> slots(c.batch);
  for (int b = 0; b < c.batch; ++b) {
    positions[b] = (b * 977) % 5000;
    slots[b] = slots_total - 1 - b;  // distinct, not the identity
  }
  if (c.padding) slots[c.batch - 1] = -1;
  std::vector<float> log_decay(c.heads), theta(c.dk / 2);
  for (int h = 0; h < c.heads; ++h) log_decay[h] = std::log1p(-std::pow(2.0f, -5.0f - h));
  for (int i = 0; i < c.dk / 2; ++i) theta[i] = std::pow(10000.0f, -2.0f * i / c.dk);

  RetentionStepArgs a;
  a.batch = c.batch;
  a.heads = c.heads;
  a.dk = c.dk;
  a.dv = c.dv;
  a.q_row_stride = a.k_row_stride = a.v_row_stride = row;
  a.rotary = c.rotary;
  a.q_scale = 1.0f / std::sqrt(static_cast<float>(c.dk));
  a.inv_sqrt_cn = c.inv_sqrt_cn;
  a.slot_stride = slot_stride;

  // Host reference.
  std::vector<float> ref_state = state, ref_out(static_cast<size_t>(c.batch) * c.heads * c.dv);
  RetentionStepArgs h = a;
  h.q = qkv.data();
  h.k = qkv.data() + c.heads * c.dk;
  h.v = qkv.data() + 2 * c.heads * c.dk;
  h.positions = positions.data();
  h.log_decay = log_decay.data();
  h.theta = theta.data();
  h.state = ref_state.data();
  h.slots = slots.data();
  h.out = ref_out.data();
  retnet::cuda::RecurrentRetentionStepHost(h);

  // Device.
  void* d_qkv = nullptr;
  if (c.bf16_in) {
    std::vector<uint16_t> b(qkv.size());
    for (size_t i = 0; i < b.size(); ++i) b[i] = ToBf16(qkv[i]);
    d_qkv = Upload(b);
    a.in_dtype = DType::kBFloat16;
    a.q = d_qkv;
    a.k = static_cast<uint16_t*>(d_qkv) + c.heads * c.dk;
    a.v = static_cast<uint16_t*>(d_qkv) + 2 * c.heads * c.dk;
  } else {
    d_qkv = Upload(qkv);
    a.in_dtype = DType::kFloat32;
    a.q = d_qkv;
    a.k = static_cast<float*>(d_qkv) + c.heads * c.dk;
    a.v = static_cast<float*>(d_qkv) + 2 * c.heads * c.dk;
  }
  void* d_state = nullptr;
  if (c.bf16_state) {
    std::vector<uint16_t> b(state.size());
    for (size_t i = 0; i < b.size(); ++i) b[i] = ToBf16(state[i]);
    d_state = Upload(b);
    a.state_dtype = DType::kBFloat16;
  } else {
    d_state = Upload(state);
    a.state_dtype = DType::kFloat32;
  }
  a.state = d_state;
  a.positions = Upload(positions);
  a.log_decay = Upload(log_decay);
  a.theta = Upload(theta);
  a.slots = Upload(slots);
  std::vector<float> out(ref_out.size(), -1.0f);
  a.out = Upload(out);
  if (d_qkv == nullptr || d_state == nullptr || a.out == nullptr) return false;
  if (!Ok(retnet::cuda::RecurrentRetentionStep(a, nullptr), "launch")) return false;
  if (!Ok(cudaDeviceSynchronize(), "kernel")) return false;
  if (!Ok(cudaMemcpy(out.data(), a.out, out.size() * 4, cudaMemcpyDeviceToHost), "copy")) {
    return false;
  }
  std::vector<float> got_state(state.size());
  if (c.bf16_state) {
    std::vector<uint16_t> b(state.size());
    if (!Ok(cudaMemcpy(b.data(), d_state, b.size() * 2, cudaMemcpyDeviceToHost), "copy")) {
      return false;
    }
    for (size_t i = 0; i < b.size(); ++i) got_state[i] = FromBf16(b[i]);
  } else if (!Ok(cudaMemcpy(got_state.data(), d_state, got_state.size() * 4,
                            cudaMemcpyDeviceToHost),
                 "copy")) {
    return false;
  }
  auto rel = [](const std::vector<float>& got, const std::vector<float>& want) {
    double scale = 1e-30, err = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
      err = std::max(err, std::fabs(static_cast<double>(got[i]) - want[i]));
    }
    return err / scale;
  };
  *err_out = std::max(rel(out, ref_out), rel(got_state, ref_state));
  for (void* p : {d_qkv, d_state, static_cast<void*>(const_cast<int64_t*>(a.positions)),
                  static_cast<void*>(const_cast<float*>(a.log_decay)),
                  static_cast<void*>(const_cast<float*>(a.theta)),
                  static_cast<void*>(const_cast<int32_t*>(a.slots)), static_cast<void*>(a.out)}) {
    cudaFree(p);
  }
  return true;
}

}  // namespace

int main() {
  const int devices = retnet::cuda::CudaDeviceCount();
  if (devices == 0) {
    std::printf("skipped: no CUDA device (the kernels compiled and linked)\n");
    return 77;
  }
  const Case cases[] = {
      {1, 4, 256, 512, RotaryKind::kRotateHalf, false, false, true, false},  // 350M head, B=1
      {37, 4, 256, 512, RotaryKind::kRotateHalf, false, true, true, false},  // padding row
      {8, 2, 16, 27, RotaryKind::kInterleaved, true, false, false, false},   // d_v = 27
      {64, 3, 64, 128, RotaryKind::kInterleaved, true, true, false, false},  // torchscale-like
      {16, 4, 256, 512, RotaryKind::kRotateHalf, false, false, true, true},  // bf16 state
      {5, 2, 32, 64, RotaryKind::kNone, false, false, false, false},
  };
  bool all = true;
  for (const Case& c : cases) {
    double err = 0;
    if (!RunCase(c, &err)) return 1;
    // fp32 state: accumulation-order differences only. bf16 state: one bf16 rounding of the
    // stored state (2^-9 relative) on both sides, compared after the device's rounding.
    const double tol = c.bf16_state ? 1e-2 : 2e-5;
    const bool ok = err <= tol;
    all = all && ok;
    std::printf(
        "B=%d H=%d dk=%d dv=%d rotary=%d inv_sqrt_cn=%d padding=%d bf16_in=%d "
        "bf16_state=%d: max rel err %.3g (tol %.0e) %s\n",
        c.batch, c.heads, c.dk, c.dv, static_cast<int>(c.rotary), c.inv_sqrt_cn, c.padding,
        c.bf16_in, c.bf16_state, err, tol, ok ? "ok" : "FAIL");
  }
  return all ? 0 : 1;
}
