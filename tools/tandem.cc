// tandem: the operator's command line for pools, volumes and snapshots.
// Every failure prints one line "tandem: <what is wrong>" on stderr and exits
// non-zero (1 for a failed operation, 2 for a malformed command line); a
// failed command commits nothing.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
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
#include "tools/control_client.h"
#include "tools/demo.h"
#include "tools/fd_stream.h"
#include "tools/open_pool.h"
#include "tools/pool_ops.h"
#include "tools/relationship_cli.h"

namespace tools {
namespace {

using blockstore::OpenMode;
using blockstore::Pool;

// A failed command: its one-line message and exit code.
struct Failure {
  std::string message;
  int code = 1;
};

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

// --- pool -----------------------------------------------------------------

absl::Status PoolCreate(const std::string& path, const std::string& size_text,
                        const std::string& chunk_text, bool force) {
  absl::StatusOr<uint64_t> chunk = Size(chunk_text, "chunk size");
  if (!chunk.ok()) return chunk.status();
  if (absl::Status s = blockstore::CheckChunkSize(*chunk); !s.ok()) return s;
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
  if (exists && !is_device && !S_ISREG(st.st_mode)) {
    // A FIFO, a directory...: refused (and said what it is) by the open.
    blockstore::FileIoOptions probe;
    probe.mode = OpenMode::kReadOnly;
    return blockstore::OpenFileIo(path, probe).status();
  }
  if (!is_device) {
    // Refused before anything is made: a bad size or chunk size.
    const uint64_t bytes =
        size_text.empty() && exists ? static_cast<uint64_t>(st.st_size) : size;
    if (absl::StatusOr<blockstore::Superblock> layout =
            blockstore::LayOut(bytes, static_cast<uint32_t>(*chunk));
        !layout.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bad pool size ", size_text.empty() ? "(none given)" : size_text,
          ": ", layout.status().message(),
          size_text.empty() ? "; pass --size" : ""));
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
  if (!pool.ok()) {
    // A file this command made goes again; one that was there keeps its
    // size (its content was being replaced anyway).
    if (!exists) {
      unlink(path.c_str());
    } else if (S_ISREG(st.st_mode)) {
      if (truncate(path.c_str(), st.st_size) != 0) {
        // Best effort: the error that matters is the one below.
      }
    }
    return pool.status();
  }
  blockstore::PoolInfo info = (*pool)->Info();
  std::printf("created pool %s: %s of data in %s chunks (%s)\n", path.c_str(),
              blockstore::FormatBytes(info.capacity_bytes).c_str(),
              blockstore::FormatBytes(info.chunk_size_bytes).c_str(),
              info.io.c_str());
  // A sparse file takes space as it is written: one larger than what its
  // file system has left runs out before the pool is full.
  struct statvfs fs {};
  if (!is_device && statvfs(path.c_str(), &fs) == 0) {
    const uint64_t free_bytes = uint64_t{fs.f_bavail} * fs.f_frsize;
    if (free_bytes < info.capacity_bytes) {
      std::printf(
          "note: its file system has %s free, less than the pool's %s: "
          "writes will fail once that is used up\n",
          blockstore::FormatBytes(free_bytes).c_str(),
          blockstore::FormatBytes(info.capacity_bytes).c_str());
    }
  }
  return absl::OkStatus();
}

// Where the pool commands run: on a pool file or device here, or on a
// daemon's pool (by name) with --daemon.
struct Target {
  std::string daemon;  // control socket; empty: local files
  std::unique_ptr<ControlClient> client;

