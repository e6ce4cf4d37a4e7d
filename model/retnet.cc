#include "model/retnet.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "common/strings.h"
#include "model/cpu_step.h"
#ifdef RETNET_WITH_CUDA
#include "model/cuda/retention_cuda.h"
#endif

namespace retnet::model {
namespace {

at::Tensor Activate(const at::Tensor& x, Activation a) {
  return a == Activation::kSwish ? at::silu(x) : at::gelu(x);
}

// D[h, r, j] = gamma_h^(r-j) for r >= j, else 0; fp32 [H, c, c].
at::Tensor DecayMask(const at::Tensor& log_decay, int64_t c) {
  at::Tensor idx = at::arange(c, log_decay.options());
  at::Tensor diff = idx.view({c, 1}) - idx.view({1, c});
  at::Tensor causal = diff.ge(0);
  return at::exp(diff.clamp_min(0).unsqueeze(0) * log_decay.view({-1, 1, 1})) * causal;
}

// alpha[h, n] = 1/sqrt(c_n), c_n = sum_{j<=n} gamma^j = expm1((n+1) log g) / expm1(log g).
// `positions` fp32 [...]; returns [H, ...].
at::Tensor InvSqrtCn(const at::Tensor& log_decay, const at::Tensor& positions) {
  std::vector<int64_t> shape = {log_decay.size(0)};
  for (int64_t i = 0; i < positions.dim(); ++i) shape.push_back(1);
  at::Tensor lg = log_decay.view(shape);
  return at::rsqrt(at::expm1((positions.unsqueeze(0) + 1) * lg) / at::expm1(lg));
}

// The batched chunkwise form (fast path): `n` chunks of `c` tokens at once. q, k [B, H, n*c, d_k]
// and v [B, H, n*c, d_v] fp32 (rotated, scaled); `s` [B, H, d_k, d_v] is the state before the
// first chunk, updated in place to the state after the last one. The same sums as the chunk loop
// of the reference, as a fixed number of batched library calls whatever n is:
//   inner_r  = sum_{j<=r in chunk} gamma^(r-j) (q_r . k_j) v_j
//   KV_m     = sum_j gamma^(c-1-j) k_j v_j^T                      (each chunk's contribution)
//   S_m      = gamma^(c m) S + sum_{m'<m} gamma^(c (m-1-m')) KV_m'  (state before chunk m)
//   cross_r  = gamma^(r+1) q_r^T S_m
//   S_after  = gamma^c S_(n-1) + KV_(n-1)
at::Tensor ChunkBlock(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& lg, const at::Tensor& s, int64_t n, int64_t c) {
  const int64_t batch = q.size(0), heads = q.size(1), dk = q.size(3), dv = v.size(3);
  at::Tensor qn = q.reshape({batch, heads, n, c, dk});
  at::Tensor kn = k.reshape({batch, heads, n, c, dk});
  at::Tensor vn = v.reshape({batch, heads, n, c, dv});
  at::Tensor r = at::arange(c, lg.options());
  at::Tensor inner = at::matmul(
      at::matmul(qn, kn.transpose(-1, -2)) * DecayMask(lg, c).view({1, heads, 1, c, c}), vn);
  at::Tensor k_decay =
      at::exp((c - 1 - r).unsqueeze(0) * lg.unsqueeze(1)).view({1, heads, 1, c, 1});
  at::Tensor kv = at::matmul((kn * k_decay).transpose(-1, -2), vn);  // [B, H, n, d_k, d_v]
  at::Tensor before;                                                 // [B, H, n, d_k, d_v]
  if (n == 1) {
    before = s.unsqueeze(2);
  } else {
    at::Tensor m = at::arange(n, lg.options());
    at::Tensor diff = m.view({n, 1}) - m.view({1, n}) - 1;  // n-1-m' for chunk n, earlier m'
    at::Tensor lgc = (lg * static_cast<double>(c)).view({heads, 1, 1});
    at::Tensor w = at::exp(diff.clamp_min(0).unsqueeze(0) * lgc) * diff.ge(0);  // [H, n, n]
    at::Tensor w0 = at::exp(m.unsqueeze(0) * lgc.view({heads, 1}));             // [H, n]
    before = at::matmul(w.unsqueeze(0), kv.reshape({batch, heads, n, dk * dv}))
                 .view({batch, heads, n, dk, dv}) +
             w0.view({1, heads, n, 1, 1}) * s.unsqueeze(2);
  }
  at::Tensor q_decay = at::exp((r + 1).unsqueeze(0) * lg.unsqueeze(1)).view({1, heads, 1, c, 1});
  at::Tensor out = inner + at::matmul(qn * q_decay, before);
  at::Tensor last =
      before.select(2, n - 1) * at::exp(lg * static_cast<double>(c)).view({1, heads, 1, 1}) +
      kv.select(2, n - 1);
  s.copy_(last);
  return out.reshape({batch, heads, n * c, dv});
}

// All of q/k/v ([B, H, T, d]) through ChunkBlock: full chunks in super-blocks whose transient
// per-chunk states stay under ~256 MiB, then a final partial chunk at its own length.
at::Tensor BatchedChunkwise(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lg, const at::Tensor& s, int64_t chunk) {
  const int64_t len = q.size(2);
  const int64_t per_chunk = q.size(0) * q.size(1) * q.size(3) * v.size(3) * 4;
  const int64_t max_chunks = std::max<int64_t>(
      1, std::min<int64_t>(64, (int64_t{256} << 20) / std::max<int64_t>(per_chunk, 1)));
  const int64_t full = (len / chunk) * chunk;
  std::vector<at::Tensor> outs;
  for (int64_t t0 = 0; t0 < full;) {
    const int64_t n = std::min(max_chunks, (full - t0) / chunk);
    outs.push_back(ChunkBlock(q.narrow(2, t0, n * chunk), k.narrow(2, t0, n * chunk),
                              v.narrow(2, t0, n * chunk), lg, s, n, chunk));
    t0 += n * chunk;
  }
  if (full < len) {
    const int64_t c = len - full;
    outs.push_back(
        ChunkBlock(q.narrow(2, full, c), k.narrow(2, full, c), v.narrow(2, full, c), lg, s, 1, c));
  }
  return outs.size() == 1 ? outs[0] : at::cat(outs, 2);
}

bool EnvIsZero(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

using common::FirstLine;  // c10::Error::what() appends a backtrace after the first line

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

uint64_t Fnv1a(const void* data, size_t n, uint64_t hash) {
  return common::Fnv1a(std::string_view(static_cast<const char*>(data), n), hash);
}

uint64_t Fingerprint(const ModelConfig& config, const ModelWeights& weights) {
  uint64_t h = common::kFnv1aOffset;
  const std::string summary = config.Summary();
  h = Fnv1a(summary.data(), summary.size(), h);
  for (const auto& [name, t] : weights.tensors) {  // std::map: sorted, deterministic
    h = Fnv1a(name.data(), name.size(), h);
    const double sum = t.sum(at::kDouble).item<double>();
    h = Fnv1a(&sum, sizeof(sum), h);
    const int64_t n = t.numel();
    at::Tensor sample =
        t.reshape({-1}).slice(0, 0, n, std::max<int64_t>(1, n / 64)).to(at::kDouble).contiguous();
    h = Fnv1a(sample.data_ptr(), sample.numel() * sizeof(double), h);
  }
  for (const auto& b : weights.buffers) {
    at::Tensor d = b.log_decay.to(at::kDouble).contiguous();
    h = Fnv1a(d.data_ptr(), d.numel() * sizeof(double), h);
  }
  return h;
}

}  // namespace

LayerBuffers DefaultBuffers(const ModelConfig& config) {
  const int64_t h = config.num_heads;
  const int64_t half = config.head_k_dim() / 2;
  std::vector<float> log_decay(h), theta(half);
  for (int64_t i = 0; i < h; ++i)
    log_decay[i] = static_cast<float>(std::log1p(-std::pow(2.0, -5.0 - i)));
  for (int64_t i = 0; i < half; ++i) {
    double exponent = config.rotary == Rotary::kInterleaved
                          ? static_cast<double>(i) / static_cast<double>(half - 1)
                          : 2.0 * static_cast<double>(i) / static_cast<double>(2 * half);
    theta[i] = static_cast<float>(std::pow(config.rope_base, -exponent));
  }
  LayerBuffers b;
  b.log_decay = at::tensor(log_decay, at::kFloat);
  b.theta = at::tensor(theta, at::kFloat);
  return b;
}

bool RetNet::CudaKernelsCompiled() {
#ifdef RETNET_WITH_CUDA
  return true;
#else
  return false;
#endif
}

absl::StatusOr<at::Device> ParseDevice(const std::string& name) {
  if (name == "cpu") return at::Device(at::kCPU);
  if (name.rfind("cuda", 0) == 0) {
    if (!at::hasCUDA()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device ", name, " requested but this LibTorch build has no usable CUDA device"));
    }
    try {
      return at::Device(name);
    } catch (const std::exception&) {
      return absl::InvalidArgumentError(absl::StrCat("device: cannot parse '", name, "'"));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("device: '", name, "' is not cpu or cuda[:N]"));
}

absl::StatusOr<at::ScalarType> ParseDtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  return absl::InvalidArgumentError(
      absl::StrCat("dtype: '", name, "' is not one of float32, bfloat16, float16"));
}

absl::StatusOr<std::unique_ptr<RetNet>> RetNet::Create(ModelConfig config, ModelWeights weights,
                                                       const ModelOptions& options) {
  RETURN_IF_ERROR(config.Validate());
  if (options.dtype != at::kFloat && options.dtype != at::kBFloat16 && options.dtype != at::kHalf) {
    return absl::InvalidArgumentError("dtype must be float32, bfloat16 or float16");
  }
  const auto expected = ExpectedTensors(config);
  for (const auto& [name, shape] : expected) {
    auto it = weights.tensors.find(name);
    if (it == weights.tensors.end()) {
      return absl::InvalidArgumentError(absl::StrCat("missing weight '", name, "'"));
    }
    if (it->second.sizes().vec() != shape) {
      return absl::InvalidArgumentError(absl::StrCat("weight '", name, "' has shape ",
                                                     ShapeString(it->second.sizes()), ", expected ",
                                                     ShapeString(shape)));
    }
    if (!at::isFloatingType(it->second.scalar_type())) {
      return absl::InvalidArgumentError(absl::StrCat("weight '", name, "' is not floating point"));
    }
  }
  for (const auto& [name, tensor] : weights.tensors) {
    if (expected.count(name) == 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected weight '", name, "'"));
    }
  }
  if (static_cast<int64_t>(weights.buffers.size()) != config.num_layers) {
    return absl::InvalidArgumentError("need one decay/theta buffer set per layer");
  }

  std::unique_ptr<RetNet> net(new RetNet(std::move(config), options));
  net->fingerprint_ = Fingerprint(net->config_, weights);
  net->compute_dtype_ =
      options.dtype == at::kHalf && options.device.is_cpu() ? at::kFloat : options.dtype;
  const ModelConfig& c = net->config_;
  ModelOptions::Path path = options.path;
  if (path == ModelOptions::Path::kAuto) {
    const bool fast = options.device.is_cuda()
                          ? CudaKernelsCompiled() && !EnvIsZero("RETNET_FUSED_RETENTION")
                          : options.device.is_cpu() && !EnvIsZero("RETNET_CPU_FAST_PATH");
    path = fast ? ModelOptions::Path::kFast : ModelOptions::Path::kReference;
  }
  net->fast_prefill_ = path == ModelOptions::Path::kFast;
  const bool cpu_step =
      net->fast_prefill_ && options.device.is_cpu() && options.dtype == at::kFloat;
  net->fused_step_ = net->fast_prefill_ && options.device.is_cuda() && CudaKernelsCompiled();
#ifdef RETNET_WITH_CUDA
  if (net->fused_step_ && !cuda::KernelsRunnable(options.device)) {
    // Built for other GPU architectures: the reference path still runs (through torch's kernels).
    net->fused_step_ = false;
    net->fast_prefill_ = false;
  }
#endif
  try {
    auto param = [&](const std::string& name) -> at::Tensor {
      auto it = weights.tensors.find(name);
      if (it == weights.tensors.end()) return at::Tensor();
      return it->second.to(options.device, options.dtype).contiguous();
    };
    auto fp32 = [&](const std::string& name) -> at::Tensor {
      auto it = weights.tensors.find(name);
      if (it == weights.tensors.end()) return at::Tensor();
      return it->second.to(options.device, at::kFloat).contiguous();
    };
    auto linear = [&](const std::string& name) {
      return Linear{param(name + ".w"), param(name + ".b")};
    };
    auto norm = [&](const std::string& name) { return Norm{fp32(name + ".w"), fp32(name + ".b")}; };
    if (c.is_language_model()) {
      net->embed_ = param("embed.w");
      net->lm_head_ = c.tied_head ? net->embed_ : param("lm_head.w");
      net->embed_norm_ = norm("embed_norm");
      net->final_norm_ = norm("final_norm");
    }
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const std::string p = absl::StrCat("layers.", i, ".");
      Layer layer;
      layer.attn_norm = norm(p + "attn_norm");
      layer.ffn_norm = norm(p + "ffn_norm");
      layer.q = linear(p + "q");
      layer.k = linear(p + "k");
      layer.v = linear(p + "v");
      layer.g = linear(p + "g");
      layer.o = linear(p + "o");
      layer.gn_w = fp32(p + "gn.w");
      layer.gn_b = fp32(p + "gn.b");
      for (size_t j = 0; j < c.ffn_dims.size() && c.ffn == FfnKind::kSeedMlp; ++j) {
        layer.mlp.push_back(linear(absl::StrCat(p, "mlp.", j)));
      }
      layer.ffn_act = linear(p + "ffn.act");
      layer.ffn_lin = linear(p + "ffn.lin");
      layer.ffn_out = linear(p + "ffn.out");
      layer.inner_norm = norm(p + "ffn.inner_norm");
      const LayerBuffers& b = weights.buffers[i];
      if (b.log_decay.numel() != c.num_heads || b.theta.numel() != c.head_k_dim() / 2) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", i, ": decay buffer must have ",
                                                       c.num_heads, " entries and theta ",
                                                       c.head_k_dim() / 2));
      }
      layer.log_decay = b.log_decay.to(options.device, at::kFloat).contiguous();
      layer.theta = b.theta.to(options.device, at::kFloat).contiguous();
      if (net->fused_step_ || cpu_step) {
        // One GEMM for q|k|v|g (and for act|lin); the separate weights become row views.
        auto fuse = [](std::vector<Linear*> parts) {
          std::vector<at::Tensor> ws, bs;
          for (Linear* p : parts) {
            ws.push_back(p->w);
            if (p->b.defined()) bs.push_back(p->b);
          }
          Linear fused{at::cat(ws, 0).contiguous(), at::Tensor()};
          if (bs.size() == parts.size()) fused.b = at::cat(bs, 0).contiguous();
          int64_t row = 0;
          for (Linear* p : parts) {
            const int64_t rows = p->w.size(0);
            p->w = fused.w.narrow(0, row, rows);
            if (fused.b.defined()) p->b = fused.b.narrow(0, row, rows);
            row += rows;
          }
          return fused;
        };
        const bool biases_match = layer.q.b.defined() == layer.k.b.defined() &&
                                  layer.q.b.defined() == layer.v.b.defined() &&
                                  layer.q.b.defined() == layer.g.b.defined();
        if (biases_match) layer.qkvg = fuse({&layer.q, &layer.k, &layer.v, &layer.g});
        if ((c.ffn == FfnKind::kGlu || c.ffn == FfnKind::kSwiGlu) &&
            layer.ffn_act.b.defined() == layer.ffn_lin.b.defined()) {
          layer.act_lin = fuse({&layer.ffn_act, &layer.ffn_lin});
        }
      }
      net->layers_.push_back(std::move(layer));
    }
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("moving weights to the device failed: ", FirstLine(e.what())));
  }
  if (cpu_step) net->cpu_weights_ = net->MakeCpuWeights();
