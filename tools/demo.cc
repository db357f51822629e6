#include "tools/demo.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"
#include "engine/relationship.h"
#include "tools/drill.h"
#include "tools/relationship_cli.h"

namespace tools {
namespace {

using blockstore::Pool;
using engine::Endpoint;
using engine::Replication;

constexpr uint32_t kChunk = 64 << 10;

using drill::Check;
using drill::failures;
using drill::Ok;
using drill::Step;

std::string MixedData(uint64_t bytes, uint64_t seed) {
  return drill::MixedData(bytes, seed, kChunk);
}
const engine::Confirm kYes = [](const engine::LossPreview&) { return true; };

// Equal bytes, read back from both pools in 16 MiB pieces.
bool SameBytes(Pool& a, const std::string& va, const std::string& sa, Pool& b,
               const std::string& vb, const std::string& sb) {
  auto size = [](Pool& p, const std::string& v, const std::string& s) {
    return s.empty() ? p.GetVolume(v)->size_bytes
                     : p.GetSnapshot(v, s)->size_bytes;
  };
  uint64_t n = size(a, va, sa);
  if (n != size(b, vb, sb)) return false;
  std::vector<std::byte> x(16 << 20), y(16 << 20);
  for (uint64_t at = 0; at < n; at += x.size()) {
    uint64_t len = std::min<uint64_t>(x.size(), n - at);
    if (!a.Read(va, sa, at, std::span(x).first(len)).ok() ||
        !b.Read(vb, sb, at, std::span(y).first(len)).ok() ||
        std::memcmp(x.data(), y.data(), len) != 0) {
      return false;
    }
  }
  return true;
}

class Drill {
 public:
  Drill(const std::string& dir, uint64_t volume_bytes)
      : dir_(dir),
        bytes_(volume_bytes),
        pools_(blockstore::OpenMode::kReadWrite),
        rep_(pools_) {}

  int Run();

 private:
  Pool& P(const Endpoint& e) { return **pools_.Pool(e.pool); }
  Pool& Src() { return P(record().source); }
  Pool& Dst() { return P(record().destination); }
  engine::RelationshipRecord record() {
    absl::StatusOr<engine::RelationshipReport> r = rep_.Report(a_);
    return r.ok() ? r->record : engine::RelationshipRecord{};
  }
  // The states and both sides' root digests, after every step.
  void Show() {
    engine::RelationshipRecord r = record();
    std::printf("  mirror state %s, relationship status %s; %s -> %s\n",
                ToString(r.mirror_state), ToString(r.status),
                Short(r.source).c_str(), Short(r.destination).c_str());
    for (const Endpoint& e : {r.source, r.destination}) {
      absl::StatusOr<blockstore::Digest> d = P(e).RootDigest(e.volume, "");
      absl::StatusOr<blockstore::VolumeInfo> v = P(e).GetVolume(e.volume);
      std::printf("    %-26s %s%s\n", Short(e).c_str(),
                  d.ok() ? d->ToHex().c_str() : "(no volume)",
                  v.ok() && v->read_only ? "  read-only" : "");
    }
  }
  std::string Short(const Endpoint& e) {
    std::string pool = e.pool.substr(e.pool.rfind('/') + 1);
    return pool + ":" + e.volume;
  }
  bool Write(Pool& pool, uint64_t chunks, uint64_t seed) {
    std::mt19937_64 rng(seed);
    const uint64_t total = bytes_ / kChunk;
    for (uint64_t i = 0; i < chunks; ++i) {
      uint64_t c = rng() % total;
      // Chunk c of a fresh mixed image: random or text, as c's parity says.
      std::string data = MixedData(2 * kChunk, seed * 1000003 + i);
      if (!Ok(pool.Write("vol", c * kChunk,
                         drill::Bytes(data).subspan((c % 2) * kChunk, kChunk)),
              "write")) {
        return false;
      }
    }
    return Ok(pool.Flush(), "flush");
  }
  bool Mirrored(const std::string& what) {
    engine::RelationshipRecord r = record();
    bool same =
        SameBytes(Src(), r.source.volume, "", Dst(), r.destination.volume, "");
    Check(same && r.mirror_state == engine::MirrorState::kMirrored,
          absl::StrCat(what, ": destination equals source byte for byte"));
    return same;
  }
  void Transferred(const absl::StatusOr<engine::TransferStats>& s) {
    if (s.ok()) {
      std::printf("  sent %s (%s of data, %llu snapshot(s)) in %.2f s\n",
                  blockstore::FormatBytes(s->stream_bytes).c_str(),
                  blockstore::FormatBytes(s->data_bytes).c_str(),
                  static_cast<unsigned long long>(s->snapshots), s->seconds);
    }
  }

