// tandem-delta: create, inspect, verify and apply delta files (or pipes).
// Every failure prints one line "tandem-delta: <what is wrong>" on stderr and
// exits non-zero (1 for a failed operation, 2 for a malformed command line).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"
#include "engine/delta_receive.h"
#include "engine/delta_send.h"
#include "engine/image.h"
#include "nlohmann/json.hpp"
#include "tools/command_line.h"
#include "tools/fd_stream.h"
#include "tools/open_pool.h"
#include "tools/progress.h"

namespace tools {
namespace {

using blockstore::FormatBytes;
using blockstore::OpenMode;
using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Writes the delta of `volume`@`target` since `base` to `output`.
absl::Status Send(const std::string& pool_path, const std::string& volume,
                  const std::string& target, const std::string& base,
                  const std::string& output, int level, int threads) {
  const std::string ref = absl::StrCat(volume, "@", target);
  absl::StatusOr<std::unique_ptr<blockstore::Pool>> pool =
      OpenPool(pool_path, OpenMode::kReadOnly);
  if (!pool.ok()) return pool.status();
  // A regular file is written under a temporary name and renamed when
  // complete, so a failed create never leaves a partial delta behind.
  // Anything else that exists (a device, a FIFO, /dev/stdout) is written in
  // place: renaming over it would replace the device node itself.
  struct stat st;
  const bool in_place =
      output == "-" || (stat(output.c_str(), &st) == 0 && !S_ISREG(st.st_mode));
  std::string partial = in_place ? output : output + ".partial";
  int fd = 1;
  if (output != "-") {
    fd = in_place ? open(output.c_str(), O_WRONLY | O_CLOEXEC)
                  : open(partial.c_str(),
                         O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
      return blockstore::ErrnoError(
          errno, absl::StrCat(in_place ? "open " : "create ", partial));
    }
  }
  bool done = false;
  absl::Cleanup cleanup = [&] {
    if (fd != 1) {
      close(fd);
      if (!done && !in_place) unlink(partial.c_str());
    }
  };
  WidenPipe(fd);
  FdSink sink(fd, output == "-" ? "standard output" : partial);
  Progress progress("sending");
  engine::SendOptions options;
  options.zstd_level = level;
  options.threads = threads;
  options.progress = [&](uint64_t d, uint64_t t) { progress.Update(d, t); };
  auto start = Clock::now();
  absl::StatusOr<engine::SendStats> stats =
      engine::SendDelta(**pool, volume, base, target, sink, options);
  progress.Clear();
  if (!stats.ok()) return stats.status();
  if (!in_place) {
    if (fsync(fd) != 0) {
      return blockstore::ErrnoError(errno, absl::StrCat("sync ", partial));
    }
    if (rename(partial.c_str(), output.c_str()) != 0) {
      return blockstore::ErrnoError(errno, absl::StrCat("rename to ", output));
    }
  }
  done = true;
  std::fprintf(stderr,
               "delta %s%s%s: %llu records, %llu chunks written, %llu cleared; "
               "%s raw, %s stream; %.2f s\n",
               base.empty() ? "" : (volume + "@" + base + "..").c_str(),
               base.empty() ? "full " : "", ref.c_str(),
               static_cast<unsigned long long>(stats->records),
               static_cast<unsigned long long>(stats->chunks_written),
               static_cast<unsigned long long>(stats->chunks_cleared),
               FormatBytes(stats->record_bytes).c_str(),
               FormatBytes(stats->stream_bytes).c_str(), Since(start));
  return absl::OkStatus();
}

absl::Status Create(const std::string& pool_path, const std::string& ref,
                    const std::string& base, const std::string& output,
                    int level, int threads, bool take_snapshot) {
  size_t at = ref.find('@');
  if (at == std::string::npos || at + 1 == ref.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", ref, "' names no snapshot: write VOLUME@SNAPSHOT"));
  }
  std::string volume = ref.substr(0, at), target = ref.substr(at + 1);
  if (level < 0 || level > 19) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad --level ", level, ": use 0 (store) to 19"));
  }
  if (output == "-" && isatty(1)) {
    return absl::InvalidArgumentError(
        "refusing to write a delta to a terminal: use -o FILE or a pipe");
  }
  if (take_snapshot) {
    // Taken and committed with the pool open read-write, then closed: the
    // send reads it with the shared lock of any create.
    absl::StatusOr<std::unique_ptr<blockstore::Pool>> rw =
        OpenPool(pool_path, OpenMode::kReadWrite);
    if (!rw.ok()) return rw.status();
    if (!base.empty()) {  // a delta that cannot be sent takes no snapshot
      absl::StatusOr<blockstore::SnapshotInfo> b =
          (*rw)->GetSnapshot(volume, base);
      if (!b.ok()) return b.status();
    }
    absl::StatusOr<blockstore::SnapshotInfo> taken =
        (*rw)->CreateSnapshot(volume, target);
    if (!taken.ok()) return taken.status();
  }
  absl::Status s =
      Send(pool_path, volume, target, base, output, level, threads);
  if (s.ok() || !take_snapshot) return s;
  // The snapshot stays: say how to go on.
  return absl::Status(s.code(),
                      absl::StrCat(s.message(), "; snapshot '", ref,
                                   "' was taken: send it with the same command "
                                   "without --snapshot"));
}

std::string TypeName(engine::RecordType t) {
  switch (t) {
    case engine::RecordType::kWrite:
      return "WRITE";
    case engine::RecordType::kZero:
      return "ZERO";
    case engine::RecordType::kUnmap:
      return "UNMAP";
    case engine::RecordType::kResize:
      return "RESIZE";
  }
  return "?";
}

std::string Time(int64_t ns) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixNanos(ns),
                          absl::UTCTimeZone());
}