#ifdef RETNET_WITH_CUDA
  if (net->fused_step_ && options.cuda_graphs && c.is_language_model() &&
      !EnvIsZero("RETNET_CUDA_GRAPHS")) {
    net->graphs_ = std::make_shared<cuda::StepGraphCache>();
  }
#endif
  return net;
}

absl::StatusOr<std::unique_ptr<RetNet>> RetNet::CreateRandom(ModelConfig config, uint64_t seed,
                                                             const ModelOptions& options) {
  RETURN_IF_ERROR(config.Validate());
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  ModelWeights weights;
  for (const auto& [name, shape] : ExpectedTensors(config)) {
    at::Tensor noise = at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
    const bool is_bias = name.size() > 2 && name.compare(name.size() - 2, 2, ".b") == 0;
    if (shape.size() == 1) {
      // Norm gains near 1, biases small but non-zero.
      weights.tensors[name] = is_bias ? noise * 0.02 : 1.0 + noise * 0.1;
    } else if (name == "embed.w") {
      weights.tensors[name] = noise;
    } else {
      weights.tensors[name] = noise / std::sqrt(static_cast<double>(shape[1]));
    }
  }
  for (int64_t i = 0; i < config.num_layers; ++i) weights.buffers.push_back(DefaultBuffers(config));
  return Create(std::move(config), std::move(weights), options);
}

