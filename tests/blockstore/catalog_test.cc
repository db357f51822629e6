#include "blockstore/catalog.h"

#include "blockstore/util.h"
#include "gtest/gtest.h"

namespace blockstore {
namespace {

Catalog Sample() {
  Catalog c;
  CatalogVolume v;
  v.name = "vol";
  v.guid[0] = std::byte{0xaa};
  v.create_time_ns = 5;
  v.size_bytes = 1 << 20;
  v.root = {7, 2, {}};
  v.root.digest.bytes[15] = std::byte{0x11};
  v.read_only = true;
  CatalogSnapshot s;
  s.name = "s1";
  s.guid[15] = std::byte{0xbb};
  s.create_time_ns = 6;
  s.generation = 2;
  s.size_bytes = 4096;
  s.root = {0, 1, {}};
  s.owner = "rel";
  v.snapshots.push_back(s);
  c.volumes.emplace("vol", v);
  c.properties["k"] = "v";
  return c;
}

auto AnyRoot = [](const Entry&) { return true; };

// The bytes of version 3, spelled out (format.h): a change to the codec
// that moves a byte fails here, not in a pool written by the old one.
TEST(CatalogTest, EncodesTheDocumentedBytes) {
  const std::string golden =
      "54434154"
      "03000000"
      "01000000"  // magic, version, 1
      "0300"
      "766f6c"                            // "vol"
      "aa000000000000000000000000000000"  // guid
      "0500000000000000"
      "0000100000000000"  // time, size
      "0700000000000000"
      "0200000000000000"                  // root ptr, birth
      "00000000000000000000000000000011"  // root digest
      "01000000"                          // 1 snapshot
      "0200"
      "7331"                              // "s1"
      "000000000000000000000000000000bb"  // guid
      "0600000000000000"
      "0200000000000000"  // time, generation
      "0010000000000000"  // size
      "0000000000000000"
      "0100000000000000"                  // root ptr, birth
      "00000000000000000000000000000000"  // root digest
      "0300"
      "72656c"    // owner "rel"
      "01000000"  // flags: read-only
      "01000000"
      "0100"
      "6b"
      "0100"
      "76";  // properties k=v
  EXPECT_EQ(
      Hex(std::span<const std::byte>(
          reinterpret_cast<const std::byte*>(SerializeCatalog(Sample()).data()),
          SerializeCatalog(Sample()).size())),
      golden);
}

TEST(CatalogTest, RoundTrips) {
  std::string bytes = SerializeCatalog(Sample());
  Catalog back;
  ASSERT_TRUE(ParseCatalog(bytes, AnyRoot, 1ull << 60, back).ok());
  EXPECT_EQ(SerializeCatalog(back), bytes);
  const CatalogVolume& v = back.volumes.at("vol");
  EXPECT_TRUE(v.read_only);
  EXPECT_EQ(v.snapshots.at(0).owner, "rel");
  EXPECT_EQ(back.properties.at("k"), "v");
}

TEST(CatalogTest, ReadsVersionOne) {
  // Version 1: no flags, no owner, no properties.
  std::string bytes = SerializeCatalog(Sample());
  absl::StatusOr<std::vector<std::byte>> v1 = Unhex(
      "54434154"
      "01000000"
      "01000000"
      "0300766f6c"
      "aa000000000000000000000000000000"
      "0500000000000000"
      "0000100000000000"
      "0700000000000000"
      "0200000000000000"
      "00000000000000000000000000000011"
      "00000000");
  ASSERT_TRUE(v1.ok());
  Catalog back;
  absl::Status s = ParseCatalog(
      absl::string_view(reinterpret_cast<const char*>(v1->data()), v1->size()),
      AnyRoot, 1ull << 60, back);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_FALSE(back.volumes.at("vol").read_only);
  EXPECT_TRUE(back.properties.empty());
}

TEST(CatalogTest, RefusesWhatIsNotACatalog) {
  std::string bytes = SerializeCatalog(Sample());
  for (size_t cut : {size_t{3}, size_t{20}, bytes.size() - 1}) {
    Catalog back;
    absl::Status s =
        ParseCatalog(bytes.substr(0, cut), AnyRoot, 1ull << 60, back);
    EXPECT_TRUE(absl::IsDataLoss(s)) << cut << ": " << s;
  }
  Catalog back;
  absl::Status s = ParseCatalog(
      bytes, [](const Entry& e) { return e.ptr != 7; }, 1ull << 60, back);
  EXPECT_EQ(s.message(), "malformed (volume vol size or root)");
  Catalog extra;
  EXPECT_EQ(ParseCatalog(bytes + "x", AnyRoot, 1ull << 60, extra).message(),
            "malformed (length)");
}

}  // namespace
}  // namespace blockstore
