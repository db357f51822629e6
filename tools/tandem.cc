// tandem: the operator's command line for pools, volumes and snapshots.
// Every failure prints one line "tandem: <what is wrong>" on stderr and exits
// non-zero (1 for a failed operation, 2 for a malformed command line); a
// failed command commits nothing.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "blockstore/format.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"
#include "engine/relationship.h"
#include "nlohmann/json.hpp"
#include "tools/command_line.h"
#include "tools/demo.h"
#include "tools/open_pool.h"
#include "tools/relationship_cli.h"

namespace tools {
namespace {

using blockstore::OpenMode;
using blockstore::Pool;
using json = nlohmann::ordered_json;

constexpr size_t kStreamPiece = 4 << 20;

// A failed command: its one-line message and exit code.
struct Failure {
  std::string message;
  int code = 1;
};

std::string Time(int64_t ns) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixNanos(ns),
                          absl::UTCTimeZone());
}

// "vol" or "vol@snap".
struct Ref {
  std::string volume;
  std::string snapshot;
};
Ref ParseRef(const std::string& text) {
  Ref r;
  size_t at = text.find('@');
  r.volume = text.substr(0, at);
  if (at != std::string::npos) r.snapshot = text.substr(at + 1);
  return r;
}

absl::Status RequireSnapshot(const Ref& r, const std::string& text) {
  if (r.snapshot.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "' names no snapshot: write VOLUME@SNAPSHOT"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Size(const std::string& text, const char* what) {
  return blockstore::ParseSize(text, what);
}

json VolumeJson(const blockstore::VolumeInfo& v) {
  return {{"name", v.name},
          {"guid", blockstore::GuidToString(v.guid)},
          {"size_bytes", v.size_bytes},
          {"snapshots", v.snapshot_count},
          {"created", Time(v.create_time_ns)}};
}

json SnapshotJson(const blockstore::SnapshotInfo& s) {
  return {{"volume", s.volume},
          {"name", s.name},
          {"guid", blockstore::GuidToString(s.guid)},
          {"size_bytes", s.size_bytes},
          {"created", Time(s.create_time_ns)},
          {"created_ns", s.create_time_ns},
          {"generation", s.generation},
          {"root_digest", s.root_digest.ToHex()}};
}

// FailedPrecondition if `volume` is in a replication relationship: `what`
// would break it.
absl::Status InRelationship(Pool& pool, const std::string& volume,
                            const std::string& what) {
  if (engine::Replication::InRelationship(pool, volume)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "volume '", volume, "' is in a replication relationship; ", what,
        " would break it: run `tandem relationship release` first"));
  }
  return absl::OkStatus();
}

// --- pool -----------------------------------------------------------------

absl::Status PoolCreate(const std::string& path, const std::string& size_text,
                        const std::string& chunk_text, bool force) {
  absl::StatusOr<uint64_t> chunk = Size(chunk_text, "chunk size");
  if (!chunk.ok()) return chunk.status();
  if (*chunk > UINT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad chunk size ", chunk_text,
                     ": must be a power of two from 4K to 1M"));
  }
  struct stat st {};
  bool exists = stat(path.c_str(), &st) == 0;
  bool is_device = exists && S_ISBLK(st.st_mode);
  uint64_t size = 0;
  if (!size_text.empty()) {
    absl::StatusOr<uint64_t> s = Size(size_text, "pool size");
    if (!s.ok()) return s.status();
    size = *s;
    if (is_device) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, " is a block device: its size is the pool size; drop --size"));
    }
  } else if (!exists) {
    size = uint64_t{8} << 30;  // a sparse file costs only what is written
  }
  if (exists && !force && (is_device || st.st_size > 0)) {
    // Refuse to format over something that holds data.
    blockstore::FileIoOptions probe;
    probe.mode = OpenMode::kReadOnly;
    absl::StatusOr<std::unique_ptr<blockstore::Io>> io =
        blockstore::OpenFileIo(path, probe);
    if (!io.ok()) return io.status();
    absl::StatusOr<std::unique_ptr<Pool>> old =
        Pool::Open(std::move(*io), OpenMode::kReadOnly);
    if (old.ok() ||
        !absl::StrContains(old.status().message(), "not a tandem pool")) {
      return absl::AlreadyExistsError(absl::StrCat(
          path, " already holds a tandem pool; pass --force to destroy it"));
    }
    if (!is_device) {
      return absl::AlreadyExistsError(absl::StrCat(
          path, " exists and is not empty; pass --force to overwrite it"));
    }
  }
  blockstore::FileIoOptions options;
  options.create_size_bytes = size;
  absl::StatusOr<std::unique_ptr<blockstore::Io>> io =
      blockstore::OpenFileIo(path, options);
  if (!io.ok()) return io.status();
  blockstore::CreatePoolOptions create;
  create.chunk_size_bytes = static_cast<uint32_t>(*chunk);
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      Pool::Create(std::move(*io), create);
  if (!pool.ok()) return pool.status();
  blockstore::PoolInfo info = (*pool)->Info();
  std::printf("created pool %s: %s of data in %s chunks (%s)\n", path.c_str(),
              blockstore::FormatBytes(info.capacity_bytes).c_str(),
              blockstore::FormatBytes(info.chunk_size_bytes).c_str(),
              info.io.c_str());
  return absl::OkStatus();
}