std::vector<int64_t> RetNet::StateShape(int64_t batch) const {
  return {config_.num_layers, batch, config_.num_heads, config_.head_k_dim(), config_.head_v_dim()};
}

int64_t RetNet::StateBytesPerSession() const {
  return config_.num_layers * config_.num_heads * config_.head_k_dim() * config_.head_v_dim() *
         static_cast<int64_t>(sizeof(float));
}

at::Tensor RetNet::NewState(int64_t batch) const {
  return at::zeros(StateShape(batch),
                   at::TensorOptions().dtype(at::kFloat).device(options_.device));
}

absl::Status RetNet::CheckState(const at::Tensor& state, int64_t batch) const {
  if (!state.defined()) return absl::InvalidArgumentError("state: undefined tensor");
  if (state.scalar_type() != at::kFloat)
    return absl::InvalidArgumentError("state: must be float32");
  if (state.device() != options_.device) {
    return absl::InvalidArgumentError(absl::StrCat("state: on ", state.device().str(),
                                                   ", the model is on ", options_.device.str()));
  }
  if (state.sizes().vec() != StateShape(batch)) {
    return absl::InvalidArgumentError(absl::StrCat("state: shape ", ShapeString(state.sizes()),
                                                   ", expected ", ShapeString(StateShape(batch))));
  }
  if (state.stride(4) != 1 || state.stride(3) != config_.head_v_dim() ||
      state.stride(2) != config_.head_k_dim() * config_.head_v_dim() ||
      state.stride(1) != config_.num_heads * config_.head_k_dim() * config_.head_v_dim()) {
    return absl::InvalidArgumentError(
        "state: each layer's [B, H, d_k, d_v] block must be contiguous");
  }
  return absl::OkStatus();
}