  const std::string dir_;
  const uint64_t bytes_;
  FileSites pools_;
  Replication rep_;
  Endpoint a_, b_;
};

int Drill::Run() {
  Step("two pools (4 GiB sparse files, 64 KiB chunks) in " + dir_);
  for (const char* name : {"site-a.pool", "site-b.pool"}) {
    std::string path = dir_ + "/" + name;
    if (access(path.c_str(), F_OK) == 0) {
      std::printf(
          "  [FAIL] %s exists (from an earlier demo?): delete it or "
          "pick another directory\n",
          path.c_str());
      return 1;
    }
    blockstore::FileIoOptions options;
    options.create_size_bytes = 4ull << 30;
    absl::StatusOr<std::unique_ptr<blockstore::Io>> io =
        blockstore::OpenFileIo(path, options);
    if (!Ok(io.status(), "create pool file")) return 1;
    if (!Ok(Pool::Create(std::move(*io), {.chunk_size_bytes = kChunk}).status(),
            "create pool")) {
      return 1;
    }
    char resolved[PATH_MAX];
    if (realpath(path.c_str(), resolved) == nullptr) return 1;
    (name[5] == 'a' ? a_ : b_) = {resolved, "vol"};
  }
  Pool& a = P(a_);
  Step(absl::StrCat("source volume site-a:vol, ",
                    blockstore::FormatBytes(bytes_),
                    " of mixed data (half random, half text)"));
  if (!Ok(a.CreateVolume("vol", bytes_), "create volume")) return 1;
  if (!Ok(a.Write("vol", 0, drill::Bytes(MixedData(bytes_, 1))), "write")) {
    return 1;
  }
  if (!Ok(a.Flush(), "flush")) return 1;

  Step(
      "relationship create --source site-a:vol --destination site-b:vol "
      "--schedule 10m");
  if (!Ok(rep_.Create(a_, b_, 600).status(), "create relationship")) return 1;
  Show();

  Step("break before the baseline: refused");
  absl::Status s = rep_.Break(b_, kYes);
  std::printf("  refused: %s\n", std::string(s.message()).c_str());
  Check(absl::IsFailedPrecondition(s), "break refused while Uninitialized");

  Step("initialize: baseline transfer");
  absl::StatusOr<engine::TransferStats> t = rep_.Initialize(b_);
  if (!Ok(t.status(), "initialize")) return 1;
  Transferred(t);
  Show();
  Mirrored("initialize");
  Check(!P(b_).Write("vol", 0, drill::Bytes(MixedData(kChunk, 2))).ok(),
        "the destination refuses writes while Mirrored");

  Step(
      "write 1% more, snapshot site-a:vol@before-upgrade, write 1% more; "
      "update");
  const uint64_t one_percent = std::max<uint64_t>(1, bytes_ / kChunk / 100);
  if (!Write(a, one_percent, 3)) return 1;
  if (!Ok(a.CreateSnapshot("vol", "before-upgrade").status(), "snapshot")) {
    return 1;
  }
  if (!Write(a, one_percent, 4)) return 1;
  t = rep_.Update(a_);
  if (!Ok(t.status(), "update")) return 1;
  Transferred(t);
  Show();
  Mirrored("update");
  Check(SameBytes(a, "vol", "before-upgrade", P(b_), "vol", "before-upgrade"),
        "the user snapshot arrived: site-b:vol@before-upgrade equals "
        "site-a:vol@before-upgrade");

  Step("write 2% more and update; try to break while it transfers");
  if (!Write(a, 2 * one_percent, 5)) return 1;
  absl::Status during;
  engine::RelationshipRecord seen;
  rep_.set_transfer_started([&](engine::Operation) {
    std::thread other([&] {
      during = rep_.Break(b_, kYes);
      seen = record();
    });
    other.join();
  });
  t = rep_.Update(a_);
  rep_.set_transfer_started(nullptr);
  if (!Ok(t.status(), "update")) return 1;
  std::printf("  while %s: break refused: %s\n", ToString(seen.status),
              std::string(during.message()).c_str());
  Check(absl::IsFailedPrecondition(during) &&
            seen.status == engine::TransferStatus::kTransferring,
        "break refused while Transferring");
  Transferred(t);
  Show();
  Mirrored("update");

  Step("disaster at site A: break; site B serves (read-write)");
  if (!Ok(rep_.Break(b_,
                     [](const engine::LossPreview& p) {
                       std::printf("  %s\n  demo: answering yes\n",
                                   p.Describe().c_str());
                       return true;
                     }),
          "break")) {
    return 1;
  }
  Show();
  Check(record().mirror_state == engine::MirrorState::kBroken &&
            !P(b_).GetVolume("vol")->read_only,
        "Broken, and site-b:vol is writable");
  std::printf(
      "  clients write 2%% on site-b:vol; site-a:vol took 1%% of late "
      "writes before it went down\n");
  if (!Write(P(b_), 2 * one_percent, 6)) return 1;
  if (!Write(a, one_percent, 7)) return 1;
  const std::string a_before_hex = a.RootDigest("vol", "")->ToHex();

  Step("site A is back: reverse resync (site-a:vol takes site-b:vol's data)");
  engine::LossPreview preview;
  t = rep_.ReverseResync(a_, [&](const engine::LossPreview& p) {
    preview = p;
    std::printf("  %s\n  demo: answering yes\n", p.Describe().c_str());
    return true;
  });
  if (!Ok(t.status(), "reverse resync")) return 1;
  Transferred(t);
  Show();
  Mirrored("reverse resync");
  Check(record().source == b_,
        "the direction flipped: site-b:vol -> site-a:vol");
  absl::StatusOr<blockstore::SnapshotInfo> safety =
      a.GetSnapshot("vol", preview.safety_snapshot);
  Check(safety.ok() && safety->root_digest.ToHex() == a_before_hex,
        absl::StrCat("site-a:vol@", preview.safety_snapshot,
                     " keeps what was overwritten (",
                     blockstore::FormatBytes(preview.bytes), ")"));

  Step("reestablish site-a:vol -> site-b:vol (update, break, reverse resync)");
  if (!Write(P(b_), one_percent, 8)) return 1;
  t = rep_.Reestablish(b_, [](const engine::LossPreview& p) {
    std::printf("  %s\n  demo: answering yes\n", p.Describe().c_str());
    return true;
  });
  if (!Ok(t.status(), "reestablish")) return 1;
  Transferred(t);
  Show();
  Mirrored("reestablish");
  Check(record().source == a_, "site-a:vol is the source again");

  Step("production on site A again: write 1% and update");
  if (!Write(a, one_percent, 9)) return 1;
  t = rep_.Update(b_);
  if (!Ok(t.status(), "update")) return 1;
  Transferred(t);
  Show();
  Mirrored("update");

  Step("tandem status");
  absl::StatusOr<engine::RelationshipReport> report = rep_.Report(a_);
  if (!Ok(report.status(), "status")) return 1;
  PrintReport(ReportJson(*report));
  Check(report->healthy, "healthy");
  for (const Endpoint& e : {a_, b_}) {
    absl::StatusOr<Pool::CheckReport> c = P(e).Check(false);
    Check(c.ok() && c->problems.empty(),
          absl::StrCat("pool check ", Short(e), ": consistent"));
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int RunDemo(const std::string& dir_arg, uint64_t volume_bytes) {
  std::string dir = dir_arg;
  bool temporary = dir.empty();
  if (temporary) {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl =
        absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/tandem-demo-XXXXXX");
    if (mkdtemp(tmpl.data()) == nullptr) {
      std::perror("tandem demo: mkdtemp");
      return 1;
    }
    dir = tmpl;
  } else if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    std::perror(("tandem demo: mkdir " + dir).c_str());
    return 1;
  }
  int rc = 1;
  {
    Drill drill(dir, volume_bytes);
    rc = drill.Run();
  }  // pools closed
  if (temporary) {
    for (const char* name : {"/site-a.pool", "/site-b.pool"}) {
      unlink((dir + name).c_str());
    }
    rmdir(dir.c_str());
  }
  std::printf("%s\n", rc == 0 ? "demo: all checks passed" : "demo: FAILED");
  return rc;
}

}  // namespace tools
