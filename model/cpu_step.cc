// The CPU fast path of the recurrent step; see cpu_step.h. No torch headers here.
#include "model/cpu_step.h"

#include <algorithm>
#include <cmath>
#include <cstring>

// OpenBLAS's CBLAS entry points (declared here so that no particular cblas.h is needed; the
// enum arguments are C ints: CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112).
extern "C" {
void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
void cblas_sgemv(int order, int trans, int m, int n, float alpha, const float* a, int lda,
                 const float* x, int incx, float beta, float* y, int incy);
}

namespace retnet::model::cpu {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Rows of elementwise work below this many are not worth waking the OpenMP team for.
constexpr int64_t kParallelElements = 1 << 14;

// c[b, :] (+)= x[b, :] W^T + bias for `batch` rows; `accumulate` adds to what c holds.
void Gemm(const Linear& l, const float* x, int64_t ldx, int64_t batch, float* c, int64_t ldc,
          bool accumulate) {
  float beta = accumulate ? 1.0f : 0.0f;
  if (l.b != nullptr) {
    for (int64_t b = 0; b < batch; ++b) {
      float* row = c + b * ldc;
      if (accumulate) {
        for (int64_t j = 0; j < l.out; ++j) row[j] += l.b[j];
      } else {
        std::memcpy(row, l.b, sizeof(float) * l.out);
      }
    }
    beta = 1.0f;
  }
  if (batch == 1) {
    cblas_sgemv(kRowMajor, kNoTrans, static_cast<int>(l.out), static_cast<int>(l.in), 1.0f, l.w,
                static_cast<int>(l.in), x, 1, beta, c, 1);
  } else {
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, static_cast<int>(batch), static_cast<int>(l.out),
                static_cast<int>(l.in), 1.0f, x, static_cast<int>(ldx), l.w, static_cast<int>(l.in),
                beta, c, static_cast<int>(ldc));
  }
}

inline float Act(Activation a, float x) {
  if (a == Activation::kSwish) return x / (1.0f + std::exp(-x));
  return 0.5f * x * (1.0f + std::erf(x * static_cast<float>(M_SQRT1_2)));
}

// out = norm(x) over n values (out may alias x).
void RowNorm(NormKind kind, double eps, const float* x, int64_t n, const Norm& p, float* out) {
  if (kind == NormKind::kLayerNorm) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += x[i];
    const double mean = sum / static_cast<double>(n);
    double var = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = x[i] - mean;
      var += d * d;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(var / static_cast<double>(n) + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < n; ++i) {
      float y = (x[i] - m) * inv;
      if (p.w != nullptr) y *= p.w[i];
      if (p.b != nullptr) y += p.b[i];
      out[i] = y;
    }
  } else {
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) sq += static_cast<double>(x[i]) * x[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) {
      float y = x[i] * inv;
      if (p.w != nullptr) y *= p.w[i];
      if (p.b != nullptr) y += p.b[i];
      out[i] = y;
    }
  }
}

// Block norm of every row of x [B, D] into out (same layout).
void BlockNorm(const ModelConfig& c, const Norm& p, const float* x, int64_t batch, float* out) {
  const int64_t d = c.hidden_size;
#pragma omp parallel for if (batch * d >= kParallelElements)
  for (int64_t b = 0; b < batch; ++b) {
    RowNorm(c.block_norm, c.block_norm_eps, x + b * d, d, p, out + b * d);
  }
}

// q and k of one (row, head): rotated by the row's position, then scaled.
void RotateScale(const ModelConfig& c, const float* theta, float pos, const float* in, float scale,
                 float* out) {
  const int64_t dk = c.head_k_dim(), half = dk / 2;
  if (c.rotary == Rotary::kRotateHalf) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * theta[i];
      const float cs = std::cos(angle), sn = std::sin(angle);
      const float a = in[i], b = in[i + half];
      out[i] = (a * cs - b * sn) * scale;
      out[i + half] = (b * cs + a * sn) * scale;
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * theta[i];
      const float cs = std::cos(angle), sn = std::sin(angle);
      const float a = in[2 * i], b = in[2 * i + 1];
      out[2 * i] = (a * cs - b * sn) * scale;
      out[2 * i + 1] = (b * cs + a * sn) * scale;
    }
  }
}

}  // namespace