absl::Status RetNet::CheckInput(const at::Tensor& input, int64_t dims) const {
  if (!input.defined()) return absl::InvalidArgumentError("input: undefined tensor");
  if (config_.is_language_model()) {
    if (input.scalar_type() != at::kLong || input.dim() != dims) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokens: expected int64 with ", dims, " dimensions, got ",
                       c10::toString(input.scalar_type()), " ", ShapeString(input.sizes())));
    }
  } else if (!at::isFloatingType(input.scalar_type()) || input.dim() != dims + 1 ||
             input.size(-1) != config_.hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "features: expected floating point with ", dims + 1, " dimensions and last dimension ",
        config_.hidden_size, ", got ", ShapeString(input.sizes())));
  }
  return absl::OkStatus();
}

at::Tensor RetNet::ApplyLinear(const Linear& l, const at::Tensor& x) const {
  if (l.w.scalar_type() != x.scalar_type()) {
    // float16 weights on CPU: LibTorch 1.13 has no CPU float16 kernels, so activations run in
    // fp32 and each weight is widened as it is used (storage stays float16).
    c10::optional<at::Tensor> bias;
    if (l.b.defined()) bias = l.b.to(x.scalar_type());
    return at::linear(x, l.w.to(x.scalar_type()), bias);
  }
  c10::optional<at::Tensor> bias;
  if (l.b.defined()) bias = l.b;
  return at::linear(x, l.w, bias);
}

at::Tensor RetNet::ApplyNorm(const Norm& n, const at::Tensor& x, bool block) const {
  const NormKind kind = block ? config_.block_norm : config_.group_norm;
  const double eps = block ? config_.block_norm_eps : config_.group_norm_eps;
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor y;
  if (kind == NormKind::kLayerNorm) {
    c10::optional<at::Tensor> w, b;
    if (n.w.defined()) w = n.w;
    if (n.b.defined()) b = n.b;
    y = at::layer_norm(xf, {xf.size(-1)}, w, b, eps);
  } else {
    y = xf * at::rsqrt(xf.square().mean(-1, /*keepdim=*/true) + eps);
    if (n.w.defined()) y = y * n.w;
    if (n.b.defined()) y = y + n.b;
  }
  return y.to(x.scalar_type());
}

at::Tensor RetNet::Rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const {
  const int64_t half = x.size(-1) / 2;
  if (config_.rotary == Rotary::kRotateHalf) {
    at::Tensor a = x.narrow(-1, 0, half), b = x.narrow(-1, half, half);
    return at::cat({a * cos - b * sin, b * cos + a * sin}, -1);
  }
  std::vector<int64_t> pairs = x.sizes().vec();
  pairs.back() = half;
  pairs.push_back(2);
  at::Tensor xp = x.reshape(pairs);
  at::Tensor a = xp.select(-1, 0), b = xp.select(-1, 1);
  return at::stack({a * cos - b * sin, b * cos + a * sin}, -1).flatten(-2);
}

