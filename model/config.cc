#include "model/config.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace retnet::model {

const char* FamilyName(Family f) {
  switch (f) {
    case Family::kFla:
      return "fla";
    case Family::kTorchscale:
      return "torchscale";
    case Family::kSeed:
      return "seed";
  }
  return "?";
}

const char* ActivationName(Activation a) { return a == Activation::kSwish ? "swish" : "gelu"; }

const char* FfnKindName(FfnKind k) {
  switch (k) {
    case FfnKind::kSeedMlp:
      return "seed-mlp";
    case FfnKind::kFfnV1:
      return "ffn-v1";
    case FfnKind::kGlu:
      return "glu";
    case FfnKind::kSwiGlu:
      return "swiglu";
  }
  return "?";
}

absl::Status ModelConfig::Validate() const {
  auto bad = [](const std::string& field, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("config field ", field, ": ", why));
  };
  // Sanity bounds, far above any published RetNet, so that no size read from a config can
  // drive an allocation before the tensors confirm it.
  auto bounded = [&](const char* field, int64_t v, int64_t max) -> absl::Status {
    if (v <= 0) return bad(field, absl::StrCat(v, " must be positive"));
    if (v > max) return bad(field, absl::StrCat(v, " exceeds the limit of ", max));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(bounded("num_layers", num_layers, kMaxLayers));
  RETURN_IF_ERROR(bounded("hidden_size", hidden_size, kMaxWidth));
  RETURN_IF_ERROR(bounded("num_heads", num_heads, kMaxHeads));
  RETURN_IF_ERROR(bounded("key_dim", key_dim, kMaxWidth));
  RETURN_IF_ERROR(bounded("value_dim", value_dim, 4 * kMaxWidth));
  if (vocab_size > kMaxVocab) {
    return bad("vocab_size", absl::StrCat(vocab_size, " exceeds the limit of ", kMaxVocab));
  }
  if (ffn == FfnKind::kSeedMlp) {
    for (int64_t d : ffn_dims) RETURN_IF_ERROR(bounded("ffn_dims", d, kMaxFfnWidth));
  } else {
    RETURN_IF_ERROR(bounded("ffn_dim", ffn_dim, kMaxFfnWidth));
  }
  if (key_dim <= 0 || key_dim % num_heads != 0) {
    return bad("key_dim",
               absl::StrCat(key_dim, " is not a positive multiple of num_heads=", num_heads));
  }
  if (value_dim <= 0 || value_dim % num_heads != 0) {
    return bad("value_dim",
               absl::StrCat(value_dim, " is not a positive multiple of num_heads=", num_heads));
  }
  if (head_k_dim() % 2 != 0) {
    return bad("key_dim",
               absl::StrCat("per-head key width ", head_k_dim(), " must be even for rotary"));
  }
  if (rotary == Rotary::kInterleaved && head_k_dim() < 4) {
    return bad("key_dim", "interleaved rotary needs a per-head key width of at least 4");
  }
  if (vocab_size < 0) return bad("vocab_size", "must not be negative");
  if (ffn == FfnKind::kSeedMlp) {
    if (ffn_dims.empty() || ffn_dims.back() != hidden_size) {
      return bad("ffn_dims", "seed MLP widths must end with hidden_size");
    }
  } else if (ffn_dim <= 0) {
    return bad("ffn_dim", "must be positive");
  }
  if (!is_language_model() && (tied_head || embed_norm)) {
    return bad("vocab_size", "a backbone (vocab_size 0) has no embedding or head");
  }
  if (block_norm_eps <= 0 || group_norm_eps <= 0) return bad("eps", "must be positive");
  return absl::OkStatus();
}

std::string ModelConfig::Summary() const {
  return absl::StrFormat(
      "%s (%s): layers=%d D=%d heads=%d d_k=%d d_v=%d ffn=%s vocab=%d params=%.2fM",
      FamilyName(family), layout, num_layers, hidden_size, num_heads, head_k_dim(), head_v_dim(),
      FfnKindName(ffn), vocab_size, ParameterCount(*this) / 1e6);
}

std::map<std::string, std::vector<int64_t>> ExpectedTensors(const ModelConfig& c) {
  std::map<std::string, std::vector<int64_t>> t;
  const int64_t d = c.hidden_size;
  auto norm = [&](const std::string& name, int64_t width, bool bias) {
    t[name + ".w"] = {width};
    if (bias) t[name + ".b"] = {width};
  };
  auto linear = [&](const std::string& name, int64_t out, int64_t in, bool bias) {
    t[name + ".w"] = {out, in};
    if (bias) t[name + ".b"] = {out};
  };
  if (c.is_language_model()) {
    t["embed.w"] = {c.vocab_size, d};
    if (c.embed_norm) norm("embed_norm", d, c.block_norm_bias);
    if (c.final_norm) norm("final_norm", d, c.block_norm_bias);
    if (!c.tied_head) t["lm_head.w"] = {c.vocab_size, d};
  }
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("layers.", i, ".");
    norm(p + "attn_norm", d, c.block_norm_bias);
    linear(p + "q", c.key_dim, d, c.proj_bias);
    linear(p + "k", c.key_dim, d, c.proj_bias);
    linear(p + "v", c.value_dim, d, c.proj_bias);
    linear(p + "g", c.value_dim, d, c.proj_bias);
    linear(p + "o", d, c.value_dim, c.proj_bias);
    if (c.group_norm_weight) t[p + "gn.w"] = {c.head_v_dim()};
    if (c.group_norm_bias) t[p + "gn.b"] = {c.head_v_dim()};
    norm(p + "ffn_norm", d, c.block_norm_bias);
    switch (c.ffn) {
      case FfnKind::kSeedMlp: {
        int64_t in = d;
        for (size_t j = 0; j < c.ffn_dims.size(); ++j) {
          linear(absl::StrCat(p, "mlp.", j), c.ffn_dims[j], in, c.ffn_bias);
          in = c.ffn_dims[j];
        }
        break;
      }
      case FfnKind::kFfnV1:
        linear(p + "ffn.act", c.ffn_dim, d, c.ffn_bias);
        if (c.ffn_inner_norm) norm(p + "ffn.inner_norm", c.ffn_dim, true);
        linear(p + "ffn.out", d, c.ffn_dim, c.ffn_bias);
        break;
      case FfnKind::kGlu:
      case FfnKind::kSwiGlu:
        linear(p + "ffn.act", c.ffn_dim, d, c.ffn_bias);
        linear(p + "ffn.lin", c.ffn_dim, d, c.ffn_bias);
        linear(p + "ffn.out", d, c.ffn_dim, c.ffn_bias);
        break;
    }
  }
  return t;
}

int64_t ParameterCount(const ModelConfig& config) {
  int64_t n = 0;
  for (const auto& [name, shape] : ExpectedTensors(config)) {
    int64_t k = 1;
    for (int64_t s : shape) k *= s;
    n += k;
  }
  return n;
}

}  // namespace retnet::model