  absl::StatusOr<std::unique_ptr<PoolOps>> Ops(const std::string& pool,
                                               OpenMode mode) {
    if (daemon.empty()) {
      if (pool.empty()) {
        return absl::InvalidArgumentError(
            "no pool given: pass --pool PATH or set TANDEM_POOL");
      }
      return OpenPoolOps(pool, mode);
    }
    if (pool.empty()) {
      return absl::InvalidArgumentError(
          "no pool given: pass --pool NAME (a pool of the daemon's config) or "
          "set TANDEM_POOL");
    }
    return DaemonPoolOps(Client(), pool);
  }
  ControlClient& Client() {
    if (!client) client = std::make_unique<ControlClient>(daemon);
    return *client;
  }
};

void PrintPoolInfo(const ordered_json& i) {
  using blockstore::FormatBytes;
  auto n = [&](const char* k) { return i.value(k, uint64_t{0}); };
  std::printf("pool        %s\n", i.value("path", "").c_str());
  std::printf("guid        %s\n", i.value("guid", "").c_str());
  std::printf("io          %s\n", i.value("io", "").c_str());
  std::printf("chunk size  %s\n", FormatBytes(n("chunk_size_bytes")).c_str());
  std::printf("capacity    %s\n", FormatBytes(n("capacity_bytes")).c_str());
  std::printf("used        %s (%llu bytes)\n",
              FormatBytes(n("used_bytes")).c_str(),
              static_cast<unsigned long long>(n("used_bytes")));
  std::printf("free        %s\n", FormatBytes(n("free_bytes")).c_str());
  std::printf("metadata    %s used of %s\n",
              FormatBytes(n("metadata_used_bytes")).c_str(),
              FormatBytes(n("metadata_capacity_bytes")).c_str());
  std::printf("volumes     %llu\n",
              static_cast<unsigned long long>(n("volumes")));
  std::printf("snapshots   %llu\n",
              static_cast<unsigned long long>(n("snapshots")));
  std::printf("generation  %llu\n",
              static_cast<unsigned long long>(n("generation")));
}

std::optional<Failure> PrintCheck(const std::string& pool,
                                  const absl::StatusOr<ordered_json>& r,
                                  bool data) {
  if (!r.ok()) return Failure{std::string(r.status().message())};
  for (const auto& n : (*r)["notes"]) {
    std::printf("note: %s\n", n.get<std::string>().c_str());
  }
  for (const auto& p : (*r)["problems"]) {
    std::printf("problem: %s\n", p.get<std::string>().c_str());
  }
  const size_t problems = (*r)["problems"].size();
  std::printf(
      "checked %llu metadata nodes%s: %s\n",
      static_cast<unsigned long long>(r->value("nodes_checked", uint64_t{0})),
      data ? absl::StrCat(" and ", r->value("chunks_checked", uint64_t{0}),
                          " data chunks")
                 .c_str()
           : "",
      problems == 0 ? "consistent"
                    : absl::StrCat(problems, " problem(s)").c_str());
  if (problems > 0) {
    return Failure{absl::StrCat("pool ", pool, " is inconsistent: ", problems,
                                " problem(s)")};
  }
  return std::nullopt;
}

void PrintVolumes(const ordered_json& vols) {
  std::printf("%-24s %14s %9s  %s\n", "NAME", "SIZE", "SNAPSHOTS", "CREATED");
  for (const auto& v : vols) {
    std::printf(
        "%-24s %14s %9llu  %s\n", v.value("name", "").c_str(),
        blockstore::FormatBytes(v.value("size_bytes", uint64_t{0})).c_str(),
        static_cast<unsigned long long>(v.value("snapshots", uint64_t{0})),
        v.value("created", "").c_str());
  }
}

void PrintSnapshots(const ordered_json& snaps) {
  std::printf("%-24s %-36s %-20s %12s  %s\n", "NAME", "GUID", "CREATED", "SIZE",
              "ROOT DIGEST");
  for (const auto& s : snaps) {
    std::printf(
        "%-24s %-36s %-20s %12s  %s\n", s.value("name", "").c_str(),
        s.value("guid", "").c_str(), s.value("created", "").c_str(),
        blockstore::FormatBytes(s.value("size_bytes", uint64_t{0})).c_str(),
        s.value("root_digest", "").c_str());
  }
}

int Run(int argc, char** argv) {
  CLI::App app{"tandem: snapshot-delta replication for block volumes"};
  app.require_subcommand(1);
  app.fallthrough();
  std::optional<Failure> failure;
  auto act = [&](absl::Status s) {
    if (!s.ok()) failure = Failure{std::string(s.message())};
  };
  Target target;
  app.add_option("--daemon", target.daemon,
                 "run through the tandemd listening on this control socket "
                 "(pools are then named as in its config)")
      ->envname("TANDEM_DAEMON");

  std::string pool_path;
  auto add_pool = [&](CLI::App* cmd) {
    cmd->add_option("--pool", pool_path,
                    "pool file or block device (with --daemon: the pool's "
                    "name)")
        ->envname("TANDEM_POOL");
  };
  bool as_json = false;
  auto ops = [&](OpenMode mode) { return target.Ops(pool_path, mode); };
  // Runs `f` on the pool's ops, reporting a failure to open it.
  auto with = [&](OpenMode mode, auto f) {
    absl::StatusOr<std::unique_ptr<PoolOps>> o = ops(mode);
    if (!o.ok()) return act(o.status());
    f(**o);
  };

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
  pool_create->callback([&] {
    if (!target.daemon.empty()) {
      return act(absl::InvalidArgumentError(
          "pool create makes a pool file or device here; create it without "
          "--daemon, then add it under [pools] in the daemon's config"));
    }
    act(PoolCreate(pool_file, size_text, chunk_text, force));
  });
  CLI::App* pool_info = pool->add_subcommand("info", "capacity and usage");
  pool_info->add_option("POOL", pool_file, "path (with --daemon: name)")
      ->required();
  pool_info->add_flag("--json", as_json);
  pool_info->callback([&] {
    absl::StatusOr<std::unique_ptr<PoolOps>> o =
        target.Ops(pool_file, OpenMode::kReadOnly);
    if (!o.ok()) return act(o.status());
    absl::StatusOr<ordered_json> i = (*o)->Info();
    if (!i.ok()) return act(i.status());
    if (as_json) {
      std::cout << i->dump(2) << "\n";
    } else {
      PrintPoolInfo(*i);
    }
  });
  CLI::App* pool_check = pool->add_subcommand(
      "check", "verify all metadata (exit 0 if consistent)");
  pool_check->add_option("POOL", pool_file, "path (with --daemon: name)")
      ->required();
  pool_check->add_flag("--data", data, "also re-hash every data chunk");
  bool repair = false;
  pool_check->add_flag(
      "--repair", repair,
      "rebuild damaged reference counts from the trees, then check");
  pool_check->callback([&] {
    if (repair) {
      if (!target.daemon.empty()) {
        return act(absl::InvalidArgumentError(
            "pool check --repair rewrites the pool file itself: stop the "
            "daemon, run it without --daemon on the pool's path, start the "
            "daemon again"));
      }
      absl::StatusOr<RepairedPool> r = RepairPoolFile(pool_file);
      if (!r.ok()) return act(r.status());
      std::printf("%s\n",
                  r->what.empty() ? "nothing to repair" : r->what.c_str());
      failure = PrintCheck(pool_file, r->ops->Check(data), data);
      return;
    }
    absl::StatusOr<std::unique_ptr<PoolOps>> o =
        target.Ops(pool_file, OpenMode::kReadOnly);
    if (!o.ok()) return act(o.status());
    failure = PrintCheck(pool_file, (*o)->Check(data), data);
  });

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
    with(OpenMode::kReadWrite,
         [&](PoolOps& o) { act(o.CreateVolume(name, *size)); });
  });
  CLI::App* vol_list = volume->add_subcommand("list", "list volumes");
  add_pool(vol_list);
  vol_list->add_flag("--json", as_json);
  vol_list->callback([&] {
    with(OpenMode::kReadOnly, [&](PoolOps& o) {
      absl::StatusOr<ordered_json> v = o.ListVolumes();
      if (!v.ok()) return act(v.status());
      if (as_json) {
        std::cout << v->dump(2) << "\n";
      } else {
        PrintVolumes(*v);
      }
    });
  });
  CLI::App* vol_resize = volume->add_subcommand("resize", "grow or shrink");
  add_pool(vol_resize);
  vol_resize->add_option("NAME", name)->required();
  vol_resize->add_option("--size", size_text)->required();
  vol_resize->callback([&] {
    absl::StatusOr<uint64_t> size = Size(size_text, "volume size");
    if (!size.ok()) return act(size.status());
    with(OpenMode::kReadWrite,
         [&](PoolOps& o) { act(o.ResizeVolume(name, *size)); });
  });
  CLI::App* vol_delete = volume->add_subcommand("delete", "delete a volume");
  add_pool(vol_delete);
  vol_delete->add_option("NAME", name)->required();
  vol_delete->add_flag("--recursive,-r", recursive, "delete its snapshots too");
  vol_delete->callback([&] {
    with(OpenMode::kReadWrite,
         [&](PoolOps& o) { act(o.DeleteVolume(name, recursive)); });
  });

