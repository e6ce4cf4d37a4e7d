#include "model/checkpoint.h"

#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "common/strings.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace retnet::model {
namespace {

using json = nlohmann::json;

// The seed MLP may list this many hidden widths at most (published models use one).
constexpr size_t kMaxSeedMlpLinears = 16;

// Whether a directory entry exists at all (a FIFO, a device or a dangling link too): such an
// entry is then opened, and refused with an error naming it, rather than silently skipped.
bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

bool IsDir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// config.json and the shard index are small; anything larger is not one.
constexpr uint64_t kMaxJsonBytes = 16ull << 20;

absl::StatusOr<json> ReadJson(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadRegularFile(path, kMaxJsonBytes));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a valid JSON object"));
  }
  return j;
}

std::string Shape(at::IntArrayRef s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

// Typed access to config.json fields with errors naming the file and the field.
class ConfigReader {
 public:
  ConfigReader(const json& j, std::string path) : j_(j), path_(std::move(path)) {}

  bool Has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

  absl::StatusOr<int64_t> Int(const std::string& key) const {
    if (!Has(key) || !j_[key].is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": field '", key, "' is missing or not an integer"));
    }
    if (j_[key].is_number_unsigned() &&
        j_[key].get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(absl::StrCat(
          path_, ": field '", key, "' = ", j_[key].get<uint64_t>(), " is out of range"));
    }
    return j_[key].get<int64_t>();
  }
  absl::StatusOr<int64_t> Int(const std::string& key, int64_t def) const {
    if (!Has(key)) return def;
    return Int(key);
  }
  // A size: an integer in [1, max] (a default, when given, is checked the same way), so that
  // nothing derived from it can overflow or drive an allocation before the tensors confirm it.
  absl::StatusOr<int64_t> Size(const std::string& key, int64_t max) const {
    ASSIGN_OR_RETURN(int64_t v, Int(key));
    return InRange(key, v, 1, max);
  }
  absl::StatusOr<int64_t> Size(const std::string& key, int64_t def, int64_t max) const {
    ASSIGN_OR_RETURN(int64_t v, Int(key, def));
    return InRange(key, v, 1, max);
  }
  absl::StatusOr<int64_t> InRange(const std::string& key, int64_t v, int64_t lo, int64_t hi) const {
    if (v < lo || v > hi) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": field '", key, "' = ", v, " is outside [", lo, ", ", hi, "]"));
    }
    return v;
  }
  // A token id: -1 (none) when absent.
  absl::StatusOr<int64_t> TokenId(const std::string& key) const {
    ASSIGN_OR_RETURN(int64_t v, Int(key, -1));
    return InRange(key, v, -1, kMaxVocab - 1);
  }
  // An id or a list of ids (eos_token_id in Llama-3 style configs); empty when absent or -1.
  absl::StatusOr<std::vector<int64_t>> TokenIds(const std::string& key) const {
    std::vector<int64_t> out;
    if (!Has(key)) return out;
    if (!j_[key].is_array()) {
      ASSIGN_OR_RETURN(int64_t v, TokenId(key));
      if (v >= 0) out.push_back(v);
      return out;
    }
    if (j_[key].size() > 64) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": field '", key, "' lists more than 64 ids"));
    }
    for (const json& e : j_[key]) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= kMaxVocab) {
        return absl::InvalidArgumentError(
            absl::StrCat(path_, ": field '", key, "' holds something that is not a token id"));
      }
      out.push_back(e.get<int64_t>());
    }
    return out;
  }
  // A finite number in (0, max].
  absl::StatusOr<double> Factor(const std::string& key, double def, double max) const {
    ASSIGN_OR_RETURN(double v, Number(key, def));
    if (!(v > 0 && v <= max)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": field '", key, "' = ", v, " is outside (0, ", max, "]"));
    }
    return v;
  }
  absl::StatusOr<double> Number(const std::string& key, double def) const {
    if (!Has(key)) return def;
    if (!j_[key].is_number()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": field '", key, "' is not a number"));
    }
    return j_[key].get<double>();
  }
  absl::StatusOr<bool> Bool(const std::string& key, bool def) const {
    if (!Has(key)) return def;
    if (!j_[key].is_boolean()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": field '", key, "' is not a boolean"));
    }
    return j_[key].get<bool>();
  }
  absl::StatusOr<std::string> String(const std::string& key, const std::string& def) const {
    if (!Has(key)) return def;
    if (!j_[key].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": field '", key, "' is not a string"));
    }
    return j_[key].get<std::string>();
  }
  absl::StatusOr<Activation> Act(const std::string& key, const std::string& def) const {
    ASSIGN_OR_RETURN(std::string name, String(key, def));
    if (name == "swish" || name == "silu") return Activation::kSwish;
    if (name == "gelu") return Activation::kGelu;
    return absl::UnimplementedError(absl::StrCat(path_, ": field '", key, "' = '", name,
                                                 "': only swish/silu and gelu are supported"));
  }
  absl::Status Invalid(const std::string& key, const std::string& why) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": field '", key, "' ", why));
  }
  absl::Status Unsupported(const std::string& key, const std::string& what) const {
    return absl::UnimplementedError(
        absl::StrCat(path_, ": unsupported variant: ", what, " (field '", key, "')"));
  }
  // config.Validate() with the file named: the last check before any tensor is looked at.
  absl::Status Check(const ModelConfig& config) const {
    absl::Status s = config.Validate();
    if (s.ok()) return s;
    return absl::Status(s.code(), absl::StrCat(path_, ": ", s.message()));
  }
  const json& raw() const { return j_; }

 private:
  const json& j_;
  std::string path_;
};

