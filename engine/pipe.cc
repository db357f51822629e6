#include "engine/pipe.h"

#include <algorithm>
#include <cstring>

namespace engine {

absl::Status Pipe::Write(std::span<const std::byte> data) {
  std::unique_lock<std::mutex> lock(mu_);
  while (!data.empty()) {
    changed_.wait(lock,
                  [&] { return !read_aborted_.ok() || buffered_ < capacity_; });
    if (!read_aborted_.ok()) return read_aborted_;
    size_t n = std::min(data.size(), capacity_ - buffered_);
    pieces_.emplace_back(reinterpret_cast<const char*>(data.data()), n);
    buffered_ += n;
    data = data.subspan(n);
    changed_.notify_all();
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> Pipe::Read(std::span<std::byte> out) {
  std::unique_lock<std::mutex> lock(mu_);
  changed_.wait(lock, [&] { return !pieces_.empty() || write_closed_; });
  if (pieces_.empty()) {
    if (!write_status_.ok()) return write_status_;
    return 0;
  }
  size_t done = 0;
  while (done < out.size() && !pieces_.empty()) {
    const std::string& front = pieces_.front();
    size_t n = std::min(out.size() - done, front.size() - front_used_);
    std::memcpy(out.data() + done, front.data() + front_used_, n);
    done += n;
    front_used_ += n;
    if (front_used_ == front.size()) {
      pieces_.pop_front();
      front_used_ = 0;
    }
  }
  buffered_ -= done;
  changed_.notify_all();
  return done;
}

void Pipe::CloseWrite(absl::Status status) {
  std::lock_guard<std::mutex> lock(mu_);
  write_closed_ = true;
  write_status_ = std::move(status);
  changed_.notify_all();
}

void Pipe::AbortRead(absl::Status status) {
  std::lock_guard<std::mutex> lock(mu_);
  read_aborted_ = status.ok() ? absl::CancelledError("reader stopped") : status;
  changed_.notify_all();
}

}  // namespace engine
