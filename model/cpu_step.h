// File: model/cpu_step.h
//
// The CPU fast path of the batched recurrent step (fp32): the projections as single GEMMs
// (OpenBLAS) into preallocated buffers, and rotary, decay, S = gamma S + k v^T, o = q S, the
// retention normalisation, the group norm and the gate in one hand-written pass per
// (session, head), parallel over sessions and heads (OpenMP). Nothing is allocated and no
// LibTorch operator is dispatched per step once the workspace has grown to the batch.
//
// It computes exactly what RetNet::ReferenceStep computes, for every variant ModelConfig
// describes (both rotary conventions, q/k scaling, raw and 1/sqrt(c_n) retention, LayerNorm and
// RMSNorm with or without affine, every FFN kind, embedding scale/norm, tied heads, backbones).
// tests/model/cpu_step_test.cc holds it to the reference within 1e-5 relative.
//
// This header and cpu_step.cc include no torch header: the model passes raw fp32 pointers.
//
// Threading: a StepWeights is immutable and may be shared; a StepWorkspace belongs to one call at
// a time. RunStep itself parallelises with OpenMP.
#ifndef RETNET_MODEL_CPU_STEP_H_
#define RETNET_MODEL_CPU_STEP_H_

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace retnet::model::cpu {

// y = x W^T + b for W [out, in] row-major; b may be null.
struct Linear {
  const float* w = nullptr;
  const float* b = nullptr;
  int64_t out = 0, in = 0;
};

// Affine parameters of a norm; either may be null.
struct Norm {
  const float* w = nullptr;
  const float* b = nullptr;
};

struct LayerWeights {
  Norm attn_norm, ffn_norm, inner_norm, group_norm;
  // q|k|v|g as one [2 kd + 2 vd, D] weight when `qkvg.w` is set, else the four parts.
  Linear qkvg, q, k, v, g, o;
  // act|lin as one [2F, D] weight for the gated FFNs when `act_lin.w` is set.
  Linear act_lin, ffn_act, ffn_lin, ffn_out;
  std::vector<Linear> mlp;           // kSeedMlp
  const float* log_decay = nullptr;  // [H]
  const float* theta = nullptr;      // [d_k / 2]
};

struct StepWeights {
  const ModelConfig* config = nullptr;  // not owned; outlives this
  const float* embed = nullptr;         // [V, D] (language models)
  const float* lm_head = nullptr;       // [V, D]
  Norm embed_norm, final_norm;
  std::vector<LayerWeights> layers;
};

// Scratch buffers for one call, grown to the largest batch seen (never shrunk).
class StepWorkspace {
 public:
  void Reserve(const ModelConfig& c, int64_t batch);
  int64_t batch() const { return batch_; }

 private:
  friend void RunStep(const StepWeights&, int64_t, const int64_t*, const float*, const int64_t*,
                      float*, int64_t, int64_t, const int64_t*, float*, StepWorkspace*);
  int64_t batch_ = 0;
  std::vector<float> x, h, proj, y, ffn_a, ffn_b;
};

// One recurrent step for `batch` rows. `tokens` [B] (language model; ids must be valid) or
// `features` [B, D] (backbone); `positions` [B]. Layer l of row b's state (H x d_k x d_v,
// contiguous) is at state + l * layer_stride + slot * slot_stride with slot = slots[b] (or b when
// `slots` is null). Writes logits [B, V] (or hidden [B, D]) to `out`.
void RunStep(const StepWeights& m, int64_t batch, const int64_t* tokens, const float* features,
             const int64_t* positions, float* state, int64_t layer_stride, int64_t slot_stride,
             const int64_t* slots, float* out, StepWorkspace* ws);

}  // namespace retnet::model::cpu

#endif  // RETNET_MODEL_CPU_STEP_H_