// All tensors of a checkpoint directory, by name, with the file that holds each.
class TensorSource {
 public:
  absl::Status Open(const std::string& dir) {
    const std::string single = dir + "/model.safetensors";
    const std::string index = dir + "/model.safetensors.index.json";
    if (Exists(single)) {
      ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single));
      for (const auto& t : file->tensors()) owner_[t.name] = file;
      return absl::OkStatus();
    }
    if (!Exists(index)) {
      return absl::NotFoundError(
          absl::StrCat(dir, ": no model.safetensors or model.safetensors.index.json"));
    }
    ASSIGN_OR_RETURN(json j, ReadJson(index));
    if (!j.contains("weight_map") || !j["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index, ": missing object 'weight_map'"));
    }
    std::map<std::string, std::shared_ptr<const SafetensorsFile>> files;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index, ": weight_map['", it.key(), "'] is not a file name"));
      }
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard == "..") {
        return absl::InvalidArgumentError(
            absl::StrCat(index, ": shard name '", shard, "' must be a plain file name"));
      }
      if (files.count(shard) == 0) {
        ASSIGN_OR_RETURN(files[shard], SafetensorsFile::Open(dir + "/" + shard));
      }
      if (files[shard]->Find(it.key()) == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir, "/", shard, ": missing tensor '", it.key(),
                         "' (listed in model.safetensors.index.json)"));
      }
      owner_[it.key()] = files[shard];
    }
    for (const auto& [name, file] : files) {
      for (const auto& t : file->tensors()) {
        if (owner_.count(t.name) == 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              file->path(), ": unexpected tensor '", t.name, "' (not in the index's weight_map)"));
        }
      }
    }
    description_ = index;
    return absl::OkStatus();
  }

  bool Has(const std::string& name) const { return owner_.count(name) != 0; }
  std::string FileOf(const std::string& name) const {
    auto it = owner_.find(name);
    return it == owner_.end() ? description_ : it->second->path();
  }
  void SetDefaultDescription(const std::string& d) {
    if (description_.empty()) description_ = d;
  }
  std::vector<int64_t> ShapeOf(const std::string& name) const {
    return owner_.at(name)->Find(name)->shape;
  }

  // Fetches `name` as a floating-point tensor of `shape`; marks it consumed.
  absl::StatusOr<at::Tensor> Get(const std::string& name, const std::vector<int64_t>& shape,
                                 const std::string& what) {
    auto it = owner_.find(name);
    if (it == owner_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(description_, ": missing tensor '", name, "' (", what, ")"));
    }
    const auto* info = it->second->Find(name);
    if (!at::isFloatingType(info->dtype)) {
      return absl::InvalidArgumentError(
          absl::StrCat(it->second->path(), ": tensor '", name, "' has dtype ",
                       SafetensorsDtypeName(info->dtype), ", expected F32, F16 or BF16"));
    }
    if (info->shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(it->second->path(), ": tensor '", name,
                                                     "' has shape ", Shape(info->shape),
                                                     ", expected ", Shape(shape), " (", what, ")"));
    }
    used_.insert(name);
    return it->second->Get(name);
  }
  void MarkUsed(const std::string& name) { used_.insert(name); }

  absl::Status CheckAllUsed() const {
    for (const auto& [name, file] : owner_) {
      if (used_.count(name) != 0) continue;
      if (absl::StrContains(name, "moe_layer") || absl::StrContains(name, ".experts.")) {
        return absl::UnimplementedError(absl::StrCat(
            file->path(), ": unsupported variant: mixture-of-experts (tensor '", name, "')"));
      }
      if (absl::StrContains(name, ".A.") || absl::StrContains(name, ".B.")) {
        return absl::UnimplementedError(absl::StrCat(
            file->path(), ": unsupported variant: multiway network (tensor '", name, "')"));
      }
      if (absl::StrContains(name, "conv1d")) {
        return absl::UnimplementedError(absl::StrCat(
            file->path(), ": unsupported variant: short convolution (tensor '", name, "')"));
      }
      return absl::InvalidArgumentError(
          absl::StrCat(file->path(), ": unexpected tensor '", name, "'"));
    }
    return absl::OkStatus();
  }

 private:
  std::map<std::string, std::shared_ptr<const SafetensorsFile>> owner_;
  std::set<std::string> used_;
  std::string description_;
};