at::Tensor RetNet::Embed(const at::Tensor& input) const {
  if (!config_.is_language_model()) return input.to(options_.device, compute_dtype_);
  at::Tensor tokens = input.to(options_.device);
  std::vector<int64_t> shape = tokens.sizes().vec();
  shape.push_back(config_.hidden_size);
  at::Tensor x = embed_.index_select(0, tokens.reshape({-1})).view(shape).to(compute_dtype_);
  if (config_.embed_scale != 1.0) x = x * config_.embed_scale;
  if (config_.embed_norm) x = ApplyNorm(embed_norm_, x, /*block=*/true);
  return x;
}

at::Tensor RetNet::Head(const at::Tensor& x) const {
  if (!config_.is_language_model()) return x.to(at::kFloat);
  at::Tensor h = config_.final_norm ? ApplyNorm(final_norm_, x, /*block=*/true) : x;
  return ApplyLinear(Linear{lm_head_, at::Tensor()}, h).to(at::kFloat);
}

at::Tensor RetNet::Ffn(const Layer& layer, const at::Tensor& x) const {
  switch (config_.ffn) {
    case FfnKind::kSeedMlp: {
      at::Tensor y = x;
      for (const Linear& l : layer.mlp) y = Activate(ApplyLinear(l, y), config_.ffn_act);
      return y;
    }
    case FfnKind::kFfnV1: {
      at::Tensor y = Activate(ApplyLinear(layer.ffn_act, x), config_.ffn_act);
      if (config_.ffn_inner_norm) {
        at::Tensor yf = y.to(at::kFloat);
        y = at::layer_norm(yf, {yf.size(-1)}, layer.inner_norm.w, layer.inner_norm.b,
                           config_.block_norm_eps)
                .to(x.scalar_type());
      }
      return ApplyLinear(layer.ffn_out, y);
    }
    case FfnKind::kGlu:
    case FfnKind::kSwiGlu:
      return ApplyLinear(layer.ffn_out, Activate(ApplyLinear(layer.ffn_act, x), config_.ffn_act) *
                                            ApplyLinear(layer.ffn_lin, x));
  }
  return x;
}

at::Tensor RetNet::MixOutput(const Layer& layer, const at::Tensor& o, const at::Tensor& g) const {
  at::Tensor y = ApplyNorm(Norm{layer.gn_w, layer.gn_b}, o, /*block=*/false);
  std::vector<int64_t> shape = g.sizes().vec();
  y = y.reshape(shape).to(g.scalar_type());
  return ApplyLinear(layer.o, Activate(g, config_.gate_act) * y);
}

at::Tensor RetNet::SequenceMixer(const Layer& layer, const at::Tensor& h, int64_t start,
                                 const at::Tensor& state, int64_t chunk_size) const {
  const int64_t batch = h.size(0), len = h.size(1), heads = config_.num_heads;
  const int64_t dk = config_.head_k_dim(), dv = config_.head_v_dim();
  at::Tensor q = ApplyLinear(layer.q, h).to(at::kFloat).view({batch, len, heads, dk});
  at::Tensor k = ApplyLinear(layer.k, h).to(at::kFloat).view({batch, len, heads, dk});
  at::Tensor v = ApplyLinear(layer.v, h).to(at::kFloat).view({batch, len, heads, dv});
  at::Tensor g = ApplyLinear(layer.g, h);

  at::Tensor pos = at::arange(start, start + len, layer.theta.options());
  at::Tensor angle = pos.unsqueeze(1) * layer.theta.unsqueeze(0);  // [T, d_k/2]
  at::Tensor cos = angle.cos().view({1, len, 1, dk / 2});
  at::Tensor sin = angle.sin().view({1, len, 1, dk / 2});
  const double scale = 1.0 / std::sqrt(static_cast<double>(dk));
  q = Rotate(q, cos, sin);
  k = Rotate(k, cos, sin);
  if (config_.scale_on == ScaleOn::kQuery) {
    q = q * scale;
  } else {
    k = k * scale;
  }
  q = q.transpose(1, 2);  // [B, H, T, d_k]
  k = k.transpose(1, 2);
  v = v.transpose(1, 2);
  const at::Tensor& lg = layer.log_decay;

  at::Tensor o;
  if (!state.defined() && (chunk_size <= 0 || chunk_size >= len)) {
    // Parallel form: (Q K^T ⊙ D) V.
    o = at::matmul(at::matmul(q, k.transpose(-1, -2)) * DecayMask(lg, len), v);
  } else if (fast_prefill_) {
    at::Tensor s = state.defined() ? state : at::zeros({batch, heads, dk, dv}, q.options());
    o = BatchedChunkwise(q, k, v, lg, s, chunk_size <= 0 ? len : chunk_size);
  } else {
    at::Tensor s = state.defined() ? state : at::zeros({batch, heads, dk, dv}, q.options());
    const int64_t c_max = chunk_size <= 0 ? len : chunk_size;
    std::vector<at::Tensor> outs;
    for (int64_t s0 = 0; s0 < len; s0 += c_max) {
      const int64_t c = std::min(c_max, len - s0);
      at::Tensor qc = q.narrow(2, s0, c), kc = k.narrow(2, s0, c), vc = v.narrow(2, s0, c);
      at::Tensor r = at::arange(c, lg.options());
      // inner_r = sum_{j<=r} gamma^(r-j) (q_r . k_j) v_j
      at::Tensor oc = at::matmul(at::matmul(qc, kc.transpose(-1, -2)) * DecayMask(lg, c), vc);
      // cross_r = gamma^(r+1) q_r^T S_prev
      at::Tensor q_decay =
          at::exp((r + 1).unsqueeze(0) * lg.unsqueeze(1)).unsqueeze(-1);  // [H,c,1]
      oc = oc + at::matmul(qc * q_decay, s);
      // S <- gamma^c S + sum_j gamma^(c-1-j) k_j v_j^T
      at::Tensor k_decay = at::exp((c - 1 - r).unsqueeze(0) * lg.unsqueeze(1)).unsqueeze(-1);
      s.mul_(at::exp(lg * static_cast<double>(c)).view({1, heads, 1, 1}));
      s.add_(at::matmul((kc * k_decay).transpose(-1, -2), vc));
      outs.push_back(oc);
    }
    o = outs.size() == 1 ? outs[0] : at::cat(outs, 2);
  }
  if (config_.retention_norm == RetentionNorm::kInvSqrtCn) {
    o = o * InvSqrtCn(lg, pos).unsqueeze(-1);  // [H, T, 1] broadcast over [B, H, T, d_v]
  }
  return MixOutput(layer, o.transpose(1, 2), g);  // o: [B, T, H, d_v]
}

