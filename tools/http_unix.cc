#include "tools/http_unix.h"

#include "absl/strings/str_cat.h"

namespace tools {

int HttpStatus(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kAborted:
      return 409;
    case absl::StatusCode::kCancelled:
      return 428;  // a confirmation is required (or was refused)
    case absl::StatusCode::kResourceExhausted:
      return 507;
    case absl::StatusCode::kUnimplemented:
      return 501;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
      return 503;
    default:
      return 500;
  }
}

nlohmann::ordered_json ErrorJson(const absl::Status& s) {
  return {{"error", std::string(s.message())},
          {"code", absl::StatusCodeToString(s.code())},
          {"status", static_cast<int>(s.code())}};
}

absl::Status StatusFromResponse(int http, const std::string& body) {
  if (http >= 200 && http < 300) return absl::OkStatus();
  nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_object() && j.contains("error") && j["error"].is_string()) {
    int code = j.value("status", 2);
    if (code <= 0 || code > 16) code = 2;
    return absl::Status(static_cast<absl::StatusCode>(code),
                        j["error"].get<std::string>());
  }
  return absl::UnknownError(absl::StrCat("the daemon answered HTTP ", http,
                                         ": ", body.substr(0, 200)));
}

}  // namespace tools