// What the family-specific parsers produce: the config, internal -> external names, tensors
// already produced (split fused weights), and buffers.
struct Mapping {
  ModelConfig config;
  std::map<std::string, std::string> names;
  std::map<std::string, at::Tensor> preset;
  std::vector<LayerBuffers> buffers;
};

void MapLinear(Mapping& m, const std::string& internal, const std::string& external) {
  m.names[internal + ".w"] = external + ".weight";
  m.names[internal + ".b"] = external + ".bias";
}

// Reads a torchscale-style angle buffer (duplicated thetas [t0, t0, t1, t1, ...]) into theta.
absl::StatusOr<at::Tensor> ThetaFromAngle(const at::Tensor& angle, const std::string& where) {
  at::Tensor a = angle.to(at::kFloat).reshape({-1});
  at::Tensor even = a.slice(0, 0, a.size(0), 2), odd = a.slice(0, 1, a.size(0), 2);
  if (!at::equal(even, odd)) {
    return absl::InvalidArgumentError(absl::StrCat(where,
                                                   ": angle buffer is not in the interleaved "
                                                   "[t0, t0, t1, t1, ...] layout"));
  }
  return even.clone();
}

absl::Status CheckDecay(const at::Tensor& decay, const std::string& where) {
  if (!(decay.to(at::kFloat).lt(0).all().item<bool>())) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": decay buffer must hold log(gamma) < 0"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Mapping> ParseFla(const ConfigReader& cfg, TensorSource& src) {
  Mapping m;
  ModelConfig& c = m.config;
  c.family = Family::kFla;
  c.layout = "fla";
  if (cfg.Has("use_short_conv") && cfg.raw()["use_short_conv"] == true) {
    return cfg.Unsupported("use_short_conv", "short convolution");
  }
  if (cfg.Has("feature_map")) return cfg.Unsupported("feature_map", "feature maps");
  if (cfg.Has("attn")) return cfg.Unsupported("attn", "hybrid attention layers");
  if (cfg.Has("attnres_block_size"))
    return cfg.Unsupported("attnres_block_size", "attention residual blocks");
  ASSIGN_OR_RETURN(bool output_gate, cfg.Bool("use_output_gate", true));
  if (!output_gate) return cfg.Unsupported("use_output_gate", "retention without the output gate");
  ASSIGN_OR_RETURN(c.hidden_size, cfg.Size("hidden_size", kMaxWidth));
  ASSIGN_OR_RETURN(c.num_layers, cfg.Size("num_hidden_layers", kMaxLayers));
  ASSIGN_OR_RETURN(c.num_heads, cfg.Size("num_heads", kMaxHeads));
  ASSIGN_OR_RETURN(int64_t kv_heads, cfg.Int("num_kv_heads", c.num_heads));
  if (kv_heads != c.num_heads)
    return cfg.Unsupported("num_kv_heads", "grouped-query retention (GQA)");
  ASSIGN_OR_RETURN(double expand_k, cfg.Factor("expand_k", 1.0, 4.0));
  ASSIGN_OR_RETURN(double expand_v, cfg.Factor("expand_v", 2.0, 4.0));
  c.key_dim = static_cast<int64_t>(c.hidden_size * expand_k);
  c.value_dim = static_cast<int64_t>(c.hidden_size * expand_v);
  ASSIGN_OR_RETURN(c.vocab_size, cfg.Size("vocab_size", kMaxVocab));
  ASSIGN_OR_RETURN(double rms_eps, cfg.Number("rms_norm_eps", 1e-6));
  ASSIGN_OR_RETURN(double eps, cfg.Number("norm_eps", rms_eps));
  ASSIGN_OR_RETURN(Activation act, cfg.Act("hidden_act", "swish"));
  ASSIGN_OR_RETURN(c.tied_head, cfg.Bool("tie_word_embeddings", false));
  ASSIGN_OR_RETURN(bool affine, cfg.Bool("elementwise_affine", true));
  ASSIGN_OR_RETURN(c.bos_token_id, cfg.TokenId("bos_token_id"));
  ASSIGN_OR_RETURN(c.eos_token_ids, cfg.TokenIds("eos_token_id"));
  c.eos_token_id = c.eos_token_ids.empty() ? -1 : c.eos_token_ids[0];
  c.rotary = Rotary::kRotateHalf;
  c.scale_on = ScaleOn::kQuery;
  c.retention_norm = RetentionNorm::kRaw;
  c.block_norm = NormKind::kRmsNorm;
  c.block_norm_eps = eps;
  c.group_norm = NormKind::kRmsNorm;
  c.group_norm_weight = affine;
  c.group_norm_eps = eps;
  c.gate_act = Activation::kSwish;
  c.ffn = FfnKind::kSwiGlu;
  c.ffn_act = act;
  c.final_norm = true;
  if (cfg.Has("intermediate_size")) {
    ASSIGN_OR_RETURN(c.ffn_dim, cfg.Size("intermediate_size", kMaxFfnWidth));
  } else {
    ASSIGN_OR_RETURN(double ratio, cfg.Factor("hidden_ratio", 2.0, 64.0));
    const int64_t raw = static_cast<int64_t>(c.hidden_size * ratio * 2.0 / 3.0);
    c.ffn_dim = 256 * ((raw + 255) / 256);
  }
  RETURN_IF_ERROR(cfg.Check(c));

  m.names["embed.w"] = src.Has("model.embed_tokens.weight") && !src.Has("model.embeddings.weight")
                           ? "model.embed_tokens.weight"
                           : "model.embeddings.weight";
  m.names["final_norm.w"] = "model.norm.weight";
  m.names["lm_head.w"] = "lm_head.weight";
  if (c.tied_head && src.Has("lm_head.weight"))
    src.MarkUsed("lm_head.weight");  // saved copy of the tie
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    const std::string q = absl::StrCat("layers.", i, ".");
    m.names[q + "attn_norm.w"] = p + "attn_norm.weight";
    for (const char* n : {"q", "k", "v", "g", "o"}) MapLinear(m, q + n, p + "attn." + n + "_proj");
    m.names[q + "gn.w"] = src.Has(p + "attn.g_norm.weight") ? p + "attn.g_norm.weight"
                                                            : p + "attn.g_norm_swish_gate.weight";
    m.names[q + "ffn_norm.w"] = p + "mlp_norm.weight";
    const std::string gate = p + "mlp.gate_proj.weight";
    if (src.Has(gate) && !src.Has(p + "mlp.up_proj.weight")) {
      // Legacy fused MLP: rows [0, I) are the activated branch, [I, 2I) the linear branch.
      ASSIGN_OR_RETURN(at::Tensor fused, src.Get(gate, {2 * c.ffn_dim, c.hidden_size},
                                                 "legacy fused gate_proj [2I, D]"));
      m.preset[q + "ffn.act.w"] = fused.narrow(0, 0, c.ffn_dim);
      m.preset[q + "ffn.lin.w"] = fused.narrow(0, c.ffn_dim, c.ffn_dim);
    } else {
      m.names[q + "ffn.act.w"] = gate;
      m.names[q + "ffn.lin.w"] = p + "mlp.up_proj.weight";
    }
    m.names[q + "ffn.out.w"] = p + "mlp.down_proj.weight";
  }
  // One computed set shared by every layer (read-only), not one allocation per layer.
  m.buffers.assign(c.num_layers, DefaultBuffers(c));
  return m;
}

