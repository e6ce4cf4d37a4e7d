// libretnet_sentencepiece.so: the only code that includes and links libsentencepiece. Loaded
// at run time into its own link-map namespace by sentencepiece_wrapper.cc (see
// sentencepiece_wrapper.h for why). A plain C interface: no C++ objects, exceptions or heap
// ownership cross it; results are copied into caller-provided buffers.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#define RETNET_SP_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

void SetError(const std::string& message, char* err, int cap) {
  if (err == nullptr || cap <= 0) return;
  const size_t n = std::min(message.size(), static_cast<size_t>(cap - 1));
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

int CopyOut(const std::string& s, char* buf, int cap) {
  if (buf != nullptr && cap > 0)
    std::memcpy(buf, s.data(), std::min(s.size(), static_cast<size_t>(cap)));
  return static_cast<int>(s.size());
}

sentencepiece::SentencePieceProcessor* Sp(void* h) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(h);
}

}  // namespace

RETNET_SP_EXPORT void* retnet_sp_load(const char* path, char* err, int errlen) {
  try {
    auto* sp = new sentencepiece::SentencePieceProcessor();
    auto status = sp->Load(path);
    if (!status.ok()) {
      SetError(status.ToString(), err, errlen);
      delete sp;
      return nullptr;
    }
    return sp;
  } catch (const std::exception& e) {
    SetError(e.what(), err, errlen);
    return nullptr;
  }
}

RETNET_SP_EXPORT void retnet_sp_free(void* h) { delete Sp(h); }

// what: 0 = piece count, 1 = bos id, 2 = eos id.
RETNET_SP_EXPORT int retnet_sp_info(void* h, int what) {
  switch (what) {
    case 0:
      return Sp(h)->GetPieceSize();
    case 1:
      return Sp(h)->bos_id();
    default:
      return Sp(h)->eos_id();
  }
}

// Bit flags: 1 control, 2 unknown, 4 byte-fallback piece.
RETNET_SP_EXPORT int retnet_sp_flags(void* h, int id) {
  return (Sp(h)->IsControl(id) ? 1 : 0) | (Sp(h)->IsUnknown(id) ? 2 : 0) |
         (Sp(h)->IsByte(id) ? 4 : 0);
}

// Returns the piece's length; copies at most `cap` bytes.
RETNET_SP_EXPORT int retnet_sp_piece(void* h, int id, char* buf, int cap) {
  return CopyOut(Sp(h)->IdToPiece(id), buf, cap);
}

// Returns the number of ids (copies at most `cap`), or -1 with `err` set.
RETNET_SP_EXPORT int retnet_sp_encode(void* h, const char* text, int len, int* ids, int cap,
                                      char* err, int errlen) {
  try {
    std::vector<int> out;
    auto status = Sp(h)->Encode(std::string_view(text, static_cast<size_t>(len)), &out);
    if (!status.ok()) {
      SetError(status.ToString(), err, errlen);
      return -1;
    }
    std::copy_n(out.begin(), std::min(out.size(), static_cast<size_t>(std::max(cap, 0))), ids);
    return static_cast<int>(out.size());
  } catch (const std::exception& e) {
    SetError(e.what(), err, errlen);
    return -1;
  }
}

// Returns the text's length (copies at most `cap` bytes), or -1.
RETNET_SP_EXPORT int retnet_sp_decode(void* h, const int* ids, int n, char* buf, int cap) {
  try {
    std::string text;
    if (!Sp(h)->Decode(std::vector<int>(ids, ids + n), &text).ok()) return -1;
    return CopyOut(text, buf, cap);
  } catch (const std::exception&) {
    return -1;
  }
}

// Returns 1 on success, else 0 with `err` set.
RETNET_SP_EXPORT int retnet_sp_train(const char* args, char* err, int errlen) {
  try {
    auto status = sentencepiece::SentencePieceTrainer::Train(args);
    if (!status.ok()) SetError(status.ToString(), err, errlen);
    return status.ok() ? 1 : 0;
  } catch (const std::exception& e) {
    SetError(e.what(), err, errlen);
    return 0;
  }
}
