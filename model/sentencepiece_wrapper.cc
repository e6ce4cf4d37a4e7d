#include "model/sentencepiece_wrapper.h"

#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <mutex>

namespace retnet::model::internal {
namespace {

constexpr int kErrLen = 512;

struct Plugin {
  void* (*load)(const char*, char*, int) = nullptr;
  void (*free)(void*) = nullptr;
  int (*info)(void*, int) = nullptr;
  int (*flags)(void*, int) = nullptr;
  int (*piece)(void*, int, char*, int) = nullptr;
  int (*encode)(void*, const char*, int, int*, int, char*, int) = nullptr;
  int (*decode)(void*, const int*, int, char*, int) = nullptr;
  int (*train)(const char*, char*, int) = nullptr;
  std::string error;
};

std::string PluginPath() {
  if (const char* env = std::getenv("RETNET_SENTENCEPIECE_PLUGIN"); env != nullptr && *env != '\0')
    return env;
  char exe[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  std::string dir = n > 0 ? std::string(exe, static_cast<size_t>(n)) : std::string(".");
  dir = dir.substr(0, dir.rfind('/'));
  return dir + "/../lib/libretnet_sentencepiece.so";
}

template <typename F>
bool Bind(void* handle, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(::dlsym(handle, name));
  return *fn != nullptr;
}

// Loaded once into a new link-map namespace and never unloaded.
const Plugin& GetPlugin() {
  static Plugin plugin;
  static std::once_flag once;
  std::call_once(once, [] {
    const std::string path = PluginPath();
    void* handle = ::dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      plugin.error = std::string("cannot load the SentencePiece plugin: ") + ::dlerror();
      return;
    }
    const bool ok = Bind(handle, "retnet_sp_load", &plugin.load) &&
                    Bind(handle, "retnet_sp_free", &plugin.free) &&
                    Bind(handle, "retnet_sp_info", &plugin.info) &&
                    Bind(handle, "retnet_sp_flags", &plugin.flags) &&
                    Bind(handle, "retnet_sp_piece", &plugin.piece) &&
                    Bind(handle, "retnet_sp_encode", &plugin.encode) &&
                    Bind(handle, "retnet_sp_decode", &plugin.decode) &&
                    Bind(handle, "retnet_sp_train", &plugin.train);
    if (!ok) plugin.error = path + ": missing entry points";
  });
  return plugin;
}

class PluginModel final : public SentencePieceModel {
 public:
  PluginModel(const Plugin& plugin, void* handle) : p_(plugin), h_(handle) {}
  ~PluginModel() override { p_.free(h_); }
  int PieceSize() const override { return p_.info(h_, 0); }
  int BosId() const override { return p_.info(h_, 1); }
  int EosId() const override { return p_.info(h_, 2); }
  bool IsControl(int id) const override { return (p_.flags(h_, id) & 1) != 0; }
  bool IsUnknown(int id) const override { return (p_.flags(h_, id) & 2) != 0; }
  bool IsByte(int id) const override { return (p_.flags(h_, id) & 4) != 0; }
  std::string IdToPiece(int id) const override {
    std::string out(64, '\0');
    int n = p_.piece(h_, id, out.data(), static_cast<int>(out.size()));
    if (n > static_cast<int>(out.size())) {
      out.resize(n);
      n = p_.piece(h_, id, out.data(), n);
    }
    out.resize(std::max(n, 0));
    return out;
  }
  bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const override {
    char err[kErrLen] = {0};
    ids->resize(text.size() + 16);
    int n = p_.encode(h_, text.data(), static_cast<int>(text.size()), ids->data(),
                      static_cast<int>(ids->size()), err, kErrLen);
    if (n > static_cast<int>(ids->size())) {
      ids->resize(n);
      n = p_.encode(h_, text.data(), static_cast<int>(text.size()), ids->data(), n, err, kErrLen);
    }
    if (n < 0) {
      *error = err;
      ids->clear();
      return false;
    }
    ids->resize(n);
    return true;
  }
  bool Decode(const std::vector<int>& ids, std::string* text) const override {
    text->assign(ids.size() * 8 + 16, '\0');
    int n = p_.decode(h_, ids.data(), static_cast<int>(ids.size()), text->data(),
                      static_cast<int>(text->size()));
    if (n > static_cast<int>(text->size())) {
      text->resize(n);
      n = p_.decode(h_, ids.data(), static_cast<int>(ids.size()), text->data(), n);
    }
    if (n < 0) return false;
    text->resize(n);
    return true;
  }

 private:
  const Plugin& p_;
  void* h_;
};

}  // namespace

std::unique_ptr<SentencePieceModel> SentencePieceModel::Load(const std::string& path,
                                                             std::string* error) {
  const Plugin& plugin = GetPlugin();
  if (!plugin.error.empty()) {
    *error = plugin.error;
    return nullptr;
  }
  char err[kErrLen] = {0};
  void* handle = plugin.load(path.c_str(), err, kErrLen);
  if (handle == nullptr) {
    *error = err;
    return nullptr;
  }
  return std::make_unique<PluginModel>(plugin, handle);
}

bool TrainSentencePiece(const std::string& args, std::string* error) {
  const Plugin& plugin = GetPlugin();
  if (!plugin.error.empty()) {
    *error = plugin.error;
    return false;
  }
  char err[kErrLen] = {0};
  if (plugin.train(args.c_str(), err, kErrLen) == 1) return true;
  *error = err;
  return false;
}

}  // namespace retnet::model::internal