absl::StatusOr<Mapping> ParseTorchscale(const ConfigReader& cfg, TensorSource& src) {
  Mapping m;
  ModelConfig& c = m.config;
  c.family = Family::kTorchscale;
  std::string prefix;
  for (const char* p : {"decoder.", "model.", ""}) {
    if (src.Has(absl::StrCat(p, "layers.0.retention.q_proj.weight"))) {
      prefix = p;
      break;
    }
    if (*p == '\0') {
      return absl::InvalidArgumentError(
          "torchscale checkpoint: no tensor '[decoder.|model.]layers.0.retention.q_proj.weight'");
    }
  }
  const std::string l0 = prefix + "layers.0.";
  const bool v1 =
      src.Has(l0 + "retention.q_proj.bias") || src.Has(l0 + "retention_layer_norm.bias");
  c.layout = prefix == "model." ? "syncdoth" : (v1 ? "torchscale-v1" : "torchscale");

  ASSIGN_OR_RETURN(bool multiway, cfg.Bool("multiway", false));
  if (multiway) return cfg.Unsupported("multiway", "multiway network");
  ASSIGN_OR_RETURN(int64_t moe_freq, cfg.Int("moe_freq", 0));
  if (moe_freq > 0) return cfg.Unsupported("moe_freq", "mixture-of-experts");
  ASSIGN_OR_RETURN(bool deepnorm, cfg.Bool("deepnorm", false));
  if (deepnorm) return cfg.Unsupported("deepnorm", "DeepNorm post-norm residual scaling");
  ASSIGN_OR_RETURN(bool pre_norm, cfg.Bool("decoder_normalize_before", true));
  if (!pre_norm) return cfg.Unsupported("decoder_normalize_before", "post-norm blocks");
  if (src.Has(l0 + "retention.decay_proj.weight")) {
    return absl::UnimplementedError(
        absl::StrCat(src.FileOf(l0 + "retention.decay_proj.weight"),
                     ": unsupported variant: learned decay projection"));
  }

  ASSIGN_OR_RETURN(c.hidden_size, cfg.Size("decoder_embed_dim", kMaxWidth));
  ASSIGN_OR_RETURN(c.num_layers, cfg.Size("decoder_layers", kMaxLayers));
  ASSIGN_OR_RETURN(c.num_heads, cfg.Size("decoder_retention_heads", kMaxHeads));
  c.key_dim = c.hidden_size;
  const std::string v_name = l0 + "retention.v_proj.weight";
  const int64_t v_rows =
      src.Has(v_name) && !src.ShapeOf(v_name).empty() ? src.ShapeOf(v_name)[0] : 2 * c.hidden_size;
  ASSIGN_OR_RETURN(c.value_dim, cfg.Size("decoder_value_embed_dim", v_rows, 4 * kMaxWidth));
  const std::string fc1 = l0 + "ffn.fc1.weight";
  const int64_t f_rows = src.Has(fc1) && !src.ShapeOf(fc1).empty() ? src.ShapeOf(fc1)[0] : 0;
  ASSIGN_OR_RETURN(c.ffn_dim, cfg.Size("decoder_ffn_embed_dim", f_rows, kMaxFfnWidth));
  ASSIGN_OR_RETURN(c.vocab_size, cfg.Size("vocab_size", kMaxVocab));
  ASSIGN_OR_RETURN(double eps, cfg.Number("layernorm_eps", 1e-6));
  ASSIGN_OR_RETURN(c.ffn_act, cfg.Act("activation_fn", "gelu"));
  ASSIGN_OR_RETURN(bool no_scale, cfg.Bool("no_scale_embedding", true));
  ASSIGN_OR_RETURN(c.embed_norm, cfg.Bool("layernorm_embedding", false));
  ASSIGN_OR_RETURN(bool shared, cfg.Bool("share_decoder_input_output_embed", false));
  ASSIGN_OR_RETURN(bool tied, cfg.Bool("tie_word_embeddings", shared));
  ASSIGN_OR_RETURN(c.bos_token_id, cfg.TokenId("bos_token_id"));
  ASSIGN_OR_RETURN(c.eos_token_ids, cfg.TokenIds("eos_token_id"));
  c.eos_token_id = c.eos_token_ids.empty() ? -1 : c.eos_token_ids[0];
  c.tied_head = tied;
  c.embed_scale = no_scale ? 1.0 : std::sqrt(static_cast<double>(c.hidden_size));
  c.rotary = Rotary::kInterleaved;
  c.scale_on = ScaleOn::kKey;
  c.retention_norm = RetentionNorm::kInvSqrtCn;
  c.gate_act = Activation::kSwish;
  c.final_norm = true;
  c.proj_bias = src.Has(l0 + "retention.q_proj.bias");
  c.block_norm =
      src.Has(l0 + "retention_layer_norm.bias") ? NormKind::kLayerNorm : NormKind::kRmsNorm;
  c.block_norm_bias = c.block_norm == NormKind::kLayerNorm;
  c.block_norm_eps = eps;
  c.group_norm_weight = false;
  if (v1) {
    c.group_norm = NormKind::kLayerNorm;
    // Upstream's MultiScaleRetention of that time (e.g. 0b1f113) builds its group norm with a
    // hard-coded eps of 1e-6, whatever layernorm_eps says.
    ASSIGN_OR_RETURN(c.group_norm_eps, cfg.Number("group_norm_eps", 1e-6));
  } else {
    c.group_norm = NormKind::kRmsNorm;
    ASSIGN_OR_RETURN(c.group_norm_eps, cfg.Number("group_norm_eps", eps));
  }
  if (src.Has(l0 + "ffn.gate.weight")) {
    c.ffn = FfnKind::kGlu;
  } else {
    c.ffn = FfnKind::kFfnV1;
    c.ffn_inner_norm = src.Has(l0 + "ffn.ffn_layernorm.weight");
  }
  c.ffn_bias = src.Has(l0 + "ffn.fc1.bias");
  RETURN_IF_ERROR(cfg.Check(c));

  m.names["embed.w"] = prefix + "embed_tokens.weight";
  MapLinear(m, "embed_norm", prefix + "layernorm_embedding");
  MapLinear(m, "final_norm", prefix + "layer_norm");
  m.names["lm_head.w"] =
      src.Has("lm_head.weight") ? "lm_head.weight" : prefix + "output_projection.weight";
  if (c.tied_head) {
    for (const std::string& n :
         {std::string("lm_head.weight"), prefix + "output_projection.weight"}) {
      if (src.Has(n)) src.MarkUsed(n);
    }
  }
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat(prefix, "layers.", i, ".");
    const std::string q = absl::StrCat("layers.", i, ".");
    MapLinear(m, q + "attn_norm", p + "retention_layer_norm");
    for (const char* n : {"q", "k", "v", "g"}) MapLinear(m, q + n, p + "retention." + n + "_proj");
    MapLinear(m, q + "o", p + "retention.out_proj");
    MapLinear(m, q + "ffn_norm", p + "final_layer_norm");
    MapLinear(m, q + "ffn.act", p + "ffn.fc1");
    MapLinear(m, q + "ffn.lin", p + "ffn.gate");
    MapLinear(m, q + "ffn.out", p + "ffn.fc2");
    MapLinear(m, q + "ffn.inner_norm", p + "ffn.ffn_layernorm");
  }
  // Relative-position buffers, shared by all layers; computed when absent.
  LayerBuffers buffers = DefaultBuffers(c);
  const std::string decay = prefix + "retnet_rel_pos.decay",
                    angle = prefix + "retnet_rel_pos.angle";
  if (src.Has(decay)) {
    ASSIGN_OR_RETURN(at::Tensor d, src.Get(decay, {c.num_heads}, "log decay per head"));
    RETURN_IF_ERROR(CheckDecay(d, src.FileOf(decay) + ": tensor '" + decay + "'"));
    buffers.log_decay = d.to(at::kFloat).clone();
  }
  if (src.Has(angle)) {
    ASSIGN_OR_RETURN(at::Tensor a, src.Get(angle, {c.head_k_dim()}, "rotary angles"));
    ASSIGN_OR_RETURN(buffers.theta,
                     ThetaFromAngle(a, src.FileOf(angle) + ": tensor '" + angle + "'"));
  }
  m.buffers.assign(c.num_layers, buffers);
  for (const std::string& n : {prefix + "version", std::string("version")}) {
    if (src.Has(n)) src.MarkUsed(n);
  }
  return m;
}

