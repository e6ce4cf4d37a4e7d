// DefaultModelDir(), kept apart from the torch translation units: it is the only file that
// carries the build's path definitions.
#include <sys/stat.h>

#include <cstdlib>
#include <string>

#ifndef RETNET_SOURCE_DEFAULT_MODEL_DIR
#define RETNET_SOURCE_DEFAULT_MODEL_DIR ""
#endif
#ifndef RETNET_INSTALL_DEFAULT_MODEL_DIR
#define RETNET_INSTALL_DEFAULT_MODEL_DIR ""
#endif

namespace retnet::model {

std::string DefaultModelDir() {
  if (const char* env = std::getenv("RETNET_DEFAULT_MODEL"); env != nullptr && *env != '\0') {
    return env;
  }
  const std::string source = RETNET_SOURCE_DEFAULT_MODEL_DIR;
  struct stat st {};
  if (!source.empty() && ::stat((source + "/config.json").c_str(), &st) == 0) return source;
  return RETNET_INSTALL_DEFAULT_MODEL_DIR;
}

}  // namespace retnet::model