void StepWorkspace::Reserve(const ModelConfig& c, int64_t batch) {
  if (batch <= batch_) return;
  const int64_t d = c.hidden_size, kd = c.key_dim, vd = c.value_dim;
  int64_t ffn = 2 * c.ffn_dim;
  for (int64_t w : c.ffn_dims) ffn = std::max(ffn, w);
  const int64_t scratch = c.num_heads * (2 * c.head_k_dim() + c.head_v_dim());
  x.assign(batch * d, 0.0f);
  h.assign(batch * std::max(d, scratch), 0.0f);
  proj.assign(batch * (2 * kd + 2 * vd), 0.0f);
  y.assign(batch * vd, 0.0f);
  ffn_a.assign(batch * std::max<int64_t>(ffn, 1), 0.0f);
  ffn_b.assign(batch * std::max<int64_t>(ffn, 1), 0.0f);
  batch_ = batch;
}

void RunStep(const StepWeights& m, int64_t batch, const int64_t* tokens, const float* features,
             const int64_t* positions, float* state, int64_t layer_stride, int64_t slot_stride,
             const int64_t* slots, float* out, StepWorkspace* ws) {
  const ModelConfig& c = *m.config;
  ws->Reserve(c, batch);
  const int64_t d = c.hidden_size, heads = c.num_heads, kd = c.key_dim, vd = c.value_dim;
  const int64_t dk = c.head_k_dim(), dv = c.head_v_dim();
  const int64_t pw = 2 * kd + 2 * vd;  // one row of q|k|v|g
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dk)));
  const float q_scale = c.scale_on == ScaleOn::kQuery ? scale : 1.0f;
  const float k_scale = c.scale_on == ScaleOn::kKey ? scale : 1.0f;
  float* x = ws->x.data();
  float* h = ws->h.data();
  float* proj = ws->proj.data();
  float* y = ws->y.data();

  // Embedding.
  if (c.is_language_model()) {
    for (int64_t b = 0; b < batch; ++b) {
      const float* e = m.embed + tokens[b] * d;
      float* row = x + b * d;
      if (c.embed_scale != 1.0) {
        const float s = static_cast<float>(c.embed_scale);
        for (int64_t i = 0; i < d; ++i) row[i] = e[i] * s;
      } else {
        std::memcpy(row, e, sizeof(float) * d);
      }
    }
    if (c.embed_norm) BlockNorm(c, m.embed_norm, x, batch, x);
  } else {
    std::memcpy(x, features, sizeof(float) * batch * d);
  }

  for (size_t l = 0; l < m.layers.size(); ++l) {
    const LayerWeights& lw = m.layers[l];
    float* layer_state = state + static_cast<int64_t>(l) * layer_stride;

    // q|k|v|g = attn_norm(x) W^T.
    BlockNorm(c, lw.attn_norm, x, batch, h);
    if (lw.qkvg.w != nullptr) {
      Gemm(lw.qkvg, h, d, batch, proj, pw, false);
    } else {
      Gemm(lw.q, h, d, batch, proj, pw, false);
      Gemm(lw.k, h, d, batch, proj + kd, pw, false);
      Gemm(lw.v, h, d, batch, proj + 2 * kd, pw, false);
      Gemm(lw.g, h, d, batch, proj + 2 * kd + vd, pw, false);
    }

    // Retention, group norm and gate: one pass per (row, head).
    const int64_t items = batch * heads;
    float* scratch = h;  // attn_norm(x) is consumed: reuse it ([B, H, 2 d_k + d_v] fits)
#pragma omp parallel for if (items * dk * dv >= kParallelElements)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / heads, hh = item % heads;
      const float pos = static_cast<float>(positions[b]);
      const float* p = proj + b * pw;
      float* qr = scratch + item * (2 * dk + dv);
      float* kr = qr + dk;
      float* o = kr + dk;
      RotateScale(c, lw.theta, pos, p + hh * dk, q_scale, qr);
      RotateScale(c, lw.theta, pos, p + kd + hh * dk, k_scale, kr);
      const float* v = p + 2 * kd + hh * dv;
      const float* g = p + 2 * kd + vd + hh * dv;
      const float lg = lw.log_decay[hh];
      const float gamma = std::exp(lg);
      const int64_t slot = slots != nullptr ? slots[b] : b;
      float* s = layer_state + slot * slot_stride + hh * dk * dv;
      std::fill(o, o + dv, 0.0f);
      for (int64_t i = 0; i < dk; ++i) {
        float* row = s + i * dv;
        const float ki = kr[i], qi = qr[i];
        for (int64_t j = 0; j < dv; ++j) {
          const float r = gamma * row[j] + ki * v[j];
          row[j] = r;
          o[j] += qi * r;
        }
      }
      if (c.retention_norm == RetentionNorm::kInvSqrtCn) {
        const float cn = std::expm1((pos + 1.0f) * lg) / std::expm1(lg);
        const float alpha = 1.0f / std::sqrt(cn);
        for (int64_t j = 0; j < dv; ++j) o[j] *= alpha;
      }
      RowNorm(c.group_norm, c.group_norm_eps, o, dv, lw.group_norm, o);
      float* yo = y + b * vd + hh * dv;
      for (int64_t j = 0; j < dv; ++j) yo[j] = Act(c.gate_act, g[j]) * o[j];
    }
    // x += y W_o^T.
    Gemm(lw.o, y, vd, batch, x, d, true);

    // FFN on ffn_norm(x), added to x.
    BlockNorm(c, lw.ffn_norm, x, batch, h);
    float* a = ws->ffn_a.data();
    float* u = ws->ffn_b.data();
    switch (c.ffn) {
      case FfnKind::kGlu:
      case FfnKind::kSwiGlu: {
        const int64_t f = c.ffn_dim;
        if (lw.act_lin.w != nullptr) {
          Gemm(lw.act_lin, h, d, batch, a, 2 * f, false);
        } else {
          Gemm(lw.ffn_act, h, d, batch, a, 2 * f, false);
          Gemm(lw.ffn_lin, h, d, batch, a + f, 2 * f, false);
        }
#pragma omp parallel for if (batch * f >= kParallelElements)
        for (int64_t b = 0; b < batch; ++b) {
          const float* ab = a + b * 2 * f;
          float* ub = u + b * f;
          for (int64_t j = 0; j < f; ++j) ub[j] = Act(c.ffn_act, ab[j]) * ab[f + j];
        }
        Gemm(lw.ffn_out, u, f, batch, x, d, true);
        break;
      }
      case FfnKind::kFfnV1: {
        const int64_t f = c.ffn_dim;
        Gemm(lw.ffn_act, h, d, batch, a, f, false);
#pragma omp parallel for if (batch * f >= kParallelElements)
        for (int64_t b = 0; b < batch; ++b) {
          float* ab = a + b * f;
          for (int64_t j = 0; j < f; ++j) ab[j] = Act(c.ffn_act, ab[j]);
          if (c.ffn_inner_norm) {
            RowNorm(NormKind::kLayerNorm, c.block_norm_eps, ab, f, lw.inner_norm, ab);
          }
        }
        Gemm(lw.ffn_out, a, f, batch, x, d, true);
        break;
      }
      case FfnKind::kSeedMlp: {
        const float* cur = h;
        int64_t width = d;
        for (size_t j = 0; j < lw.mlp.size(); ++j) {
          const Linear& lin = lw.mlp[j];
          float* dst = j % 2 == 0 ? a : u;
          Gemm(lin, cur, width, batch, dst, lin.out, false);
          for (int64_t i = 0; i < batch * lin.out; ++i) dst[i] = Act(c.ffn_act, dst[i]);
          cur = dst;
          width = lin.out;
        }
        for (int64_t i = 0; i < batch * d; ++i) x[i] += cur[i];
        break;
      }
    }
  }

  if (!c.is_language_model()) {
    std::memcpy(out, x, sizeof(float) * batch * d);
    return;
  }
  const float* last = x;
  if (c.final_norm) {
    BlockNorm(c, m.final_norm, x, batch, h);
    last = h;
  }
  Gemm(Linear{m.lm_head, nullptr, c.vocab_size, d}, last, d, batch, out, c.vocab_size, false);
}

}  // namespace retnet::model::cpu