at::Tensor RetNet::Sequence(const at::Tensor& input, const at::Tensor& state, int64_t start,
                            int64_t chunk_size, Outputs outputs) const {
  at::Tensor x = Embed(input);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    at::Tensor s = state.defined() ? state.select(0, static_cast<int64_t>(l)) : at::Tensor();
    x = x + SequenceMixer(layer, ApplyNorm(layer.attn_norm, x, true), start, s, chunk_size);
    x = x + Ffn(layer, ApplyNorm(layer.ffn_norm, x, true));
  }
  if (outputs == Outputs::kLast) x = x.narrow(1, x.size(1) - 1, 1);
  return Head(x);
}

absl::StatusOr<at::Tensor> RetNet::Parallel(const at::Tensor& input) const {
  RETURN_IF_ERROR(CheckInput(input, 2));
  if (input.size(1) == 0) return absl::InvalidArgumentError("input: empty sequence");
  c10::InferenceMode guard;
  try {
    if (config_.is_language_model()) {
      const int64_t lo = input.min().item<int64_t>(), hi = input.max().item<int64_t>();
      if (lo < 0 || hi >= config_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tokens: ids must be in [0, ", config_.vocab_size, "), got ", lo < 0 ? lo : hi));
      }
    }
    return Sequence(input, at::Tensor(), 0, 0, Outputs::kAll);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("parallel forward failed: ", FirstLine(e.what())));
  }
}

absl::StatusOr<at::Tensor> RetNet::Chunkwise(const at::Tensor& input, const at::Tensor& state,
                                             int64_t start, int64_t chunk_size,
                                             Outputs outputs) const {
  RETURN_IF_ERROR(CheckInput(input, 2));
  RETURN_IF_ERROR(CheckState(state, input.size(0)));
  if (input.size(1) == 0) return absl::InvalidArgumentError("input: empty sequence");
  if (start < 0) return absl::InvalidArgumentError("start: must not be negative");
  if (chunk_size < 0) return absl::InvalidArgumentError("chunk_size: must not be negative");
  c10::InferenceMode guard;
  try {
    if (config_.is_language_model()) {
      const int64_t lo = input.min().item<int64_t>(), hi = input.max().item<int64_t>();
      if (lo < 0 || hi >= config_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tokens: ids must be in [0, ", config_.vocab_size, "), got ", lo < 0 ? lo : hi));
      }
    }
    return Sequence(input, state, start, chunk_size == 0 ? input.size(1) : chunk_size, outputs);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("chunkwise forward failed: ", FirstLine(e.what())));
  }
}

absl::StatusOr<at::Tensor> RetNet::Step(const at::Tensor& input, const at::Tensor& positions,
                                        const at::Tensor& state) const {
  RETURN_IF_ERROR(CheckInput(input, 1));
  const int64_t batch = input.size(0);
  RETURN_IF_ERROR(CheckState(state, batch));
  if (positions.scalar_type() != at::kLong || positions.dim() != 1 || positions.size(0) != batch) {
    return absl::InvalidArgumentError(absl::StrCat("positions: expected int64 [", batch, "]"));
  }
  c10::InferenceMode guard;
  try {
    return StepRows(input, positions, state, nullptr);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("recurrent step failed: ", FirstLine(e.what())));
  }
}

absl::StatusOr<at::Tensor> RetNet::Step(const at::Tensor& input, const at::Tensor& positions,
                                        const at::Tensor& pool,
                                        const std::vector<int64_t>& slots) const {
  RETURN_IF_ERROR(CheckInput(input, 1));
  const int64_t batch = input.size(0);
  if (!pool.defined() || pool.dim() != 5) {
    return absl::InvalidArgumentError("pool: expected [num_layers, slots, H, d_k, d_v]");
  }
  const int64_t capacity = pool.size(1);
  RETURN_IF_ERROR(CheckState(pool, capacity));
  if (positions.scalar_type() != at::kLong || positions.dim() != 1 || positions.size(0) != batch) {
    return absl::InvalidArgumentError(absl::StrCat("positions: expected int64 [", batch, "]"));
  }
  if (static_cast<int64_t>(slots.size()) != batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("slots: ", slots.size(), " entries for a batch of ", batch));
  }
  bool identity = true;
  for (int64_t b = 0; b < batch; ++b) {
    if (slots[b] < 0 || slots[b] >= capacity) {
      return absl::InvalidArgumentError(
          absl::StrCat("slots[", b, "]: ", slots[b], " is outside [0, ", capacity, ")"));
    }
    identity = identity && slots[b] == b;
  }
  if (!identity && batch > 1) {
    std::vector<int64_t> sorted(slots);
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      return absl::InvalidArgumentError("slots: every row needs its own slot");
    }
  }
  c10::InferenceMode guard;
  try {
    if (identity) return StepRows(input, positions, pool.narrow(1, 0, batch), nullptr);
    return StepRows(input, positions, pool, &slots);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("recurrent step failed: ", FirstLine(e.what())));
  }
}