absl::StatusOr<Mapping> ParseSeed(const ConfigReader& cfg, TensorSource& src) {
  Mapping m;
  ModelConfig& c = m.config;
  c.family = Family::kSeed;
  c.layout = "seed";
  ASSIGN_OR_RETURN(c.num_layers, cfg.Size("num_layer", 6, kMaxLayers));
  ASSIGN_OR_RETURN(c.num_heads, cfg.Size("num_heads", 8, kMaxHeads));
  ASSIGN_OR_RETURN(c.hidden_size, cfg.Size("dim_model", 512, kMaxWidth));
  ASSIGN_OR_RETURN(int64_t value_factor, cfg.Size("value_factor", 2, 16));
  ASSIGN_OR_RETURN(c.gate_act, cfg.Act("msr_gate_fn", "gelu"));
  ASSIGN_OR_RETURN(c.ffn_act, cfg.Act("mlp_gate_fn", "gelu"));
  ASSIGN_OR_RETURN(c.ffn_bias, cfg.Bool("mlp_bias", true));
  c.key_dim = c.hidden_size;
  c.value_dim = c.hidden_size * value_factor;
  c.vocab_size = 0;
  // mlp_mult: an int n means ONE hidden layer of width n (the seed's bug, kept as the weights say);
  // a list gives the literal hidden widths.
  std::vector<int64_t> widths;
  if (!cfg.Has("mlp_mult")) {
    widths = {4};
  } else if (cfg.raw()["mlp_mult"].is_number_integer()) {
    ASSIGN_OR_RETURN(int64_t width, cfg.Size("mlp_mult", kMaxFfnWidth));
    widths = {width};
  } else if (cfg.raw()["mlp_mult"].is_array()) {
    const json& list = cfg.raw()["mlp_mult"];
    if (list.empty() || list.size() > kMaxSeedMlpLinears) {
      return cfg.Invalid("mlp_mult", absl::StrCat("must list 1 to ", kMaxSeedMlpLinears,
                                                  " hidden widths, not ", list.size()));
    }
    for (const auto& w : list) {
      // Non-negative JSON integers parse as unsigned; anything else is not a width.
      if (!w.is_number_unsigned() || w.get<uint64_t>() < 1 ||
          w.get<uint64_t>() > static_cast<uint64_t>(kMaxFfnWidth)) {
        return cfg.Invalid("mlp_mult",
                           absl::StrCat("must hold integers in [1, ", kMaxFfnWidth, "]"));
      }
      widths.push_back(w.get<int64_t>());
    }
  } else {
    return cfg.Invalid("mlp_mult", "must be an integer or a list");
  }
  widths.push_back(c.hidden_size);
  c.ffn_dims = widths;
  c.ffn = FfnKind::kSeedMlp;
  c.rotary = Rotary::kInterleaved;
  c.scale_on = ScaleOn::kKey;
  c.retention_norm = RetentionNorm::kRaw;
  c.block_norm = NormKind::kLayerNorm;
  c.block_norm_bias = true;
  c.block_norm_eps = 1e-5;
  c.group_norm = NormKind::kLayerNorm;
  c.group_norm_weight = true;
  c.group_norm_bias = true;
  c.group_norm_eps = 1e-5;
  c.proj_bias = true;
  c.final_norm = false;
  c.per_layer_buffers = true;
  RETURN_IF_ERROR(cfg.Check(c));
  const LayerBuffers defaults = DefaultBuffers(c);  // shared (read-only) unless a layer has its own
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("layers.", i, ".");
    MapLinear(m, p + "attn_norm", p + "0.pre_norm");
    for (const char* n : {"q", "k", "v", "g", "o"}) MapLinear(m, p + n, p + "0." + n + "_proj");
    MapLinear(m, p + "gn", p + "0.norm");
    MapLinear(m, p + "ffn_norm", p + "1.net.0");
    for (size_t j = 0; j < widths.size(); ++j) {
      MapLinear(m, absl::StrCat(p, "mlp.", j), absl::StrCat(p, "1.net.", j + 1, ".1"));
    }
    LayerBuffers b = defaults;
    const std::string decay = p + "0.decay", angle = p + "0.angle";
    if (src.Has(decay)) {
      ASSIGN_OR_RETURN(at::Tensor d, src.Get(decay, {c.num_heads}, "log decay per head"));
      RETURN_IF_ERROR(CheckDecay(d, src.FileOf(decay) + ": tensor '" + decay + "'"));
      b.log_decay = d.to(at::kFloat).clone();
    }
    if (src.Has(angle)) {
      ASSIGN_OR_RETURN(at::Tensor a, src.Get(angle, {1, c.head_k_dim()}, "rotary angles"));
      ASSIGN_OR_RETURN(b.theta, ThetaFromAngle(a, src.FileOf(angle) + ": tensor '" + angle + "'"));
    }
    m.buffers.push_back(b);
  }
  return m;
}

}  // namespace

