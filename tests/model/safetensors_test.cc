// The safetensors reader validates everything up front and names the file and tensor in errors.
#include "model/safetensors.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <fstream>
#include <string>

namespace retnet::model {
namespace {

std::string TempPath(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/safetensors_XXXXXX";
  EXPECT_NE(::mkdtemp(dir.data()), nullptr);
  return dir + "/" + name;
}

// Writes an 8-byte length, `header`, and `data_bytes` zero bytes.
std::string WriteRaw(const std::string& header, size_t data_bytes, uint64_t claimed_len = 0) {
  const std::string path = TempPath("raw.safetensors");
  std::ofstream out(path, std::ios::binary);
  uint64_t n = claimed_len != 0 ? claimed_len : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\0');
  return path;
}

TEST(SafetensorsTest, RoundTripsEveryDtypeAndMetadata) {
  const std::string path = TempPath("round.safetensors");
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"f32", at::randn({3, 5})},
      {"bf16", at::randn({7}).to(at::kBFloat16)},
      {"f16", at::randn({2, 2}).to(at::kHalf)},
      {"i64", at::arange(10, at::kLong).view({2, 5})},
      {"scalar_like", at::ones({1})},
  };
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  EXPECT_EQ((*file)->tensors().size(), tensors.size());
  for (const auto& [name, want] : tensors) {
    auto got = (*file)->Get(name);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->scalar_type(), want.scalar_type()) << name;
    EXPECT_TRUE(at::equal(*got, want)) << name;
  }
  EXPECT_EQ((*file)->Get("absent").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, TensorsOutliveTheFileHandle) {
  const std::string path = TempPath("alive.safetensors");
  at::Tensor want = at::randn({64});
  ASSERT_TRUE(WriteSafetensors(path, {{"x", want}}).ok());
  at::Tensor got;
  {
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok());
    got = *(*file)->Get("x");
  }
  EXPECT_TRUE(at::equal(got, want));
}

void ExpectInvalid(const std::string& path, const std::string& needle) {
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(file.status().message().find(needle), std::string::npos) << file.status();
  EXPECT_NE(file.status().message().find(path), std::string::npos) << file.status();
}

TEST(SafetensorsTest, RejectsShortFile) {
  const std::string path = TempPath("short.safetensors");
  std::ofstream(path, std::ios::binary) << "abc";
  ExpectInvalid(path, "truncated");
}

TEST(SafetensorsTest, RejectsOversizedHeader) {
  ExpectInvalid(WriteRaw("{}", 0, kMaxSafetensorsHeaderBytes + 1), "exceeds the limit");
}

TEST(SafetensorsTest, RejectsHeaderLongerThanFile) {
  ExpectInvalid(WriteRaw("{}", 0, 4096), "truncated");
}

TEST(SafetensorsTest, RejectsInvalidJson) {
  ExpectInvalid(WriteRaw("{not json", 0), "not valid JSON");
}

TEST(SafetensorsTest, RejectsUnknownDtype) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})", 1),
                "'w': unsupported dtype F8");
}

TEST(SafetensorsTest, RejectsTruncatedData) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8), "'w'");
}

TEST(SafetensorsTest, RejectsShapeByteMismatch) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", 16),
                "needs 12 bytes");
}

TEST(SafetensorsTest, RejectsNegativeDimension) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
                "negative");
}

TEST(SafetensorsTest, RejectsOverlappingTensors) {
  ExpectInvalid(WriteRaw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         12),
                "overlap");
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  auto file = SafetensorsFile::Open(TempPath("absent.safetensors"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace retnet::model