json HeaderJson(const engine::DeltaHeader& h) {
  json listed = json::array();
  for (const auto& l : h.listed) {
    listed.push_back({{"name", l.name},
                      {"guid", blockstore::GuidToString(l.guid)},
                      {"created", Time(l.create_time_ns)}});
  }
  return {{"version", engine::kDeltaVersion},
          {"features", h.features},
          {"chunk_size_bytes", h.chunk_size},
          {"volume", h.volume_name},
          {"volume_guid", blockstore::GuidToString(h.volume_guid)},
          {"size_bytes", h.size_bytes},
          {"full", h.full()},
          {"base", h.base_name},
          {"base_guid", h.full() ? "" : blockstore::GuidToString(h.base_guid)},
          {"base_size_bytes", h.base_size_bytes},
          {"base_created", h.full() ? "" : Time(h.base_create_time_ns)},
          {"base_root_digest", h.full() ? "" : h.base_digest.ToHex()},
          {"target", h.target_name},
          {"target_guid", blockstore::GuidToString(h.target_guid)},
          {"target_created", Time(h.target_create_time_ns)},
          {"target_created_ns", h.target_create_time_ns},
          {"target_root_digest", h.target_digest.ToHex()},
          {"listed_snapshots", listed}};
}

// inspect and verify: read the whole stream through the checking reader.
absl::Status Read(const std::string& file, bool inspect, bool as_json) {
  absl::StatusOr<std::unique_ptr<InputFile>> input = InputFile::Open(file);
  if (!input.ok()) return input.status();
  FdSource& in = (*input)->source();
  uint64_t total = (*input)->size();
  Progress progress("verifying");
  absl::StatusOr<std::unique_ptr<engine::DeltaReader>> reader =
      engine::DeltaReader::Open(in);
  if (!reader.ok()) return reader.status();
  const engine::DeltaHeader& h = (*reader)->header();
  json records = json::array();
  if (inspect && !as_json) {
    std::printf(
        "delta v%u %s of %s@%s (%s), %s in %s chunks\n", engine::kDeltaVersion,
        h.full() ? "full" : "incremental", h.volume_name.c_str(),
        h.target_name.c_str(), blockstore::GuidToString(h.target_guid).c_str(),
        FormatBytes(h.size_bytes).c_str(), FormatBytes(h.chunk_size).c_str());
    if (!h.full()) {
      std::printf("base      %s@%s (%s), %s, digest %s\n",
                  h.volume_name.c_str(), h.base_name.c_str(),
                  blockstore::GuidToString(h.base_guid).c_str(),
                  FormatBytes(h.base_size_bytes).c_str(),
                  h.base_digest.ToHex().c_str());
    }
    std::printf("target    created %s, digest %s\n",
                Time(h.target_create_time_ns).c_str(),
                h.target_digest.ToHex().c_str());
    for (const auto& l : h.listed) {
      std::printf("listed    %s (%s) created %s\n", l.name.c_str(),
                  blockstore::GuidToString(l.guid).c_str(),
                  Time(l.create_time_ns).c_str());
    }
  }
  while (true) {
    absl::StatusOr<std::optional<engine::DeltaReader::Record>> r =
        (*reader)->Next();
    if (!r.ok()) return r.status();
    if (!r->has_value()) break;
    progress.Update(in.bytes(), total);
    if (!inspect) continue;
    const engine::RecordHeader& rh = (**r).header;
    if (as_json) {
      json rec = {{"segment", (**r).segment}, {"type", TypeName(rh.type)}};
      if (rh.type == engine::RecordType::kResize) {
        rec["size_bytes"] = rh.first_chunk;
      } else {
        rec["first_chunk"] = rh.first_chunk;
        rec["chunks"] = rh.count_chunks;
      }
      records.push_back(rec);
    } else if (rh.type == engine::RecordType::kResize) {
      std::printf("segment %-6llu RESIZE  to %llu bytes\n",
                  static_cast<unsigned long long>((**r).segment),
                  static_cast<unsigned long long>(rh.first_chunk));
    } else {
      std::printf("segment %-6llu %-7s chunks %llu+%u\n",
                  static_cast<unsigned long long>((**r).segment),
                  TypeName(rh.type).c_str(),
                  static_cast<unsigned long long>(rh.first_chunk),
                  rh.count_chunks);
    }
  }
  progress.Clear();
  const engine::DeltaEnd& e = (*reader)->end();
  json end = {{"segments", e.segment_count},
              {"records", e.record_count},
              {"chunks_written", e.chunks_written},
              {"chunks_cleared", e.chunks_cleared},
              {"record_bytes", e.record_bytes},
              {"stored_bytes", e.stored_bytes},
              {"stream_bytes", (*reader)->stream_offset()}};
  if (inspect && as_json) {
    std::cout << json{{"header", HeaderJson(h)},
                      {"records", records},
                      {"end", end}}
                     .dump(2)
              << "\n";
  } else if (inspect) {
    std::printf(
        "end       %llu segments, %llu records, %llu chunks written, "
        "%llu cleared, %s raw, %s stream\n",
        static_cast<unsigned long long>(e.segment_count),
        static_cast<unsigned long long>(e.record_count),
        static_cast<unsigned long long>(e.chunks_written),
        static_cast<unsigned long long>(e.chunks_cleared),
        FormatBytes(e.record_bytes).c_str(),
        FormatBytes((*reader)->stream_offset()).c_str());
  } else {
    std::printf("%s: intact (%s of %s@%s, %llu records, %s)\n", file.c_str(),
                h.full() ? "full delta" : "incremental delta",
                h.volume_name.c_str(), h.target_name.c_str(),
                static_cast<unsigned long long>(e.record_count),
                FormatBytes((*reader)->stream_offset()).c_str());
  }
  return absl::OkStatus();
}

