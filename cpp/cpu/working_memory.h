// The CPU kernels' working memory. Buffers are std::vectors with an allocator that, when memory
// runs out, throws OutOfMemory (a std::bad_alloc, hence a MemoryError in Python) naming the bytes
// it was asked for. Every buffer is allocated before the parallel regions: an exception that
// escapes an OpenMP region ends the process (std::terminate), one thrown outside it reaches the
// caller.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#ifndef GMATTN_ISA
#define GMATTN_ISA generic
#endif

namespace gmattn {
namespace cpu_detail {
inline namespace GMATTN_ISA {  // one copy per ISA build (see numeric.h)

// Memory exhaustion with a message (what()); copies share it, so copying never allocates.
class OutOfMemory : public std::bad_alloc {
 public:
  explicit OutOfMemory(std::string message) : message_(std::make_shared<const std::string>(std::move(message))) {}
  const char* what() const noexcept override { return message_->c_str(); }

 private:
  std::shared_ptr<const std::string> message_;
};

// "1.5 GiB", "12.0 MiB", "640 bytes".
inline std::string bytes_text(double bytes) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024 && u < 6) {
    bytes /= 1024;
    ++u;
  }
  char text[48];
  std::snprintf(text, sizeof(text), u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return text;
}

template <class T>
struct WorkingMemory {
  using value_type = T;
  WorkingMemory() = default;
  template <class U>
  WorkingMemory(const WorkingMemory<U>&) noexcept {}
  T* allocate(size_t n) {
    if (n > std::numeric_limits<size_t>::max() / sizeof(T)) {
      throw OutOfMemory("a request for " + std::to_string(n) + " values of " + std::to_string(sizeof(T)) +
                        " bytes of working memory exceeds the address space");
    }
    void* p = std::malloc(n * sizeof(T));
    if (p == nullptr && n > 0) {
      throw OutOfMemory("a request for " + bytes_text(static_cast<double>(n * sizeof(T))) +
                        " of working memory failed");
    }
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { std::free(p); }
  template <class U>
  bool operator==(const WorkingMemory<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const WorkingMemory<U>&) const noexcept { return false; }
};

template <class T>
using Buffer = std::vector<T, WorkingMemory<T>>;

// Working memory left uncleared, for buffers that every use writes before it reads: a short call
// (a decoding step) would otherwise spend more time clearing its per-thread states than working.
template <class T>
class UnclearedBuffer {
 public:
  UnclearedBuffer() = default;
  explicit UnclearedBuffer(size_t n) : p_(n > 0 ? WorkingMemory<T>().allocate(n) : nullptr), n_(n) {}
  UnclearedBuffer(UnclearedBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  UnclearedBuffer& operator=(UnclearedBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  UnclearedBuffer(const UnclearedBuffer&) = delete;
  UnclearedBuffer& operator=(const UnclearedBuffer&) = delete;
  ~UnclearedBuffer() { WorkingMemory<T>().deallocate(p_, n_); }
  T* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace GMATTN_ISA
}  // namespace cpu_detail
}  // namespace gmattn