absl::Status PoolInfo(const std::string& path, bool as_json) {
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      OpenPool(path, OpenMode::kReadOnly);
  if (!pool.ok()) return pool.status();
  blockstore::PoolInfo i = (*pool)->Info();
  if (as_json) {
    json j = {{"path", i.device},
              {"io", i.io},
              {"guid", blockstore::GuidToString(i.pool_guid)},
              {"chunk_size_bytes", i.chunk_size_bytes},
              {"capacity_bytes", i.capacity_bytes},
              {"used_bytes", i.used_bytes},
              {"free_bytes", i.free_bytes},
              {"metadata_capacity_bytes", i.metadata_capacity_bytes},
              {"metadata_used_bytes", i.metadata_used_bytes},
              {"generation", i.generation},
              {"volumes", i.volume_count},
              {"snapshots", i.snapshot_count}};
    std::cout << j.dump(2) << "\n";
    return absl::OkStatus();
  }
  using blockstore::FormatBytes;
  std::printf("pool        %s\n", i.device.c_str());
  std::printf("guid        %s\n",
              blockstore::GuidToString(i.pool_guid).c_str());
  std::printf("io          %s\n", i.io.c_str());
  std::printf("chunk size  %s\n", FormatBytes(i.chunk_size_bytes).c_str());
  std::printf("capacity    %s\n", FormatBytes(i.capacity_bytes).c_str());
  std::printf("used        %s (%llu bytes)\n",
              FormatBytes(i.used_bytes).c_str(),
              static_cast<unsigned long long>(i.used_bytes));
  std::printf("free        %s\n", FormatBytes(i.free_bytes).c_str());
  std::printf("metadata    %s used of %s\n",
              FormatBytes(i.metadata_used_bytes).c_str(),
              FormatBytes(i.metadata_capacity_bytes).c_str());
  std::printf("volumes     %llu\n",
              static_cast<unsigned long long>(i.volume_count));
  std::printf("snapshots   %llu\n",
              static_cast<unsigned long long>(i.snapshot_count));
  std::printf("generation  %llu\n",
              static_cast<unsigned long long>(i.generation));
  return absl::OkStatus();
}

std::optional<Failure> PoolCheck(const std::string& path, bool data) {
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      OpenPool(path, OpenMode::kReadOnly);
  if (!pool.ok()) return Failure{std::string(pool.status().message())};
  absl::StatusOr<Pool::CheckReport> report = (*pool)->Check(data);
  if (!report.ok()) return Failure{std::string(report.status().message())};
  for (const std::string& n : report->notes) {
    std::printf("note: %s\n", n.c_str());
  }
  for (const std::string& p : report->problems) {
    std::printf("problem: %s\n", p.c_str());
  }
  std::printf(
      "checked %llu metadata nodes%s: %s\n",
      static_cast<unsigned long long>(report->nodes_checked),
      data ? absl::StrCat(" and ", report->chunks_checked, " data chunks")
                 .c_str()
           : "",
      report->problems.empty()
          ? "consistent"
          : absl::StrCat(report->problems.size(), " problem(s)").c_str());
  if (!report->problems.empty()) {
    return Failure{absl::StrCat("pool ", path, " is inconsistent: ",
                                report->problems.size(), " problem(s)")};
  }
  return std::nullopt;
}

// --- volumes and I/O -------------------------------------------------------