// The record beside an image: next to a regular file (or where --state
// says); a block device has none unless --state names one.
std::string ImageRecordPath(const std::string& image,
                            const std::string& state) {
  if (!state.empty()) return state;
  struct stat st;
  if (stat(image.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) return "";
  return image + ".tandem-state";
}

absl::Status ApplyToImage(const std::string& file,
                          const std::string& image_path,
                          const std::string& state, bool verify,
                          bool verify_base,
                          const std::string& checkpoint_text) {
  absl::StatusOr<uint64_t> checkpoint =
      blockstore::ParseSize(checkpoint_text, "--checkpoint");
  if (!checkpoint.ok()) return checkpoint.status();
  absl::StatusOr<std::unique_ptr<InputFile>> input = InputFile::Open(file);
  if (!input.ok()) return input.status();
  FdSource& in = (*input)->source();
  const uint64_t total = (*input)->size();
  absl::StatusOr<std::unique_ptr<engine::DeltaReader>> reader =
      engine::DeltaReader::Open(in);
  if (!reader.ok()) return reader.status();
  const engine::DeltaHeader& h = (*reader)->header();
  struct stat st;
  const bool exists = stat(image_path.c_str(), &st) == 0;
  if (!exists && !h.full()) {
    return absl::NotFoundError(absl::StrCat(
        image_path,
        " does not exist; an incremental delta needs the image "
        "of its base '",
        h.volume_name, "@", h.base_name, "': apply the full delta first"));
  }
  const std::string record_path = ImageRecordPath(image_path, state);
  // A new file starts at the volume's size (at least one byte: a file of
  // none would be opened, not created).
  absl::StatusOr<std::unique_ptr<engine::RawImage>> image = engine::OpenImage(
      image_path, exists ? 0 : std::max<uint64_t>(1, h.size_bytes));
  if (!image.ok()) return image.status();
  Progress progress("applying");
  engine::ImageApplyOptions options;
  options.record_path = record_path;
  options.verify = verify;
  options.verify_base = verify_base;
  options.checkpoint_bytes = *checkpoint;
  options.progress = [&](uint64_t, uint64_t) {
    progress.Update(in.bytes(), total);
  };
  auto start = Clock::now();
  absl::StatusOr<engine::ImageApplyStats> stats =
      engine::ApplyDeltaToImage(**reader, **image, options);
  progress.Clear();
  if (!stats.ok()) return stats.status();
  const std::string snapshot = absl::StrCat(h.volume_name, "@", h.target_name);
  if (stats->already_held) {
    std::fprintf(stderr, "%s already holds %s: nothing written; %.2f s\n",
                 image_path.c_str(), snapshot.c_str(), Since(start));
    return absl::OkStatus();
  }
  std::fprintf(stderr,
               "applied %s to %s%s: %llu records, %llu chunks written, %llu "
               "cleared; %s stream, %s of the image read; %.2f s\n",
               snapshot.c_str(), image_path.c_str(),
               stats->resumed ? " (resumed)" : "",
               static_cast<unsigned long long>(stats->apply.records),
               static_cast<unsigned long long>(stats->apply.chunks_written),
               static_cast<unsigned long long>(stats->apply.chunks_cleared),
               FormatBytes(stats->apply.stream_bytes).c_str(),
               FormatBytes(stats->bytes_read).c_str(), Since(start));
  return absl::OkStatus();
}

absl::Status ApplyToPool(const std::string& file, const std::string& pool_path,
                         const std::string& volume, bool rollback) {
  absl::StatusOr<std::unique_ptr<InputFile>> input = InputFile::Open(file);
  if (!input.ok()) return input.status();
  FdSource& in = (*input)->source();
  const uint64_t total = (*input)->size();
  absl::StatusOr<std::unique_ptr<blockstore::Pool>> pool =
      OpenPool(pool_path, OpenMode::kReadWrite);
  if (!pool.ok()) return pool.status();
  Progress progress("applying");
  engine::ApplyOptions options;
  options.rollback = rollback;
  options.progress = [&](uint64_t, uint64_t) {
    progress.Update(in.bytes(), total);
  };
  auto start = Clock::now();
  absl::StatusOr<engine::ApplyStats> stats =
      engine::ApplyDelta(**pool, volume, in, options);
  progress.Clear();
  if (!stats.ok()) return stats.status();
  std::fprintf(
      stderr,
      "applied %s@%s: %llu records, %llu chunks written, %llu cleared; "
      "%s stream; %.2f s\n",
      volume.c_str(), stats->snapshot.name.c_str(),
      static_cast<unsigned long long>(stats->records),
      static_cast<unsigned long long>(stats->chunks_written),
      static_cast<unsigned long long>(stats->chunks_cleared),
      FormatBytes(stats->stream_bytes).c_str(), Since(start));
  return absl::OkStatus();
}

int Run(int argc, char** argv) {
  CLI::App app{"tandem-delta: create, inspect, verify and apply delta files"};
  app.require_subcommand(1);
  std::optional<std::string> failure;
  auto act = [&](absl::Status s) {
    if (!s.ok()) failure = std::string(s.message());
  };
  std::string pool_path, ref, base, output = "-", file, volume, image, state,
                                    checkpoint = "64M";
  int level = 1, threads = 0;
  bool as_json = false, rollback = false, no_verify_base = false,
       verify_image = false, take_snapshot = false;

  CLI::App* create =
      app.add_subcommand("create", "write the delta of a snapshot");
  create->add_option("--pool", pool_path, "pool file or device")
      ->envname("TANDEM_POOL");
  create->add_option("VOLUME@TARGET", ref)->required();
  create->add_option("--base", base, "base snapshot (default: a full delta)");
  create->add_option("-o,--output", output,
                     "delta file, or - for stdout (default)");
  create->add_option("--level", level, "zstd level, 0 to store (default 1)");
  create->add_option("--threads", threads,
                     "compression threads (default: cores)");
  create->add_flag("--snapshot", take_snapshot,
                   "take snapshot TARGET of the volume now, then send it");
  create->callback([&] {
    act(Create(pool_path, ref, base, output, level, threads, take_snapshot));
  });

  CLI::App* inspect =
      app.add_subcommand("inspect", "print the header and every record");
  inspect->add_option("FILE", file, "delta file, or - for stdin")->required();
  inspect->add_flag("--json", as_json);
  inspect->callback([&] { act(Read(file, true, as_json)); });

  CLI::App* verify = app.add_subcommand(
      "verify", "check a delta completely (exit 0 if intact)");
  verify->add_option("FILE", file)->required();
  verify->callback([&] { act(Read(file, false, false)); });

  CLI::App* apply =
      app.add_subcommand("apply", "apply to a pool volume or a raw image");
  apply->add_option("FILE", file, "delta file, or - for stdin")->required();
  apply->add_option("--pool", pool_path)->envname("TANDEM_POOL");
  apply->add_option("VOLUME", volume, "destination volume in --pool");
  apply->add_option("--image", image, "raw image file or block device instead");
  apply->add_flag("--rollback", rollback,
                  "roll the volume back to the delta's base first if needed");
  apply->add_option("--state", state,
                    "the image's record (default: IMAGE.tandem-state beside "
                    "a file; none for a device)");
  apply->add_flag("--verify", verify_image,
                  "read the whole image to check the base before and the "
                  "target after, whatever its record says");
  apply->add_option("--checkpoint", checkpoint,
                    "an image's resume point every SIZE of stream "
                    "(default 64M, 0: none)");
  apply->add_flag("--no-verify-base", no_verify_base,
                  "without a record, trust that the image holds the base");
  apply->callback([&] {
    if (image.empty() == volume.empty()) {
      act(absl::InvalidArgumentError(
          "apply needs either --pool PATH VOLUME or --image PATH"));
    } else if (!image.empty()) {
      act(ApplyToImage(file, image, state, verify_image, !no_verify_base,
                       checkpoint));
    } else {
      act(ApplyToPool(file, pool_path, volume, rollback));
    }
  });

  if (std::optional<int> rc =
          ParseCommandLine(app, argc, argv, "tandem-delta")) {
    return *rc;
  }
  if (failure.has_value()) {
    std::fprintf(stderr, "tandem-delta: %s\n", failure->c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace tools

int main(int argc, char** argv) { return tools::Run(argc, argv); }