  // I/O
  std::string offset_text = "0", length_text, file;
  CLI::App* write_cmd =
      app.add_subcommand("write", "write FILE (or stdin) into a volume");
  add_pool(write_cmd);
  write_cmd->add_option("VOLUME", name)->required();
  write_cmd->add_option("FILE", file, "input file, or - for stdin (default)");
  write_cmd->add_option("--offset", offset_text, "byte offset (default 0)");
  write_cmd->callback([&] {
    absl::StatusOr<uint64_t> offset = Size(offset_text, "offset");
    if (!offset.ok()) return act(offset.status());
    absl::StatusOr<std::unique_ptr<InputFile>> in =
        InputFile::Open(file.empty() ? "-" : file);
    if (!in.ok()) return act(in.status());
    with(OpenMode::kReadWrite, [&](PoolOps& o) {
      // A named file's size is checked first; stdin is taken as it comes.
      const bool named = !file.empty() && file != "-";
      act(o.Write(name, *offset, named ? (*in)->size() : 0, (*in)->source()));
    });
  });
  CLI::App* read_cmd =
      app.add_subcommand("read", "read a volume or snapshot to stdout");
  add_pool(read_cmd);
  read_cmd->add_option("VOLUME[@SNAPSHOT]", name)->required();
  read_cmd->add_option("--offset", offset_text);
  read_cmd->add_option("--length", length_text, "default: to the end");
  read_cmd->callback([&] {
    Ref ref = ParseRef(name);
    absl::StatusOr<uint64_t> offset = Size(offset_text, "offset");
    if (!offset.ok()) return act(offset.status());
    std::optional<uint64_t> length;
    if (!length_text.empty()) {
      absl::StatusOr<uint64_t> l = Size(length_text, "length");
      if (!l.ok()) return act(l.status());
      length = *l;
    }
    with(OpenMode::kReadOnly, [&](PoolOps& o) {
      // Checked first, so that a refused read is one clean error line.
      absl::StatusOr<uint64_t> n =
          o.ReadLength(ref.volume, ref.snapshot, *offset, length);
      if (!n.ok()) return act(n.status());
      FdSink out(1, "standard output");
      // Read into a new file, the volume's zero chunks stay holes.
      absl::StatusOr<ordered_json> info = o.Info();
      if (!info.ok()) return act(info.status());
      const uint64_t chunk = (*info)["chunk_size_bytes"].get<uint64_t>();
      if (*offset % chunk == 0) out.MakeSparse(chunk);
      absl::Status s = o.Read(ref.volume, ref.snapshot, *offset, *n, out);
      act(s.ok() ? out.Finish() : s);
    });
  });
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
    with(OpenMode::kReadWrite,
         [&](PoolOps& o) { act(o.Trim(name, *off, *len)); });
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
    with(OpenMode::kReadWrite, [&](PoolOps& o) {
      absl::StatusOr<ordered_json> info =
          o.CreateSnapshot(ref.volume, ref.snapshot);
      if (!info.ok()) return act(info.status());
      if (as_json) {
        std::cout << info->dump(2) << "\n";
      } else {
        std::printf("%s@%s %s %s\n", ref.volume.c_str(), ref.snapshot.c_str(),
                    info->value("guid", "").c_str(),
                    info->value("root_digest", "").c_str());
      }
    });
  });
  CLI::App* snap_list = snap->add_subcommand("list", "snapshots of VOLUME");
  add_pool(snap_list);
  snap_list->add_option("VOLUME", name)->required();
  snap_list->add_flag("--json", as_json);
  snap_list->callback([&] {
    with(OpenMode::kReadOnly, [&](PoolOps& o) {
      absl::StatusOr<ordered_json> snaps =
          o.ListSnapshots(ParseRef(name).volume);
      if (!snaps.ok()) return act(snaps.status());
      if (as_json) {
        std::cout << snaps->dump(2) << "\n";
      } else {
        PrintSnapshots(*snaps);
      }
    });
  });
  CLI::App* snap_delete = snap->add_subcommand("delete", "VOLUME@SNAPSHOT");
  add_pool(snap_delete);
  snap_delete->add_option("VOLUME@SNAPSHOT", name)->required();
  snap_delete->callback([&] {
    Ref ref = ParseRef(name);
    if (absl::Status s = RequireSnapshot(ref, name); !s.ok()) return act(s);
    with(OpenMode::kReadWrite,
         [&](PoolOps& o) { act(o.DeleteSnapshot(ref.volume, ref.snapshot)); });
  });

  CLI::App* rollback =
      app.add_subcommand("rollback", "make a volume its snapshot again");
  add_pool(rollback);
  rollback->add_option("VOLUME@SNAPSHOT", name)->required();
  rollback->callback([&] {
    Ref ref = ParseRef(name);
    if (absl::Status s = RequireSnapshot(ref, name); !s.ok()) return act(s);
    with(OpenMode::kReadWrite,
         [&](PoolOps& o) { act(o.Rollback(ref.volume, ref.snapshot)); });
  });

  CLI::App* digest = app.add_subcommand("digest", "root digest (hex)");
  add_pool(digest);
  digest->add_option("VOLUME[@SNAPSHOT]", name)->required();
  digest->callback([&] {
    Ref ref = ParseRef(name);
    with(OpenMode::kReadOnly, [&](PoolOps& o) {
      absl::StatusOr<std::string> d = o.Digest(ref.volume, ref.snapshot);
      if (!d.ok()) return act(d.status());
      std::printf("%s\n", d->c_str());
    });
  });

  RelationshipArgs rel_args;
  AddRelationshipCommands(
      app, rel_args,
      [&]() -> absl::StatusOr<std::unique_ptr<RelationshipBackend>> {
        if (target.daemon.empty()) return LocalRelationships();
        return DaemonRelationships(target.Client());
      },
      act);

  std::string demo_dir, demo_size = "256M";
  bool demo_local = false;
  CLI::App* demo = app.add_subcommand(
      "demo",
      "the disaster-recovery drill: two tandemd daemons on loopback, pools "
      "in a temporary directory");
  demo->add_option("DIR", demo_dir,
                   "where to put the pools (default: a new "
                   "temporary directory, removed after)");
  demo->add_option("--size", demo_size, "source volume size (default 256M)");
  demo->add_flag("--local", demo_local,
                 "one process holding both pools, no daemons");
  demo->callback([&] {
    absl::StatusOr<uint64_t> size = Size(demo_size, "volume size");
    if (!size.ok()) return act(size.status());
    if (*size < 1 << 20 || *size % (64 << 10) != 0) {
      return act(absl::InvalidArgumentError(
          "bad --size: the demo wants at least 1M, a multiple of 64K"));
    }
    int rc = demo_local ? RunDemo(demo_dir, *size)
                        : RunDaemonDemo(demo_dir, *size, argv[0]);
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
