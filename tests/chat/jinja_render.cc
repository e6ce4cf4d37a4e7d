// retnet-jinja-render: the C++ side of the jinja_oracle test (not installed).
//
// Reads {"cases": [{"template": "...", "context": {...}}, ...]} on stdin and prints one JSON list
// with, per case, {"ok": true, "output": "..."} or {"ok": false, "error": "...", "raised": bool}
// (raised: the error came from the template's raise_exception). The same format as oracle.js.
#include <iostream>
#include <iterator>
#include <string>

#include "chat/jinja.h"
#include "nlohmann/json.hpp"

int main() {
  const std::string input((std::istreambuf_iterator<char>(std::cin)),
                          std::istreambuf_iterator<char>());
  const nlohmann::ordered_json job =
      nlohmann::ordered_json::parse(input, nullptr, /*allow_exceptions=*/false);
  if (job.is_discarded() || !job.contains("cases") || !job["cases"].is_array()) {
    std::cerr << "retnet-jinja-render: expected {\"cases\": [...]} on stdin\n";
    return 2;
  }
  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  for (const auto& c : job["cases"]) {
    nlohmann::ordered_json r;
    absl::StatusOr<retnet::chat::Template> t =
        retnet::chat::Template::Parse(c.value("template", std::string()));
    absl::StatusOr<std::string> out =
        t.ok() ? t->Render(c.contains("context") ? c["context"] : nlohmann::ordered_json())
               : absl::StatusOr<std::string>(t.status());
    if (out.ok()) {
      r["ok"] = true;
      r["output"] = *out;
    } else {
      r["ok"] = false;
      r["error"] = std::string(out.status().message());
      r["raised"] = retnet::chat::IsRaisedException(out.status());
    }
    results.push_back(std::move(r));
  }
  std::cout << results.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace)
            << "\n";
  return 0;
}