absl::Status VolumeList(const std::string& path, bool as_json) {
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      OpenPool(path, OpenMode::kReadOnly);
  if (!pool.ok()) return pool.status();
  absl::StatusOr<std::vector<blockstore::VolumeInfo>> vols =
      (*pool)->ListVolumes();
  if (!vols.ok()) return vols.status();
  if (as_json) {
    json j = json::array();
    for (const auto& v : *vols) j.push_back(VolumeJson(v));
    std::cout << j.dump(2) << "\n";
    return absl::OkStatus();
  }
  std::printf("%-24s %14s %9s  %s\n", "NAME", "SIZE", "SNAPSHOTS", "CREATED");
  for (const auto& v : *vols) {
    std::printf("%-24s %14s %9llu  %s\n", v.name.c_str(),
                blockstore::FormatBytes(v.size_bytes).c_str(),
                static_cast<unsigned long long>(v.snapshot_count),
                Time(v.create_time_ns).c_str());
  }
  return absl::OkStatus();
}

absl::Status WriteCommand(const std::string& path, const std::string& volume,
                          const std::string& offset_text,
                          const std::string& file) {
  absl::StatusOr<uint64_t> offset = Size(offset_text, "offset");
  if (!offset.ok()) return offset.status();
  int fd = 0;
  if (!file.empty() && file != "-") {
    fd = open(file.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
      return blockstore::ErrnoError(errno, absl::StrCat("open ", file));
  }
  absl::Cleanup close_fd = [fd] {
    if (fd != 0) close(fd);
  };
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      OpenPool(path, OpenMode::kReadWrite);
  if (!pool.ok()) return pool.status();
  absl::StatusOr<blockstore::VolumeInfo> vol = (*pool)->GetVolume(volume);
  if (!vol.ok()) return vol.status();
  // Refused even with nothing to write (the pool's message says why).
  if (vol->read_only) return (*pool)->Write(volume, 0, {});
  struct stat st {};
  if (fd != 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
      (*offset > vol->size_bytes ||
       static_cast<uint64_t>(st.st_size) > vol->size_bytes - *offset)) {
    return absl::OutOfRangeError(
        absl::StrCat("writing ", st.st_size, " bytes of ", file, " at offset ",
                     *offset, " would pass the end of volume '", volume, "' (",
                     vol->size_bytes, " bytes)"));
  }
  // Aligned, so whole chunks go to disk without a copy.
  blockstore::AlignedBuffer aligned(kStreamPiece);
  std::span<std::byte> buf = aligned.span();
  uint64_t at = *offset;
  while (true) {
    size_t got = 0;
    while (got < buf.size()) {
      ssize_t n = read(fd, buf.data() + got, buf.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        return blockstore::ErrnoError(
            errno, absl::StrCat("read ", fd == 0 ? "standard input" : file));
      }
      if (n == 0) break;
      got += n;
    }
    if (got == 0) break;
    // On error nothing is committed: the pool closes without a flush.
    if (absl::Status s = (*pool)->Write(volume, at, buf.first(got)); !s.ok()) {
      return s;
    }
    at += got;
    if (got < buf.size()) break;
  }
  return (*pool)->Flush();
}

absl::Status ReadCommand(const std::string& path, const std::string& ref_text,
                         const std::string& offset_text,
                         const std::string& length_text) {
  Ref ref = ParseRef(ref_text);
  absl::StatusOr<uint64_t> offset = Size(offset_text, "offset");
  if (!offset.ok()) return offset.status();
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      OpenPool(path, OpenMode::kReadOnly);
  if (!pool.ok()) return pool.status();
  uint64_t size = 0;
  if (ref.snapshot.empty()) {
    absl::StatusOr<blockstore::VolumeInfo> v = (*pool)->GetVolume(ref.volume);
    if (!v.ok()) return v.status();
    size = v->size_bytes;
  } else {
    absl::StatusOr<blockstore::SnapshotInfo> s =
        (*pool)->GetSnapshot(ref.volume, ref.snapshot);
    if (!s.ok()) return s.status();
    size = s->size_bytes;
  }
  uint64_t length = *offset <= size ? size - *offset : 0;
  if (!length_text.empty()) {
    absl::StatusOr<uint64_t> l = Size(length_text, "length");
    if (!l.ok()) return l.status();
    length = *l;
  }
  if (*offset > size) {
    return absl::OutOfRangeError(absl::StrCat("offset ", *offset,
                                              " is past the end of '", ref_text,
                                              "' (", size, " bytes)"));
  }
  if (length > size - *offset) {
    return absl::OutOfRangeError(absl::StrCat(
        "read of ", length, " bytes at offset ", *offset,
        " is past the end of '", ref_text, "' (", size, " bytes)"));
  }
  blockstore::AlignedBuffer aligned(kStreamPiece);
  std::span<std::byte> buf = aligned.span();
  for (uint64_t done = 0; done < length;) {
    size_t n = std::min<uint64_t>(buf.size(), length - done);
    if (absl::Status s = (*pool)->Read(ref.volume, ref.snapshot, *offset + done,
                                       buf.first(n));
        !s.ok()) {
      return s;
    }
    for (size_t put = 0; put < n;) {
      ssize_t w = write(1, buf.data() + put, n - put);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return blockstore::ErrnoError(errno, "write standard output");
      put += w;
    }
    done += n;
  }
  return absl::OkStatus();
}

// --- snapshots ---------------------------------------------------------------

absl::Status SnapshotList(const std::string& path, const std::string& volume,
                          bool as_json) {
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      OpenPool(path, OpenMode::kReadOnly);
  if (!pool.ok()) return pool.status();
  absl::StatusOr<std::vector<blockstore::SnapshotInfo>> snaps =
      (*pool)->ListSnapshots(ParseRef(volume).volume);
  if (!snaps.ok()) return snaps.status();
  if (as_json) {
    json j = json::array();
    for (const auto& s : *snaps) j.push_back(SnapshotJson(s));
    std::cout << j.dump(2) << "\n";
    return absl::OkStatus();
  }
  std::printf("%-24s %-36s %-20s %12s  %s\n", "NAME", "GUID", "CREATED", "SIZE",
              "ROOT DIGEST");
  for (const auto& s : *snaps) {
    std::printf("%-24s %-36s %-20s %12s  %s\n", s.name.c_str(),
                blockstore::GuidToString(s.guid).c_str(),
                Time(s.create_time_ns).c_str(),
                blockstore::FormatBytes(s.size_bytes).c_str(),
                s.root_digest.ToHex().c_str());
  }
  return absl::OkStatus();
}

int Run(int argc, char** argv) {
  CLI::App app{"tandem: snapshot-delta replication for block volumes"};
  app.require_subcommand(1);
  std::optional<Failure> failure;
  auto act = [&](absl::Status s) {
    if (!s.ok()) failure = Failure{std::string(s.message())};
  };

  std::string pool_path;
  auto add_pool = [&](CLI::App* cmd) {
    cmd->add_option("--pool", pool_path, "pool file or block device")
        ->envname("TANDEM_POOL");
  };
  bool as_json = false;

  // pool (its path is positional, apart from --pool of the others)
  std::string pool_file;
  CLI::App* pool =
      app.add_subcommand("pool", "create, inspect and check pools");
  pool->require_subcommand(1);
  std::string size_text, chunk_text = "64K";
  bool force = false, data = false;
  CLI::App* pool_create = pool->add_subcommand("create", "create a pool");
  pool_create->add_option("PATH", pool_file, "file or block device")
      ->required();
  pool_create->add_option("--size", size_text,
                          "size of a new pool file (default 8G, sparse)");
  pool_create->add_option("--chunk-size", chunk_text,
                          "copy-on-write unit: power of two, 4K to 1M");
  pool_create->add_flag("--force", force, "overwrite an existing pool or file");
  pool_create->callback(
      [&] { act(PoolCreate(pool_file, size_text, chunk_text, force)); });
  CLI::App* pool_info = pool->add_subcommand("info", "capacity and usage");
  pool_info->add_option("PATH", pool_file)->required();
  pool_info->add_flag("--json", as_json);
  pool_info->callback([&] { act(PoolInfo(pool_file, as_json)); });
  CLI::App* pool_check = pool->add_subcommand(
      "check", "verify all metadata (exit 0 if consistent)");
  pool_check->add_option("PATH", pool_file)->required();
  pool_check->add_flag("--data", data, "also re-hash every data chunk");
  pool_check->callback([&] { failure = PoolCheck(pool_file, data); });

  // volume
  CLI::App* volume =
      app.add_subcommand("volume", "create, list, resize, delete");
  volume->require_subcommand(1);
  std::string name;
  bool recursive = false;
  CLI::App* vol_create = volume->add_subcommand("create", "create a volume");
  add_pool(vol_create);
  vol_create->add_option("NAME", name)->required();
  vol_create->add_option("--size", size_text, "size (K/M/G/T suffixes)")
      ->required();
  vol_create->callback([&] {
    absl::StatusOr<uint64_t> size = Size(size_text, "volume size");
    if (!size.ok()) return act(size.status());
    absl::StatusOr<std::unique_ptr<Pool>> p =
        OpenPool(pool_path, OpenMode::kReadWrite);
    if (!p.ok()) return act(p.status());
    act((*p)->CreateVolume(name, *size));
  });
  CLI::App* vol_list = volume->add_subcommand("list", "list volumes");
  add_pool(vol_list);
  vol_list->add_flag("--json", as_json);
  vol_list->callback([&] { act(VolumeList(pool_path, as_json)); });
  CLI::App* vol_resize = volume->add_subcommand("resize", "grow or shrink");
  add_pool(vol_resize);
  vol_resize->add_option("NAME", name)->required();
  vol_resize->add_option("--size", size_text)->required();
  vol_resize->callback([&] {
    absl::StatusOr<uint64_t> size = Size(size_text, "volume size");
    if (!size.ok()) return act(size.status());
    absl::StatusOr<std::unique_ptr<Pool>> p =
        OpenPool(pool_path, OpenMode::kReadWrite);
    if (!p.ok()) return act(p.status());
    act((*p)->ResizeVolume(name, *size));
  });
  CLI::App* vol_delete = volume->add_subcommand("delete", "delete a volume");
  add_pool(vol_delete);
  vol_delete->add_option("NAME", name)->required();
  vol_delete->add_flag("--recursive,-r", recursive, "delete its snapshots too");
  vol_delete->callback([&] {
    absl::StatusOr<std::unique_ptr<Pool>> p =
        OpenPool(pool_path, OpenMode::kReadWrite);
    if (!p.ok()) return act(p.status());
    if (absl::Status s = InRelationship(**p, name, "deleting it"); !s.ok()) {
      return act(s);
    }
    act((*p)->DeleteVolume(name, recursive));
  });

  // I/O
  std::string offset_text = "0", length_text, file;
  CLI::App* write_cmd =
      app.add_subcommand("write", "write FILE (or stdin) into a volume");
  add_pool(write_cmd);
  write_cmd->add_option("VOLUME", name)->required();
  write_cmd->add_option("FILE", file, "input file, or - for stdin (default)");
  write_cmd->add_option("--offset", offset_text, "byte offset (default 0)");
  write_cmd->callback(
      [&] { act(WriteCommand(pool_path, name, offset_text, file)); });
  CLI::App* read_cmd =
      app.add_subcommand("read", "read a volume or snapshot to stdout");
  add_pool(read_cmd);
  read_cmd->add_option("VOLUME[@SNAPSHOT]", name)->required();
  read_cmd->add_option("--offset", offset_text);
  read_cmd->add_option("--length", length_text, "default: to the end");
  read_cmd->callback(
      [&] { act(ReadCommand(pool_path, name, offset_text, length_text)); });
  CLI::App* trim_cmd = app.add_subcommand("trim", "discard a byte range");
  add_pool(trim_cmd);
  trim_cmd->add_option("VOLUME", name)->required();
  trim_cmd->add_option("--offset", offset_text)->required();
  trim_cmd->add_option("--length", length_text)->required();
  trim_cmd->callback([&] {
    absl::StatusOr<uint64_t> off = Size(offset_text, "offset");
    if (!off.ok()) return act(off.status());
    absl::StatusOr<uint64_t> len = Size(length_text, "length");
    if (!len.ok()) return act(len.status());
    absl::StatusOr<std::unique_ptr<Pool>> p =
        OpenPool(pool_path, OpenMode::kReadWrite);
    if (!p.ok()) return act(p.status());
    absl::Status s = (*p)->Trim(name, *off, *len);
    if (s.ok()) s = (*p)->Flush();
    act(s);
  });

  // snapshots
  CLI::App* snap = app.add_subcommand("snapshot", "create, list, delete");
  snap->require_subcommand(1);
  CLI::App* snap_create = snap->add_subcommand("create", "VOLUME@SNAPSHOT");
  add_pool(snap_create);
  snap_create->add_option("VOLUME@SNAPSHOT", name)->required();
  snap_create->add_flag("--json", as_json);
  snap_create->callback([&] {
    Ref ref = ParseRef(name);
    if (absl::Status s = RequireSnapshot(ref, name); !s.ok()) return act(s);
    absl::StatusOr<std::unique_ptr<Pool>> p =
        OpenPool(pool_path, OpenMode::kReadWrite);
    if (!p.ok()) return act(p.status());
    absl::StatusOr<blockstore::SnapshotInfo> info =
        (*p)->CreateSnapshot(ref.volume, ref.snapshot);
    if (!info.ok()) return act(info.status());
    if (as_json) {
      std::cout << SnapshotJson(*info).dump(2) << "\n";
    } else {
      std::printf("%s@%s %s %s\n", ref.volume.c_str(), ref.snapshot.c_str(),
                  blockstore::GuidToString(info->guid).c_str(),
                  info->root_digest.ToHex().c_str());
    }
  });
  CLI::App* snap_list = snap->add_subcommand("list", "snapshots of VOLUME");
  add_pool(snap_list);
  snap_list->add_option("VOLUME", name)->required();
  snap_list->add_flag("--json", as_json);
  snap_list->callback([&] { act(SnapshotList(pool_path, name, as_json)); });
  CLI::App* snap_delete = snap->add_subcommand("delete", "VOLUME@SNAPSHOT");
  add_pool(snap_delete);
  snap_delete->add_option("VOLUME@SNAPSHOT", name)->required();
  snap_delete->callback([&] {
    Ref ref = ParseRef(name);
    if (absl::Status s = RequireSnapshot(ref, name); !s.ok()) return act(s);
    absl::StatusOr<std::unique_ptr<Pool>> p =
        OpenPool(pool_path, OpenMode::kReadWrite);
    if (!p.ok()) return act(p.status());
    absl::StatusOr<blockstore::SnapshotInfo> info =
        (*p)->GetSnapshot(ref.volume, ref.snapshot);
    if (info.ok() && engine::Replication::IsReplicationSnapshot(*info)) {
      if (absl::Status s = InRelationship(**p, ref.volume,
                                          "deleting its replication snapshots");
          !s.ok()) {
        return act(s);
      }
    }
    act((*p)->DeleteSnapshot(ref.volume, ref.snapshot));
  });

  CLI::App* rollback =
      app.add_subcommand("rollback", "make a volume its snapshot again");
  add_pool(rollback);
  rollback->add_option("VOLUME@SNAPSHOT", name)->required();
  rollback->callback([&] {
    Ref ref = ParseRef(name);
    if (absl::Status s = RequireSnapshot(ref, name); !s.ok()) return act(s);
    absl::StatusOr<std::unique_ptr<Pool>> p =
        OpenPool(pool_path, OpenMode::kReadWrite);
    if (!p.ok()) return act(p.status());
    act((*p)->Rollback(ref.volume, ref.snapshot));
  });

  CLI::App* digest = app.add_subcommand("digest", "root digest (hex)");
  add_pool(digest);
  digest->add_option("VOLUME[@SNAPSHOT]", name)->required();
  digest->callback([&] {
    Ref ref = ParseRef(name);
    absl::StatusOr<std::unique_ptr<Pool>> p =
        OpenPool(pool_path, OpenMode::kReadOnly);
    if (!p.ok()) return act(p.status());
    absl::StatusOr<blockstore::Digest> d =
        (*p)->RootDigest(ref.volume, ref.snapshot);
    if (!d.ok()) return act(d.status());
    std::printf("%s\n", d->ToHex().c_str());
  });

  RelationshipArgs rel_args;
  AddRelationshipCommands(
      app, rel_args,
      []() -> absl::StatusOr<std::unique_ptr<RelationshipBackend>> {
        return LocalRelationships();
      },
      act);

  std::string demo_dir, demo_size = "256M";
  CLI::App* demo = app.add_subcommand(
      "demo",
      "the disaster-recovery drill on two pools in a temporary directory");
  demo->add_option("DIR", demo_dir,
                   "where to put the pools (default: a new "
                   "temporary directory, removed after)");
  demo->add_option("--size", demo_size, "source volume size (default 256M)");
  demo->callback([&] {
    absl::StatusOr<uint64_t> size = Size(demo_size, "volume size");
    if (!size.ok()) return act(size.status());
    if (*size < 1 << 20 || *size % (64 << 10) != 0) {
      return act(absl::InvalidArgumentError(
          "bad --size: the demo wants at least 1M, a multiple of 64K"));
    }
    int rc = RunDemo(demo_dir, *size);
    if (rc != 0) failure = Failure{"demo: a check failed (see above)", rc};
  });

  if (std::optional<int> rc = ParseCommandLine(app, argc, argv, "tandem")) {
    return *rc;
  }
  if (failure.has_value()) {
    std::fprintf(stderr, "tandem: %s\n", failure->message.c_str());
    return failure->code;
  }
  return 0;
}

}  // namespace
}  // namespace tools

int main(int argc, char** argv) { return tools::Run(argc, argv); }