at::Tensor RetNet::StepRows(const at::Tensor& input, const at::Tensor& positions,
                            const at::Tensor& state, const std::vector<int64_t>* slots) const {
  if (cpu_weights_ != nullptr) return CpuStep(input, positions, state, slots);
#ifdef RETNET_WITH_CUDA
  if (fused_step_) {
    // Streams, graph buffers and capture follow the current device: make it the model's.
    const c10::DeviceGuard device_guard(options_.device);
    float* base = state.data_ptr<float>();
    const int64_t layer_stride = state.stride(0), slot_stride = state.stride(1);
    at::Tensor slot_ids;
    if (slots != nullptr) {
      slot_ids =
          at::tensor(*slots, at::kLong).to(at::kInt).to(options_.device, /*non_blocking=*/true);
    }
    if (graphs_ != nullptr && cuda::StepGraphCache::Bucket(input.size(0)) > 0) {
      return graphs_->Run(
          input, positions, {reinterpret_cast<uintptr_t>(base), layer_stride, slot_stride},
          [&](const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& rows) {
            return FusedStep(tokens, pos, base, layer_stride, slot_stride, rows);
          },
          slot_ids);
    }
    return FusedStep(input, positions.to(options_.device).contiguous(), base, layer_stride,
                     slot_stride, slot_ids);
  }
#endif
  if (slots == nullptr) return ReferenceStep(input, positions, state);
  // Reference path on scattered slots: gather the rows, step them, scatter them back.
  const at::Tensor index = at::tensor(*slots, at::kLong).to(options_.device);
  at::Tensor rows = state.index_select(1, index);
  at::Tensor out = ReferenceStep(input, positions, rows);
  state.index_copy_(1, index, rows);
  return out;
}

std::shared_ptr<cpu::StepWeights> RetNet::MakeCpuWeights() const {
  auto ptr = [](const at::Tensor& t) -> const float* {
    return t.defined() ? t.data_ptr<float>() : nullptr;
  };
  auto linear = [&](const Linear& l) {
    cpu::Linear out;
    if (!l.w.defined()) return out;
    out.w = ptr(l.w);
    out.b = ptr(l.b);
    out.out = l.w.size(0);
    out.in = l.w.size(1);
    return out;
  };
  auto norm = [&](const Norm& n) { return cpu::Norm{ptr(n.w), ptr(n.b)}; };
  auto w = std::make_shared<cpu::StepWeights>();
  w->config = &config_;
  w->embed = ptr(embed_);
  w->lm_head = ptr(lm_head_);
  w->embed_norm = norm(embed_norm_);
  w->final_norm = norm(final_norm_);
  for (const Layer& layer : layers_) {
    cpu::LayerWeights lw;
    lw.attn_norm = norm(layer.attn_norm);
    lw.ffn_norm = norm(layer.ffn_norm);
    lw.inner_norm = norm(layer.inner_norm);
    lw.group_norm = cpu::Norm{ptr(layer.gn_w), ptr(layer.gn_b)};
    lw.qkvg = linear(layer.qkvg);
    lw.q = linear(layer.q);
    lw.k = linear(layer.k);
    lw.v = linear(layer.v);
    lw.g = linear(layer.g);
    lw.o = linear(layer.o);
    lw.act_lin = linear(layer.act_lin);
    lw.ffn_act = linear(layer.ffn_act);
    lw.ffn_lin = linear(layer.ffn_lin);
    lw.ffn_out = linear(layer.ffn_out);
    for (const Linear& l : layer.mlp) lw.mlp.push_back(linear(l));
    lw.log_decay = ptr(layer.log_decay);
    lw.theta = ptr(layer.theta);
    w->layers.push_back(std::move(lw));
  }
  return w;
}

at::Tensor RetNet::CpuStep(const at::Tensor& input, const at::Tensor& positions,
                           const at::Tensor& state, const std::vector<int64_t>* slots) const {
  const int64_t batch = input.size(0);
  const at::Tensor pos = positions.to(at::kCPU).contiguous();
  at::Tensor in = config_.is_language_model() ? input.to(at::kCPU).contiguous()
                                              : input.to(at::kCPU, at::kFloat).contiguous();
  at::Tensor out = at::empty(
      {batch, config_.is_language_model() ? config_.vocab_size : config_.hidden_size}, at::kFloat);
  std::shared_ptr<cpu::StepWorkspace> ws;
  {
    std::lock_guard<std::mutex> lock(workspace_mu_);
    if (!workspaces_.empty()) {
      ws = std::move(workspaces_.back());
      workspaces_.pop_back();
    }
  }
  if (ws == nullptr) ws = std::make_shared<cpu::StepWorkspace>();
  cpu::RunStep(*cpu_weights_, batch, config_.is_language_model() ? in.data_ptr<int64_t>() : nullptr,
               config_.is_language_model() ? nullptr : in.data_ptr<float>(),
               pos.data_ptr<int64_t>(), state.data_ptr<float>(), state.stride(0), state.stride(1),
               slots != nullptr ? slots->data() : nullptr, out.data_ptr<float>(), ws.get());
  std::lock_guard<std::mutex> lock(workspace_mu_);
  workspaces_.push_back(std::move(ws));
  return out;
}

