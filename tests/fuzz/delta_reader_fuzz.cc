// libFuzzer target: any byte string through the delta reader, and (when the
// reader accepts the header) through an apply onto a small in-memory image.
// Never a crash, a leak, an allocation beyond the format's bounds, or a
// write outside the image. Build and run: scripts/fuzz.sh [SECONDS].
#include <cstddef>
#include <cstdint>
#include <string>

#include "blockstore/mem_io.h"
#include "engine/delta_receive.h"
#include "engine/stream.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  {
    engine::StringSource in(bytes);
    absl::StatusOr<std::unique_ptr<engine::DeltaReader>> reader =
        engine::DeltaReader::Open(in);
    if (!reader.ok()) return 0;
    while (true) {
      absl::StatusOr<std::optional<engine::DeltaReader::Record>> r =
          (*reader)->Next();
      if (!r.ok() || !r->has_value()) break;
    }
  }
  // Applying must stay inside an image of 1 MiB (bigger volumes are
  // refused before anything is written).
  blockstore::MemIo image(1 << 20);
  engine::StringSource in(bytes);
  engine::ImageOptions options;
  options.verify_base = false;
  options.verify_target = false;
  engine::ApplyDeltaToImage(image, in, options).IgnoreError();
  return 0;
}