namespace {

// Every exception (c10::Error, std::bad_alloc, nlohmann's type errors) becomes a status naming
// `dir`: nothing a checkpoint holds may abort the process.
template <typename Fn>
auto NoThrow(const std::string& dir, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(dir, ": out of memory while loading the checkpoint"));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, ": cannot load the checkpoint: ", common::FirstLine(e.what())));
  }
}

// generation_config.json (EOS ids, BOS) and tokenizer_config.json (add_bos_token), when present:
// the defaults HF's generate() takes from them. Ids outside the vocabulary are refused.
absl::Status ReadGenerationDefaults(const std::string& dir, ModelConfig* c) {
  const std::string gen_path = dir + "/generation_config.json";
  if (Exists(gen_path)) {
    ASSIGN_OR_RETURN(json g, ReadJson(gen_path));
    ConfigReader gen(g, gen_path);
    ASSIGN_OR_RETURN(std::vector<int64_t> eos, gen.TokenIds("eos_token_id"));
    if (!eos.empty()) c->eos_token_ids = eos;
    ASSIGN_OR_RETURN(int64_t bos, gen.TokenId("bos_token_id"));
    if (c->bos_token_id < 0) c->bos_token_id = bos;
    c->eos_token_id = c->eos_token_ids.empty() ? -1 : c->eos_token_ids[0];
  }
  for (int64_t id : c->eos_token_ids) {
    if (c->vocab_size > 0 && id >= c->vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          dir, ": eos_token_id ", id, " is outside the vocabulary of ", c->vocab_size));
    }
  }
  if (c->vocab_size > 0 && c->bos_token_id >= c->vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": bos_token_id ", c->bos_token_id, " is outside the vocabulary of ", c->vocab_size));
  }
  const std::string tok_path = dir + "/tokenizer_config.json";
  if (Exists(tok_path)) {
    ASSIGN_OR_RETURN(json t, ReadJson(tok_path));
    ConfigReader tok(t, tok_path);
    if (tok.Has("add_bos_token")) {
      ASSIGN_OR_RETURN(bool add, tok.Bool("add_bos_token", true));
      c->add_bos_token = add ? 1 : 0;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Checkpoint> ReadCheckpointUnchecked(const std::string& dir) {
  if (!IsDir(dir))
    return absl::NotFoundError(absl::StrCat(dir, ": checkpoint directory not found"));
  const std::string config_path = dir + "/config.json";
  ASSIGN_OR_RETURN(json j, ReadJson(config_path));
  TensorSource src;
  RETURN_IF_ERROR(src.Open(dir));
  src.SetDefaultDescription(dir + "/model.safetensors");
  ConfigReader cfg(j, config_path);

  ASSIGN_OR_RETURN(std::string family, cfg.String("family", ""));
  ASSIGN_OR_RETURN(std::string model_type, cfg.String("model_type", ""));
  absl::StatusOr<Mapping> mapping;
  if (family == "fla" || (family.empty() && model_type == "retnet")) {
    if (src.Has("model.layers.0.retention.q_proj.weight") ||
        src.Has("layers.0.retention.q_proj.weight")) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_path,
                       ": model_type 'retnet' (fla layout) but the tensors use torchscale names; "
                       "add \"family\": \"torchscale\" and RetNetConfig fields"));
    }
    mapping = ParseFla(cfg, src);
  } else if (family == "torchscale" || family == "syncdoth") {
    mapping = ParseTorchscale(cfg, src);
  } else if (family == "seed") {
    mapping = ParseSeed(cfg, src);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        config_path, ": unknown model family (family='", family, "', model_type='", model_type,
        "'); expected model_type \"retnet\" (fla/HF) or \"family\": \"torchscale\" | \"seed\""));
  }
  if (!mapping.ok()) return mapping.status();

  Checkpoint ckpt;
  ckpt.dir = dir;
  ckpt.config = mapping->config;
  ckpt.weights.buffers = std::move(mapping->buffers);
  for (const auto& [internal, shape] : ExpectedTensors(ckpt.config)) {
    auto preset = mapping->preset.find(internal);
    if (preset != mapping->preset.end()) {
      ckpt.weights.tensors[internal] = preset->second;
      continue;
    }
    auto name = mapping->names.find(internal);
    if (name == mapping->names.end()) {
      return absl::InternalError(absl::StrCat("no key mapping for internal tensor ", internal));
    }
    ASSIGN_OR_RETURN(ckpt.weights.tensors[internal], src.Get(name->second, shape, internal));
  }
  RETURN_IF_ERROR(src.CheckAllUsed());
  RETURN_IF_ERROR(ReadGenerationDefaults(dir, &ckpt.config));  // once the weights fit
  return ckpt;
}

}  // namespace

absl::StatusOr<Checkpoint> ReadCheckpoint(const std::string& dir) {
  return NoThrow(dir, [&] { return ReadCheckpointUnchecked(dir); });
}

absl::StatusOr<std::unique_ptr<RetNet>> LoadModel(const std::string& dir,
                                                  const ModelOptions& options) {
  return NoThrow(dir, [&]() -> absl::StatusOr<std::unique_ptr<RetNet>> {
    ASSIGN_OR_RETURN(Checkpoint ckpt, ReadCheckpointUnchecked(dir));
    auto model = RetNet::Create(std::move(ckpt.config), std::move(ckpt.weights), options);
    if (!model.ok()) {
      return absl::Status(model.status().code(), absl::StrCat(dir, ": ", model.status().message()));
    }
    return model;
  });
}

}  // namespace retnet::model
