// Relationship results as JSON, one shape whether the engine ran in this
// process or in a daemon (which sends exactly these objects over its
// control API), and their text for people.
#ifndef TANDEM_TOOLS_RELATIONSHIP_JSON_H_
#define TANDEM_TOOLS_RELATIONSHIP_JSON_H_

#include <string>

#include "absl/status/statusor.h"
#include "engine/relationship.h"
#include "nlohmann/json.hpp"

namespace tools {

using ordered_json = nlohmann::ordered_json;

// The fields of `tandem status --json` (and of GET /status).
ordered_json ReportJson(const engine::RelationshipReport& r);
ordered_json RecordJson(const engine::RelationshipRecord& r);
ordered_json StatsJson(const engine::TransferStats& s);
ordered_json PreviewJson(const engine::LossPreview& p);
ordered_json ReleaseJson(const engine::ReleaseReport& r);

// "Mirrored, Idle" and the like, from a report or record object.
std::string StateLine(const ordered_json& record);
// The multi-line status block of one relationship (a ReportJson object).
void PrintReport(const ordered_json& report);
// The line an operation prints when it is done: `result` is
// {"operation", "relationship": ReportJson, "stats": StatsJson} (and
// "release": ReleaseJson for release).
void PrintResult(const ordered_json& result);

// "10m", "hourly", "daily", or a duration such as 90s, 15m, 2h, 1d.
absl::StatusOr<int64_t> ParseSchedule(const std::string& text);
std::string FormatSchedule(int64_t seconds);
// "8M", "500K", "1G" (bytes a second); "0" or "none": unlimited.
absl::StatusOr<uint64_t> ParseRate(const std::string& text);

}  // namespace tools

#endif  // TANDEM_TOOLS_RELATIONSHIP_JSON_H_