at::Tensor RetNet::ReferenceStep(const at::Tensor& input, const at::Tensor& positions,
                                 const at::Tensor& state) const {
  const int64_t batch = input.size(0);
  const int64_t heads = config_.num_heads, dk = config_.head_k_dim(), dv = config_.head_v_dim();
  const double scale = 1.0 / std::sqrt(static_cast<double>(dk));
  at::Tensor pos = positions.to(options_.device, at::kFloat);
  at::Tensor x = Embed(input);  // [B, D]
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    at::Tensor h = ApplyNorm(layer.attn_norm, x, true);
    at::Tensor q = ApplyLinear(layer.q, h).to(at::kFloat).view({batch, heads, dk});
    at::Tensor k = ApplyLinear(layer.k, h).to(at::kFloat).view({batch, heads, dk});
    at::Tensor v = ApplyLinear(layer.v, h).to(at::kFloat).view({batch, heads, dv});
    at::Tensor g = ApplyLinear(layer.g, h);
    at::Tensor angle = pos.unsqueeze(1) * layer.theta.unsqueeze(0);  // [B, d_k/2]
    at::Tensor cos = angle.cos().unsqueeze(1), sin = angle.sin().unsqueeze(1);
    q = Rotate(q, cos, sin);
    k = Rotate(k, cos, sin);
    if (config_.scale_on == ScaleOn::kQuery) {
      q = q * scale;
    } else {
      k = k * scale;
    }
    // S <- gamma S + k v^T ; o = q^T S, on the caller's rows in place.
    at::Tensor s = state.select(0, static_cast<int64_t>(l)).view({batch * heads, dk, dv});
    s.view({batch, heads, dk, dv}).mul_(at::exp(layer.log_decay).view({1, heads, 1, 1}));
    s.baddbmm_(k.reshape({batch * heads, dk, 1}), v.reshape({batch * heads, 1, dv}));
    at::Tensor o = at::bmm(q.reshape({batch * heads, 1, dk}), s).view({batch, heads, dv});
    if (config_.retention_norm == RetentionNorm::kInvSqrtCn) {
      o = o * InvSqrtCn(layer.log_decay, pos).transpose(0, 1).unsqueeze(-1);  // [B, H, 1]
    }
    x = x + MixOutput(layer, o, g);
    x = x + Ffn(layer, ApplyNorm(layer.ffn_norm, x, true));
  }
  return Head(x);
}

#ifdef RETNET_WITH_CUDA
at::Tensor RetNet::FusedStep(const at::Tensor& input, const at::Tensor& positions,
                             float* state_base, int64_t layer_stride, int64_t slot_stride,
                             const at::Tensor& slots) const {
  const int64_t batch = input.size(0), heads = config_.num_heads;
  const int64_t dk = config_.head_k_dim(), dv = config_.head_v_dim();
  const int64_t kd = config_.key_dim, vd = config_.value_dim;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dk)));
  cuda::StepParams sp;
  sp.heads = heads;
  sp.dk = dk;
  sp.dv = dv;
  sp.rotary = config_.rotary == Rotary::kRotateHalf ? cuda::Rotary::kRotateHalf
                                                    : cuda::Rotary::kInterleaved;
  sp.q_scale = config_.scale_on == ScaleOn::kQuery ? scale : 1.0f;
  sp.k_scale = config_.scale_on == ScaleOn::kKey ? scale : 1.0f;
  sp.inv_sqrt_cn = config_.retention_norm == RetentionNorm::kInvSqrtCn;
  const auto kind = [](NormKind k) {
    return k == NormKind::kRmsNorm ? cuda::Norm::kRms : cuda::Norm::kLayer;
  };
  const auto act = [](Activation a) {
    return a == Activation::kSwish ? cuda::Act::kSwish : cuda::Act::kGelu;
  };
  const auto block_norm = [&](const Norm& n, const at::Tensor& x) {
    return cuda::NormGate(x, 1, n.w, n.b, kind(config_.block_norm), config_.block_norm_eps,
                          at::Tensor(), cuda::Act::kSwish, x.scalar_type());
  };
  at::Tensor x = Embed(input);  // [B, D]
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    float* s = state_base + static_cast<int64_t>(l) * layer_stride;
    at::Tensor h = block_norm(layer.attn_norm, x);
    at::Tensor q, k, v, g;
    if (layer.qkvg.w.defined()) {
      at::Tensor p = ApplyLinear(layer.qkvg, h);  // [B, 2 kd + 2 vd]
      q = p.narrow(1, 0, kd);
      k = p.narrow(1, kd, kd);
      v = p.narrow(1, 2 * kd, vd);
      g = p.narrow(1, 2 * kd + vd, vd);
    } else {
      q = ApplyLinear(layer.q, h);
      k = ApplyLinear(layer.k, h);
      v = ApplyLinear(layer.v, h);
      g = ApplyLinear(layer.g, h);
    }
    at::Tensor o = cuda::RetentionStep(q, k, v, positions, layer.log_decay, layer.theta, sp, s,
                                       at::kFloat, slot_stride, slots);  // [B, H, d_v] fp32
    at::Tensor y = cuda::NormGate(o.view({batch, heads * dv}), heads, layer.gn_w, layer.gn_b,
                                  kind(config_.group_norm), config_.group_norm_eps, g,
                                  act(config_.gate_act), g.scalar_type());
    x = x + ApplyLinear(layer.o, y);
    at::Tensor f = block_norm(layer.ffn_norm, x);
    if (layer.act_lin.w.defined()) {
      at::Tensor u = cuda::GatedActivation(ApplyLinear(layer.act_lin, f), config_.ffn_dim,
                                           act(config_.ffn_act));
      x = x + ApplyLinear(layer.ffn_out, u);
    } else {
      x = x + Ffn(layer, f);
    }
  }
  if (!config_.is_language_model()) return x.to(at::kFloat);
  at::Tensor hf = config_.final_norm ? block_norm(final_norm_, x) : x;
  return ApplyLinear(Linear{lm_head_, at::Tensor()}, hf).to(at::kFloat);
}
#endif

}  // namespace retnet::model
