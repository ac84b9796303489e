// pybind11 module over the kernel interface: DLPack tensors in, validated, kernels run with the
// GIL released. The same source builds the CPU module `gmattn._core` and, with
// GMATTN_BACKEND_CUDA defined, the CUDA module `gmattn._cuda`; only the device they accept and
// the kernels they call differ.
#include <pybind11/pybind11.h>

#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "dlpack.h"
#include "gmattn/gmattn.h"

#ifndef GMATTN_MODULE_NAME
#error "GMATTN_MODULE_NAME must be defined by the build"
#endif
#ifndef GMATTN_VERSION
#define GMATTN_VERSION "0.0.0"
#endif
#ifndef GMATTN_BUILD_ID
#error "GMATTN_BUILD_ID (the hash of the sources, CMakeLists.txt) must be defined by the build"
#endif

namespace py = pybind11;

#if defined(GMATTN_CUDA_EMULATION)
// The CUDA module built on the CPU emulator of the kernels (cpp/cuda/emulation, tests only): the
// emulated runtime's controls, defined in emulation_api.cpp.
extern "C" {
int gma_emu_set_device(int sm_count, int max_smem_optin);
void gma_emu_set_device_count(int count);
int gma_emu_current_device();
void gma_emu_set_current_device(int device);
void gma_emu_set_fault_kernel(const char* name);
long gma_emu_async_allocations();
}
#endif

namespace {

#ifdef GMATTN_BACKEND_CUDA
constexpr int32_t kDevice = kDLCUDA;
constexpr const char* kDeviceName = "CUDA";
#else
constexpr int32_t kDevice = kDLCPU;
constexpr const char* kDeviceName = "CPU";
#endif

enum class Kind { kInput, kAccumulator, kMask, kOffsets };

std::string shape_str(const int64_t* shape, int ndim) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < ndim; ++i) s << (i ? ", " : "") << shape[i];
  if (ndim == 1) s << ",";
  s << ")";
  return s.str();
}

std::string dl_dtype_str(DLDataType t) {
  const char* base = "?";
  switch (t.code) {
    case kDLInt: base = "int"; break;
    case kDLUInt: base = "uint"; break;
    case kDLFloat: base = "float"; break;
    case kDLBfloat: base = "bfloat"; break;
    case kDLComplex: base = "complex"; break;
    case kDLBool: base = "bool"; break;
    default: break;
  }
  std::string s = std::string(base) + std::to_string(t.bits);
  if (t.code == kDLBool) s = "bool";
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

bool dl_to_dtype(DLDataType t, gmattn::DType* out) {
  if (t.lanes != 1) return false;
  if (t.code == kDLFloat && t.bits == 16) { *out = gmattn::DType::kFloat16; return true; }
  if (t.code == kDLBfloat && t.bits == 16) { *out = gmattn::DType::kBFloat16; return true; }
  if (t.code == kDLFloat && t.bits == 32) { *out = gmattn::DType::kFloat32; return true; }
  if (t.code == kDLFloat && t.bits == 64) { *out = gmattn::DType::kFloat64; return true; }
  return false;
}

const char* device_type_name(int t) {
  switch (t) {
    case kDLCPU: return "CPU";
    case kDLCUDA: return "CUDA";
    case kDLCUDAHost: return "CUDA pinned host";
    case kDLCUDAManaged: return "CUDA managed";
    case kDLROCM: return "ROCm";
    case kDLMetal: return "Metal";
    case kDLVulkan: return "Vulkan";
    case kDLOneAPI: return "oneAPI";
    case kDLExtDev: return "extension-device (e.g. torch 'meta')";
    default: return "unknown-device";
  }
}

[[noreturn]] void fail(const std::string& arg, const std::string& what) {
  throw py::value_error("gmattn: argument '" + arg + "' " + what);
}

// Re-raises a producer's exception with the same type, chained, naming the argument: "boom" from
// some __dlpack__ alone does not say which of twenty arguments it came from.
[[noreturn]] void rethrow_named(py::error_already_set& e, const std::string& arg, const char* method) {
  const std::string what = "gmattn: argument '" + arg + "': its " + method + " raised " +
                           std::string(py::str(e.type().attr("__name__"))) + ": " + std::string(py::str(e.value()));
  py::raise_from(e, e.type().ptr(), what.c_str());
  throw py::error_already_set();
}

// An array read through the buffer protocol (the CPU step entry's NumPy arrays: a buffer costs a
// small part of a DLPack export), described as a DLTensor; the buffer is released with it.
struct BufferImport {
  Py_buffer buf{};
  DLTensor t{};
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 0};
  BufferImport() = default;
  BufferImport(const BufferImport&) = delete;
  BufferImport& operator=(const BufferImport&) = delete;
  ~BufferImport() { PyBuffer_Release(&buf); }  // (nothing to release when buf.obj is null)
};

// One imported tensor: a DLPack capsule, or a buffer (BufferImport). Owns the capsule: the
// producer's capsule destructor releases the tensor (the name stays "dltensor"), so nothing
// leaks whether we return or throw.
struct Imported {
  py::object capsule;
  std::unique_ptr<BufferImport> buffer;
  DLTensor* t = nullptr;
  bool read_only = false;
};

struct DLDeviceOf {
  int type = -1;
  int id = -1;
};

// The protocol's attribute names and the CPU module's __dlpack__ keywords, made once: a call
// looks them up for a dozen arrays, and names made from C strings each time (decoded, hashed)
// cost as much as a short call's kernel. Never freed (they live as long as the module).
struct DLPackNames {
  PyObject* dlpack = PyUnicode_InternFromString("__dlpack__");
  PyObject* dlpack_device = PyUnicode_InternFromString("__dlpack_device__");
  PyObject* no_args = PyTuple_New(0);
  PyObject* v1_keywords = py::dict(py::arg("max_version") = py::make_tuple(1, 0)).release().ptr();
};
const DLPackNames& dlpack_names() {
  static const DLPackNames* names = new DLPackNames;
  return *names;
}

// Asks the producer where the data lives (__dlpack_device__), before exporting: a stream argument
// means nothing to a CPU producer (NumPy rejects it), a tensor on the wrong device should say so
// plainly, and a CUDA tensor's device must be current when it is exported (torch refuses others).
// Returns type -1 when the producer has no __dlpack_device__.
DLDeviceOf query_device(py::handle obj, const std::string& arg) {
  const DLPackNames& names = dlpack_names();
  if (!py::hasattr(obj, py::handle(names.dlpack))) {
    fail(arg, "must be an array that supports DLPack (torch.Tensor, numpy.ndarray, mx.array), got " +
                  std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  DLDeviceOf dev;
  if (!py::hasattr(obj, py::handle(names.dlpack_device))) return dev;
  try {
    py::object answer = obj.attr(py::handle(names.dlpack_device))();
    if (!py::isinstance<py::tuple>(answer) && !py::isinstance<py::list>(answer)) throw py::cast_error();
    py::sequence pair = answer;
    if (py::len(pair) != 2) throw py::cast_error();
    dev.type = pair[0].cast<int>();
    dev.id = pair[1].cast<int>();
  } catch (const py::cast_error&) {
    fail(arg, "has a __dlpack_device__() that did not return a (device_type, device_id) pair of integers");
  } catch (py::error_already_set& e) {
    rethrow_named(e, arg, "__dlpack_device__()");
  }
  if (dev.type != kDevice) {
    fail(arg, std::string("must be on the ") + kDeviceName + " device for this module, got a " +
                  device_type_name(dev.type) + " array");
  }
  return dev;
}

// The __dlpack__(stream=...) value that names the caller's CUDA stream `handle` (a cudaStream_t):
// DLPack numbers the legacy default stream 1 and the per-thread default stream 2, and forbids 0
// (torch refuses it, and the per-thread default too); any other stream is its handle. The legacy
// default stream's handle is 0 (what torch reports for it) or cudaStreamLegacy (1).
int64_t dlpack_stream(int64_t handle) { return handle == 0 ? 1 : handle; }

// The tensor of a DLPack capsule (versioned or legacy), kept alive by `im`; `not_dlpack`: the
// message for a capsule of another kind.
void open_capsule(Imported& im, const std::string& arg, const char* not_dlpack) {
  PyObject* c = im.capsule.ptr();
  if (PyCapsule_IsValid(c, "dltensor_versioned")) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, "dltensor_versioned"));
    if (m->version.major > 1) fail(arg, "was exported with an unsupported DLPack major version");
    im.t = &m->dl_tensor;
    im.read_only = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
  } else if (PyCapsule_IsValid(c, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
    im.t = &m->dl_tensor;
  } else {
    fail(arg, not_dlpack);
  }
}

// Exports `obj` through DLPack. `device_id` >= 0: the CUDA device the call runs on (made current
// by the caller), which the array must be on. The CPU module also takes a DLPack capsule itself
// (the torch front end passes torch's, exported without the Python-level __dlpack__, which costs
// more than a short call's kernel); its device is checked with the rest of the tensor (make_view).
Imported import_dlpack(py::handle obj, const std::string& arg, int64_t stream, int device_id) {
  if (kDevice == kDLCPU && PyCapsule_CheckExact(obj.ptr())) {
    Imported im;
    im.capsule = py::reinterpret_borrow<py::object>(obj);
    open_capsule(im, arg, "is a capsule but not an unused DLPack tensor (a DLPack capsule is consumed once)");
    return im;
  }
  const DLDeviceOf dev = query_device(obj, arg);
  if (kDevice == kDLCUDA && dev.type == kDLCUDA && device_id >= 0 && dev.id != device_id) {
    fail(arg, "is on CUDA device " + std::to_string(dev.id) + ", expected device " + std::to_string(device_id) +
                  " like q");
  }
  const DLPackNames& names = dlpack_names();
  py::object fn = obj.attr(py::handle(names.dlpack));
  py::object cap;
  // DLPack >= 1.0 carries a read-only flag; older producers only speak the legacy protocol.
  try {
    try {
      if (kDevice == kDLCUDA) {
        py::dict kw;
        kw["max_version"] = py::make_tuple(1, 0);
        kw["stream"] = py::int_(dlpack_stream(stream));
        cap = fn(**kw);
      } else {
        cap = py::reinterpret_steal<py::object>(PyObject_Call(fn.ptr(), names.no_args, names.v1_keywords));
        if (!cap) throw py::error_already_set();
      }
    } catch (py::error_already_set& e) {
      if (!e.matches(PyExc_TypeError)) throw;  // a producer without max_version (DLPack < 1.0)
      py::dict legacy;
      if (kDevice == kDLCUDA) legacy["stream"] = py::int_(dlpack_stream(stream));
      cap = fn(**legacy);
    }
  } catch (py::error_already_set& e) {
    rethrow_named(e, arg, "__dlpack__()");
  }
  Imported im;
  im.capsule = cap;
  open_capsule(im, arg, "__dlpack__() did not return a DLPack capsule");
  return im;
}

#ifndef GMATTN_BACKEND_CUDA
// The CPU step entry's import: a DLPack capsule (as import_dlpack takes one), else an array with
// the buffer protocol holding float16, float32 or float64 in the machine's byte order, at most 4
// dimensions, strides in whole elements (NumPy's arrays). Anything else fails (the step entry then
// leaves the call to forward).
Imported import_buffer(py::handle obj, const char* arg) {
  Imported im;
  if (PyCapsule_CheckExact(obj.ptr())) {
    im.capsule = py::reinterpret_borrow<py::object>(obj);
    open_capsule(im, arg, "is a capsule but not an unused DLPack tensor (a DLPack capsule is consumed once)");
    return im;
  }
  im.buffer = std::make_unique<BufferImport>();
  BufferImport& b = *im.buffer;
  if (!PyObject_CheckBuffer(obj.ptr()) || PyObject_GetBuffer(obj.ptr(), &b.buf, PyBUF_RECORDS_RO) != 0) {
    PyErr_Clear();
    fail(arg, "is neither a DLPack capsule nor an array with the buffer protocol");
  }
  const char* f = b.buf.format;
  if (f != nullptr && (f[0] == '@' || f[0] == '=')) ++f;  // the machine's byte order ('=': NumPy's unaligned arrays)
  const int itemsize = static_cast<int>(b.buf.itemsize);
  uint8_t bits = 0;
  if (f != nullptr && f[0] != '\0' && f[1] == '\0') {
    if (f[0] == 'e' && itemsize == 2) bits = 16;
    if (f[0] == 'f' && itemsize == 4) bits = 32;
    if (f[0] == 'd' && itemsize == 8) bits = 64;
  }
  if (bits == 0 || b.buf.ndim > 4) fail(arg, "is not a floating array of at most 4 dimensions");
  b.t.data = b.buf.buf;
  b.t.device = {kDLCPU, 0};
  b.t.ndim = b.buf.ndim;
  b.t.dtype = {static_cast<uint8_t>(kDLFloat), bits, 1};
  for (int i = 0; i < b.buf.ndim; ++i) {
    b.shape[i] = b.buf.shape[i];
    if (b.buf.strides[i] % itemsize != 0) fail(arg, "has strides that are not whole elements");
    b.strides[i] = b.buf.strides[i] / itemsize;
  }
  b.t.shape = b.shape;
  b.t.strides = b.strides;
  b.t.byte_offset = 0;
  im.t = &b.t;
  im.read_only = b.buf.readonly != 0;
  return im;
}
#endif

struct Spec {
  const char* name;
  std::vector<int64_t> shape;  // expected shape
  Kind kind;
  bool output;
  bool contiguous;  // outputs must be C-contiguous: no aliasing, no gaps
};

// Validates an imported tensor against its spec and fills a View. `dtype` is the input dtype
// of this call (set by the first input tensor when unknown).
gmattn::View make_view(const Imported& im, const Spec& spec, gmattn::DType input_dtype,
                       int device_id) {
  const DLTensor* t = im.t;
  const std::string arg = spec.name;
  const int ndim = static_cast<int>(spec.shape.size());
  if (t->device.device_type != kDevice) {
    fail(arg, std::string("must be on the ") + kDeviceName + " device for this module, got a " +
                  device_type_name(t->device.device_type) + " array");
  }
  if (kDevice == kDLCUDA && t->device.device_id != device_id) {
    fail(arg, "is on CUDA device " + std::to_string(t->device.device_id) + ", expected device " +
                  std::to_string(device_id) + " like q");
  }
  if (t->ndim != ndim) {
    fail(arg, "must have " + std::to_string(ndim) + " dimensions " + shape_str(spec.shape.data(), ndim) +
                  ", got " + std::to_string(t->ndim) + " dimensions " + shape_str(t->shape, t->ndim));
  }
  for (int i = 0; i < ndim; ++i) {
    if (t->shape[i] != spec.shape[i]) {
      fail(arg, "must have shape " + shape_str(spec.shape.data(), ndim) + ", got " + shape_str(t->shape, ndim));
    }
  }
  // dtype
  if (spec.kind == Kind::kMask) {
    const bool ok = t->dtype.lanes == 1 && t->dtype.bits == 8 && (t->dtype.code == kDLBool || t->dtype.code == kDLUInt);
    if (!ok) fail(arg, "must be bool (or uint8), got " + dl_dtype_str(t->dtype));
  } else if (spec.kind == Kind::kOffsets) {
    const bool ok = t->dtype.lanes == 1 && t->dtype.bits == 64 && t->dtype.code == kDLInt;
    if (!ok) fail(arg, "must be int64, got " + dl_dtype_str(t->dtype));
  } else {
    gmattn::DType dt;
    if (!dl_to_dtype(t->dtype, &dt)) {
      fail(arg, "must be a floating tensor (float16, bfloat16, float32 or float64), got " + dl_dtype_str(t->dtype));
    }
    const gmattn::DType want =
        spec.kind == Kind::kInput ? input_dtype : gmattn::accumulator_dtype(input_dtype);
    if (dt != want) {
      fail(arg, std::string("must be ") + gmattn::dtype_name(want) + " (inputs are " +
                    gmattn::dtype_name(input_dtype) + "), got " + gmattn::dtype_name(dt));
    }
  }
  if (spec.output && im.read_only) fail(arg, "is read-only but is written by the kernel");
  gmattn::View v;
  int64_t numel = 1;
  for (int i = 0; i < ndim; ++i) {
    if (spec.shape[i] < 0) fail(arg, "has a negative dimension");
    if (spec.shape[i] != 0 && numel > std::numeric_limits<int64_t>::max() / spec.shape[i]) {
      fail(arg, "has more elements than fit in a 64-bit index");
    }
    numel *= spec.shape[i];
  }
  // strides (elements); compact row-major when absent
  int64_t expect = 1;
  int64_t span_hi = 0, span_lo = 0;  // reachable element offsets, for overflow checks
  for (int i = ndim - 1; i >= 0; --i) {
    const int64_t stride = t->strides ? t->strides[i] : expect;
    v.shape[i] = spec.shape[i];
    v.stride[i] = stride;
    if (spec.shape[i] > 1) {
      const int64_t extent = spec.shape[i] - 1;
      const int64_t mag = stride < 0 ? -stride : stride;
      if (mag != 0 && extent > std::numeric_limits<int64_t>::max() / 4 / mag) {
        fail(arg, "has strides whose offsets overflow a 64-bit index");
      }
      (stride < 0 ? span_lo : span_hi) += extent * stride;
      if (span_hi > std::numeric_limits<int64_t>::max() / 4 || span_lo < std::numeric_limits<int64_t>::min() / 4) {
        fail(arg, "has strides whose offsets overflow a 64-bit index");
      }
      if (spec.contiguous && stride != expect) {
        fail(arg, "must be C-contiguous (it is written by the kernel), got strides " + shape_str(t->strides, ndim));
      }
    }
    expect *= spec.shape[i] > 0 ? spec.shape[i] : 1;
  }
  if (numel > 0 && t->data == nullptr) fail(arg, "has a null data pointer");
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  if (numel == 0) v.data = nullptr;
  return v;
}

struct Call {
#ifdef GMATTN_BACKEND_CUDA
  // q's device, current from before the first export until the capsules are released (declared
  // first: destroyed last).
  std::unique_ptr<gmattn::cuda::DeviceGuard> device_guard;
#endif
  gmattn::Dims dims;
  gmattn::DType dtype;
  int device_id = -1;
  int64_t stream = 0;
  std::vector<Imported> keep;  // capsules alive until the kernel returns
  // Aligned copies of inputs whose data is not aligned to their element size (see view()).
  std::vector<std::unique_ptr<std::max_align_t[]>> aligned_copies;
  // Bytes [lo, hi) each present tensor can reach, and whether the kernel writes it.
  struct Extent {
    std::string name;
    uintptr_t lo, hi;
    bool output;
  };
  std::vector<Extent> extents;

  // Imports `obj` (None allowed when optional) and validates it; returns an empty View for None.
  gmattn::View view(py::handle obj, const Spec& spec, bool optional) {
    if (obj.is_none()) {
      if (!optional) fail(spec.name, "is required");
      return gmattn::View{};
    }
    keep.push_back(import_dlpack(obj, spec.name, stream, device_id));
    return adopt(spec);
  }

  // Validates an array already imported (import_buffer) and keeps it; returns its View.
  gmattn::View view(Imported&& im, const Spec& spec) {
    keep.push_back(std::move(im));
    return adopt(spec);
  }

  // Packed sequences: `obj` (None: each batch row is one sequence) must be S + 1 int64 offsets
  // that run from 0 to N and never decrease, with B = 1 and no mask. Sets `seqs` to the number of
  // sequences, S (B without offsets): the state tensors have it in place of B.
  gmattn::View sequences(py::handle obj, bool has_mask, int64_t& seqs) {
    seqs = dims.B;
    if (obj.is_none()) return gmattn::View{};
    const char* arg = "cu_seqlens";
    keep.push_back(import_dlpack(obj, arg, stream, device_id));
    const DLTensor* t = keep.back().t;
    if (t->ndim != 1 || t->shape[0] < 2) {
      fail(arg, "must be a 1-D array of S + 1 >= 2 offsets (S sequences), got shape " + shape_str(t->shape, t->ndim));
    }
    const gmattn::View v = adopt({arg, {t->shape[0]}, Kind::kOffsets, false, false});
    if (dims.B != 1) {
      fail(arg, "packs the sequences into one row: q, k, v must have B = 1, got B = " + std::to_string(dims.B));
    }
    if (has_mask) fail(arg, "and key_padding_mask cannot be combined: pack only the real tokens");
    seqs = t->shape[0] - 1;
    // CUDA: the offsets are in device memory and reading them here would synchronise with the GPU;
    // the kernels clamp them into [0, N], non-decreasing, so bad values cannot reach outside the
    // tensors (docs/api.md).
    if (kDevice != kDLCPU) return v;
    const auto offset = [&](int64_t i) { return static_cast<const int64_t*>(v.data)[i * v.stride[0]]; };
    if (offset(0) != 0) fail(arg, "must start at 0, got " + std::to_string(offset(0)));
    if (offset(seqs) != dims.N) {
      fail(arg, "must end at N = " + std::to_string(dims.N) + " (the tokens of q), got " + std::to_string(offset(seqs)));
    }
    for (int64_t i = 0; i < seqs; ++i) {
      if (offset(i + 1) < offset(i)) {
        fail(arg, "must not decrease, got " + std::to_string(offset(i)) + " then " + std::to_string(offset(i + 1)) +
                      " at " + std::to_string(i));
      }
    }
    return v;
  }

  // Validates the tensor imported last (keep.back()) against `spec`; returns its View.
  gmattn::View adopt(const Spec& spec) {
    gmattn::View v = make_view(keep.back(), spec, dtype, device_id);
    if (v.data == nullptr) {
      v.data = reinterpret_cast<void*>(alignof(std::max_align_t));  // present but empty
      return v;
    }
    // make_view bounds every reachable element offset by 2^61, so this arithmetic cannot wrap
    // for real memory; unsigned keeps it defined for producers that lie.
    const uint64_t itemsize = (keep.back().t->dtype.bits * keep.back().t->dtype.lanes + 7) / 8;
    uintptr_t lo = reinterpret_cast<uintptr_t>(v.data), hi = lo + itemsize;
    for (size_t i = 0; i < spec.shape.size(); ++i) {
      if (spec.shape[i] <= 1) continue;
      const int64_t reach = (spec.shape[i] - 1) * v.stride[i];
      if (reach < 0) lo -= static_cast<uint64_t>(-reach) * itemsize;
      else hi += static_cast<uint64_t>(reach) * itemsize;
    }
    extents.push_back({spec.name, lo, hi, spec.output});
    // The kernels load elements through typed pointers: data that is not aligned to its element
    // size (a view at an odd byte offset, which DLPack allows) is undefined behaviour for them
    // and faults on some machines. An input on the CPU is copied once into aligned memory (the
    // bytes it can reach, same strides); an output or a device array is refused.
    if (reinterpret_cast<uintptr_t>(v.data) % itemsize != 0) {
      if (spec.output || kDevice != kDLCPU) {
        fail(spec.name, "has data at an address that is not a multiple of its element size (" +
                            std::to_string(itemsize) + " bytes)");
      }
      const uintptr_t bytes = hi - lo;
      aligned_copies.emplace_back(new std::max_align_t[(bytes + sizeof(std::max_align_t) - 1) /
                                                       sizeof(std::max_align_t)]);
      char* copy = reinterpret_cast<char*>(aligned_copies.back().get());
      std::memcpy(copy, reinterpret_cast<const void*>(lo), bytes);
      v.data = copy + (reinterpret_cast<uintptr_t>(v.data) - lo);
    }
    return v;
  }

  // CUDA: `allocate_workspace(nbytes)` (the caller's allocator; None: the core allocates) returns
  // an array of at least `bytes` writable bytes on the call's device, used as the call's workspace
  // and kept alive until the kernels are launched (stream-ordered allocators such as torch's
  // caching allocator reuse it only after the call's work on the stream).
  void provide_workspace(gmattn::Options& opt, size_t bytes, py::handle allocate_workspace) {
    if (allocate_workspace.is_none() || bytes == 0) return;
    const std::string arg = "allocate_workspace";
    py::object block;
    try {
      block = allocate_workspace(bytes);
    } catch (py::error_already_set& e) {
      rethrow_named(e, arg, "call");
    }
    keep.push_back(import_dlpack(block, "the array allocate_workspace returned", stream, device_id));
    const DLTensor* t = keep.back().t;
    if (t->device.device_type != kDevice || t->device.device_id != device_id) {
      fail(arg, "must return an array on CUDA device " + std::to_string(device_id) + ", got " +
                    device_type_name(t->device.device_type) + " device " + std::to_string(t->device.device_id));
    }
    if (keep.back().read_only) fail(arg, "returned a read-only array");
    const uint64_t itemsize = (t->dtype.bits * t->dtype.lanes + 7) / 8;
    uint64_t numel = 1, expect = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
      if (t->shape[i] < 0) fail(arg, "returned an array with a negative dimension");
      if (t->strides && t->shape[i] > 1 && t->strides[i] != static_cast<int64_t>(expect)) {
        fail(arg, "must return a contiguous array");
      }
      numel *= static_cast<uint64_t>(t->shape[i]);
      expect *= static_cast<uint64_t>(t->shape[i]);
    }
    const uint64_t nbytes = numel * itemsize;
    if (nbytes < bytes) {
      fail(arg, "returned " + std::to_string(nbytes) + " bytes, the call needs " + std::to_string(bytes));
    }
    opt.workspace = static_cast<char*>(t->data) + t->byte_offset;
    opt.workspace_bytes = nbytes;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(opt.workspace);
    extents.push_back({"workspace", lo, lo + nbytes, true});
  }

  // Outputs must not share memory with any other argument: the kernels read inputs after writing
  // outputs (dout in the causal reverse scan, gk before gq), so aliasing gives wrong answers.
  void check_overlaps() const {
    for (const Extent& a : extents) {
      if (!a.output) continue;
      for (const Extent& b : extents) {
        if (&a != &b && a.lo < b.hi && b.lo < a.hi) {
          fail(a.name, "shares memory with '" + b.name + "': outputs must not overlap any other argument");
        }
      }
    }
  }
};

// Reads B, N, H, D from q, Dv from v, K from mu, and the input dtype from q: the shapes every
// other argument is checked against.
void set_dims(Call& c, const Imported& iq, const Imported& iv, const Imported& imu) {
  if (iq.t->ndim != 4) fail("q", "must have 4 dimensions (B, N, H, D), got " + shape_str(iq.t->shape, iq.t->ndim));
  if (iv.t->ndim != 4) fail("v", "must have 4 dimensions (B, N, H, Dv), got " + shape_str(iv.t->shape, iv.t->ndim));
  if (imu.t->ndim != 3) fail("mu", "must have 3 dimensions (H, K, D), got " + shape_str(imu.t->shape, imu.t->ndim));
  if (!dl_to_dtype(iq.t->dtype, &c.dtype)) {
    fail("q", "must be a floating tensor (float16, bfloat16, float32 or float64), got " + dl_dtype_str(iq.t->dtype));
  }
  c.dims.B = iq.t->shape[0];
  c.dims.N = iq.t->shape[1];
  c.dims.H = iq.t->shape[2];
  c.dims.D = iq.t->shape[3];
  c.dims.Dv = iv.t->shape[3];
  c.dims.K = imu.t->shape[1];
  const gmattn::Dims& d = c.dims;
  if (d.B < 1) fail("q", "must have a batch size B >= 1, got shape " + shape_str(iq.t->shape, 4));
  if (d.N < 1) fail("q", "must have a sequence length N >= 1, got shape " + shape_str(iq.t->shape, 4));
  if (d.H < 1) fail("q", "must have at least one head, got shape " + shape_str(iq.t->shape, 4));
  if (d.D < 1) fail("q", "must have a routing dimension D >= 1, got shape " + shape_str(iq.t->shape, 4));
  if (d.Dv < 1) fail("v", "must have a value dimension Dv >= 1, got shape " + shape_str(iv.t->shape, 4));
  if (d.K < 1) fail("mu", "must have at least one component (K >= 1), got shape " + shape_str(imu.t->shape, 3));
  // Kernels index rows and components with 64-bit offsets but loop counters of 32 bits.
  const int64_t i32max = std::numeric_limits<int32_t>::max();
  // B and H first, so that B * H cannot overflow.
  if (d.B > i32max || d.H > i32max || d.B * d.H > i32max || d.N > i32max || d.D > i32max) {
    fail("q", "has a dimension larger than 2^31-1 (or B * H > 2^31-1), which the kernels do not support");
  }
  if (d.Dv > i32max) fail("v", "has a dimension larger than 2^31-1, which the kernels do not support");
  if (d.K > i32max) fail("mu", "has a dimension larger than 2^31-1, which the kernels do not support");
}

// Starts a call on q's device: exports q, v and mu for set_dims.
Call start_call(py::handle q, py::handle v, py::handle mu, int64_t stream) {
  Call c;
  if (kDevice == kDLCUDA && stream < 0) {
    fail("stream", "must be a CUDA stream handle (cudaStream_t as an integer >= 0; 0 = the default stream), got " +
                       std::to_string(stream));
  }
  c.stream = stream;
#ifdef GMATTN_BACKEND_CUDA
  const DLDeviceOf q_device = query_device(q, "q");
  if (q_device.type == kDLCUDA) {
    c.device_id = q_device.id;
    c.device_guard = std::make_unique<gmattn::cuda::DeviceGuard>(q_device.id);
  }
#endif
  Imported iq = import_dlpack(q, "q", stream, c.device_id);
  if (kDevice == kDLCUDA && c.device_id >= 0 && iq.t->device.device_id != c.device_id) {
    fail("q", "was exported on CUDA device " + std::to_string(iq.t->device.device_id) +
                  " but its __dlpack_device__() said " + std::to_string(c.device_id));
  }
  c.device_id = iq.t->device.device_id;
#ifdef GMATTN_BACKEND_CUDA
  if (!c.device_guard) c.device_guard = std::make_unique<gmattn::cuda::DeviceGuard>(c.device_id);
#endif
  Imported iv = import_dlpack(v, "v", stream, c.device_id);
  Imported imu = import_dlpack(mu, "mu", stream, c.device_id);
  set_dims(c, iq, iv, imu);
  return c;
}

gmattn::Options make_options(const Call& c, bool causal, double eps, double sigma_eps, int num_threads,
                             bool deterministic) {
  const gmattn::DType dtype = c.dtype;
  // The kernels use eps and sigma_eps in the accumulator dtype: inf, NaN or a value that
  // overflows float32 would turn every output into 0 or NaN without a word.
  const gmattn::DType acc = gmattn::accumulator_dtype(dtype);
  const double limit = acc == gmattn::DType::kFloat64 ? std::numeric_limits<double>::max()
                                                       : static_cast<double>(std::numeric_limits<float>::max());
  const std::string range = std::string(" (finite in ") + gmattn::dtype_name(acc) + "), got ";
  if (!(eps >= 0.0 && eps <= limit)) fail("eps", "must be a non-negative number" + range + std::to_string(eps));
  if (!(sigma_eps > 0.0 && sigma_eps <= limit)) {
    fail("sigma_eps", "must be a positive number" + range + std::to_string(sigma_eps));
  }
  if (num_threads < 0) fail("num_threads", "must be >= 0 (0 = default), got " + std::to_string(num_threads));
  gmattn::Options o;
  o.causal = causal;
  o.eps = eps;
  o.sigma_eps = sigma_eps;
  o.num_threads = num_threads;
  o.stream = reinterpret_cast<void*>(static_cast<intptr_t>(c.stream));
  o.deterministic = deterministic;
  if (kDevice == kDLCUDA) o.device = c.device_id;
  return o;
}

#ifndef GMATTN_BACKEND_CUDA
// The CPU kernels take their scratch memory from the core's own buffer cache.
void refuse_workspace(py::handle allocate_workspace) {
  if (!allocate_workspace.is_none()) fail("allocate_workspace", "is for the CUDA module only; give None");
}
#endif

// The forward pass's inputs, shared by ForwardArgs and BackwardArgs (same member names). Returns
// the number of sequences (B, or S with packed sequences), which the state tensors have first.
// With `state_written` (the forward's state_in_place) the initial state is also an output: it
// must be writable and C-contiguous, and may share memory with no other argument.
template <class Args>
int64_t import_forward_inputs(Call& c, Args& a, py::handle q, py::handle k, py::handle v, py::handle mu,
                              py::handle omega, py::handle alpha, py::handle mask, py::handle S0, py::handle z0,
                              py::handle cu_seqlens, bool state_written = false) {
  const gmattn::Dims& d = c.dims;
  a.q = c.view(q, {"q", {d.B, d.N, d.H, d.D}, Kind::kInput, false, false}, false);
  a.k = c.view(k, {"k", {d.B, d.N, d.H, d.D}, Kind::kInput, false, false}, false);
  a.v = c.view(v, {"v", {d.B, d.N, d.H, d.Dv}, Kind::kInput, false, false}, false);
  a.mu = c.view(mu, {"mu", {d.H, d.K, d.D}, Kind::kAccumulator, false, false}, false);
  a.omega = c.view(omega, {"omega", {d.H, d.K, d.D}, Kind::kAccumulator, false, false}, false);
  a.alpha = c.view(alpha, {"alpha", {d.H, d.K}, Kind::kAccumulator, false, false}, false);
  a.mask = c.view(mask, {"key_padding_mask", {d.B, d.N}, Kind::kMask, false, false}, true);
  int64_t seqs = 0;
  a.cu_seqlens = c.sequences(cu_seqlens, a.mask.present(), seqs);
  a.S0 = c.view(S0, {"initial_state[0] (S)", {seqs, d.H, d.K, d.Dv}, Kind::kAccumulator, state_written, state_written},
                true);
  a.z0 = c.view(z0, {"initial_state[1] (z)", {seqs, d.H, d.K}, Kind::kAccumulator, state_written, state_written}, true);
  if (a.S0.present() != a.z0.present()) fail("initial_state", "must give both S and z, or neither");
  return seqs;
}

void forward(py::handle q, py::handle k, py::handle v, py::handle mu, py::handle omega, py::handle alpha,
             py::handle mask, py::handle S0, py::handle z0, py::handle out, py::handle S_final,
             py::handle z_final, py::handle gq, py::handle gk, py::handle den, bool causal, double eps,
             double sigma_eps, int num_threads, int64_t stream, py::handle allocate_workspace, py::handle cu_seqlens,
             bool state_in_place) {
  // state_in_place: the final state overwrites the initial state's arrays (a decoding loop's
  // carried state, without new arrays per step). The CPU kernels read each sequence's initial state
  // before they write its final state (gmattn.h).
  if (state_in_place) {
    if (kDevice != kDLCPU) fail("state_in_place", "is for the CPU module only");
    if (S0.is_none() || z0.is_none()) fail("state_in_place", "needs an initial state (S0, z0) to update");
    if (!S_final.is_none() || !z_final.is_none()) {
      fail("state_in_place", "writes the final state into S0 and z0: give no S_final, z_final");
    }
  }
  Call c = start_call(q, v, mu, stream);
  const auto& d = c.dims;
  gmattn::ForwardArgs a;
  a.dims = d;
  a.dtype = c.dtype;
  a.opt = make_options(c, causal, eps, sigma_eps, num_threads, true);
  const int64_t seqs =
      import_forward_inputs(c, a, q, k, v, mu, omega, alpha, mask, S0, z0, cu_seqlens, state_in_place);
  a.out = c.view(out, {"out", {d.B, d.N, d.H, d.Dv}, Kind::kInput, true, true}, false);
  if (state_in_place) {
    a.S_final = a.S0;
    a.z_final = a.z0;
  } else {
    a.S_final = c.view(S_final, {"S_final", {seqs, d.H, d.K, d.Dv}, Kind::kAccumulator, true, true}, true);
    a.z_final = c.view(z_final, {"z_final", {seqs, d.H, d.K}, Kind::kAccumulator, true, true}, true);
  }
  if (a.S_final.present() != a.z_final.present()) fail("S_final", "and z_final must be given together");
  a.gq = c.view(gq, {"gq", {d.B, d.H, d.N, d.K}, Kind::kAccumulator, true, true}, true);
  a.gk = c.view(gk, {"gk", {d.B, d.H, d.N, d.K}, Kind::kAccumulator, true, true}, true);
  a.den = c.view(den, {"den", {d.B, d.H, d.N}, Kind::kAccumulator, true, true}, true);
  if (a.gq.present() != a.gk.present() || a.gq.present() != a.den.present()) {
    fail("gq", "gk and den (saved for backward) must be given together");
  }
#ifdef GMATTN_BACKEND_CUDA
  c.provide_workspace(a.opt, gmattn::cuda::forward_workspace_bytes(a), allocate_workspace);
#else
  refuse_workspace(allocate_workspace);
#endif
  c.check_overlaps();
  py::gil_scoped_release release;
#ifdef GMATTN_BACKEND_CUDA
  gmattn::cuda::forward(a);
#else
  gmattn::cpu::forward(a);
#endif
}

#ifndef GMATTN_BACKEND_CUDA
// The CPU module's plain forward, for decoding steps and other short calls, where forward's own
// cost is most of the call: no mask, no packed sequences, nothing saved for a backward; arrays
// through the buffer protocol (NumPy) or as DLPack capsules; every argument by position. The
// final state goes to S_final, z_final (None: not asked for) or, when they are S0 and z0
// themselves, into the initial state (forward's state_in_place). forward's checks all apply;
// where one fails, or an array is of another kind, it runs nothing and returns False: the caller
// then calls forward (or its front end's general path), whose checks name the argument.
bool step(py::handle q, py::handle k, py::handle v, py::handle mu, py::handle omega, py::handle alpha,
          py::handle S0, py::handle z0, py::handle out, py::handle S_final, py::handle z_final, bool causal,
          double eps, double sigma_eps, int num_threads) {
  Call c;
  gmattn::ForwardArgs a;
  try {
    if (S0.is_none() != z0.is_none() || S_final.is_none() != z_final.is_none()) return false;
    const bool in_place = !S0.is_none() && S_final.is(S0) && z_final.is(z0);
    c.keep.reserve(11);
    Imported iq = import_buffer(q, "q"), iv = import_buffer(v, "v"), imu = import_buffer(mu, "mu");
    set_dims(c, iq, iv, imu);
    const auto& d = c.dims;
    a.dims = d;
    a.dtype = c.dtype;
    a.opt = make_options(c, causal, eps, sigma_eps, num_threads, true);
    a.q = c.view(std::move(iq), {"q", {d.B, d.N, d.H, d.D}, Kind::kInput, false, false});
    a.k = c.view(import_buffer(k, "k"), {"k", {d.B, d.N, d.H, d.D}, Kind::kInput, false, false});
    a.v = c.view(std::move(iv), {"v", {d.B, d.N, d.H, d.Dv}, Kind::kInput, false, false});
    a.mu = c.view(std::move(imu), {"mu", {d.H, d.K, d.D}, Kind::kAccumulator, false, false});
    a.omega = c.view(import_buffer(omega, "omega"), {"omega", {d.H, d.K, d.D}, Kind::kAccumulator, false, false});
    a.alpha = c.view(import_buffer(alpha, "alpha"), {"alpha", {d.H, d.K}, Kind::kAccumulator, false, false});
    if (!S0.is_none()) {
      a.S0 = c.view(import_buffer(S0, "S0"), {"S0", {d.B, d.H, d.K, d.Dv}, Kind::kAccumulator, in_place, in_place});
      a.z0 = c.view(import_buffer(z0, "z0"), {"z0", {d.B, d.H, d.K}, Kind::kAccumulator, in_place, in_place});
    }
    a.out = c.view(import_buffer(out, "out"), {"out", {d.B, d.N, d.H, d.Dv}, Kind::kInput, true, true});
    if (in_place) {
      a.S_final = a.S0;
      a.z_final = a.z0;
    } else if (!S_final.is_none()) {
      a.S_final = c.view(import_buffer(S_final, "S_final"),
                         {"S_final", {d.B, d.H, d.K, d.Dv}, Kind::kAccumulator, true, true});
      a.z_final =
          c.view(import_buffer(z_final, "z_final"), {"z_final", {d.B, d.H, d.K}, Kind::kAccumulator, true, true});
    }
    c.check_overlaps();
  } catch (const py::builtin_exception&) {  // (forward's checks; nothing has run)
    return false;
  }
  py::gil_scoped_release release;
  gmattn::cpu::forward(a);
  return true;
}
#endif

void backward(py::handle q, py::handle k, py::handle v, py::handle mu, py::handle omega, py::handle alpha,
              py::handle mask, py::handle S0, py::handle z0, py::handle out, py::handle gq, py::handle gk,
              py::handle den, py::handle dout, py::handle dS_final, py::handle dz_final, py::handle dq,
              py::handle dk, py::handle dv, py::handle dmu, py::handle domega, py::handle dalpha,
              py::handle dS0, py::handle dz0, bool causal, double eps, double sigma_eps, int num_threads,
              int64_t stream, bool deterministic, py::handle S_end, py::handle z_end,
              py::handle allocate_workspace, py::handle cu_seqlens) {
  Call c = start_call(q, v, mu, stream);
  const auto& d = c.dims;
  gmattn::BackwardArgs a;
  a.dims = d;
  a.dtype = c.dtype;
  a.opt = make_options(c, causal, eps, sigma_eps, num_threads, deterministic);
  const int64_t seqs = import_forward_inputs(c, a, q, k, v, mu, omega, alpha, mask, S0, z0, cu_seqlens);
  a.out = c.view(out, {"out", {d.B, d.N, d.H, d.Dv}, Kind::kInput, false, false}, false);
  a.gq = c.view(gq, {"gq", {d.B, d.H, d.N, d.K}, Kind::kAccumulator, false, false}, false);
  a.gk = c.view(gk, {"gk", {d.B, d.H, d.N, d.K}, Kind::kAccumulator, false, false}, false);
  a.den = c.view(den, {"den", {d.B, d.H, d.N}, Kind::kAccumulator, false, false}, false);
  a.S_end = c.view(S_end, {"S_end", {seqs, d.H, d.K, d.Dv}, Kind::kAccumulator, false, false}, true);
  a.z_end = c.view(z_end, {"z_end", {seqs, d.H, d.K}, Kind::kAccumulator, false, false}, true);
  if (a.S_end.present() != a.z_end.present()) fail("S_end", "and z_end must be given together");
  if (causal && a.S_end.present()) fail("S_end", "is for the bidirectional backward only (causal=False)");
  a.dout = c.view(dout, {"dout", {d.B, d.N, d.H, d.Dv}, Kind::kInput, false, false}, false);
  a.dS_final = c.view(dS_final, {"dS_final", {seqs, d.H, d.K, d.Dv}, Kind::kAccumulator, false, false}, true);
  a.dz_final = c.view(dz_final, {"dz_final", {seqs, d.H, d.K}, Kind::kAccumulator, false, false}, true);
  a.dq = c.view(dq, {"dq", {d.B, d.N, d.H, d.D}, Kind::kInput, true, true}, false);
  a.dk = c.view(dk, {"dk", {d.B, d.N, d.H, d.D}, Kind::kInput, true, true}, false);
  a.dv = c.view(dv, {"dv", {d.B, d.N, d.H, d.Dv}, Kind::kInput, true, true}, false);
  a.dmu = c.view(dmu, {"dmu", {d.H, d.K, d.D}, Kind::kAccumulator, true, true}, false);
  a.domega = c.view(domega, {"domega", {d.H, d.K, d.D}, Kind::kAccumulator, true, true}, false);
  a.dalpha = c.view(dalpha, {"dalpha", {d.H, d.K}, Kind::kAccumulator, true, true}, false);
  a.dS0 = c.view(dS0, {"dS0", {seqs, d.H, d.K, d.Dv}, Kind::kAccumulator, true, true}, true);
  a.dz0 = c.view(dz0, {"dz0", {seqs, d.H, d.K}, Kind::kAccumulator, true, true}, true);
#ifdef GMATTN_BACKEND_CUDA
  c.provide_workspace(a.opt, gmattn::cuda::backward_workspace_bytes(a), allocate_workspace);
#else
  refuse_workspace(allocate_workspace);
#endif
  c.check_overlaps();
  py::gil_scoped_release release;
#ifdef GMATTN_BACKEND_CUDA
  gmattn::cuda::backward(a);
#else
  gmattn::cpu::backward(a);
#endif
}

#ifndef GMATTN_BACKEND_CUDA
// A block of the CPU core's buffer cache as a writable Python buffer (torch.frombuffer,
// np.frombuffer); the block goes back to the cache when the last view of it is gone.
struct CpuBuffer {
  void* data;
  size_t bytes;
  explicit CpuBuffer(size_t n) : data(gmattn::cpu::acquire_scratch(n)), bytes(n) {}
  CpuBuffer(const CpuBuffer&) = delete;
  CpuBuffer& operator=(const CpuBuffer&) = delete;
  ~CpuBuffer() { gmattn::cpu::release_scratch(data); }
};
#endif

}  // namespace

PYBIND11_MODULE(GMATTN_MODULE_NAME, m) {
  m.doc() = "gmattn compiled core (torch-free): Gaussian Mixture Attention kernels over DLPack tensors";
  m.attr("__version__") = GMATTN_VERSION;
  m.attr("__build_id__") = GMATTN_BUILD_ID;  // gmattn/_ext.py compares it with gmattn/_build_info.py
  m.attr("device") = kDeviceName;
#ifdef GMATTN_BACKEND_CUDA
  m.attr("isa") = "cuda";
#else
  m.attr("isa") = gmattn::cpu::isa();
#endif
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, (std::string("gmattn: ") + e.what()).c_str());
    }
  });
  m.def("forward", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mu"), py::arg("omega"),
        py::arg("alpha"), py::arg("mask"), py::arg("S0"), py::arg("z0"), py::arg("out"), py::arg("S_final"),
        py::arg("z_final"), py::arg("gq"), py::arg("gk"), py::arg("den"), py::arg("causal"), py::arg("eps"),
        py::arg("sigma_eps"), py::arg("num_threads") = 0, py::arg("stream") = 0,
        py::arg("allocate_workspace") = py::none(), py::arg("cu_seqlens") = py::none(),
        py::arg("state_in_place") = false,
        "Forward pass: writes out (and the optional final state and saved tensors) in place. "
        "state_in_place (CPU): the final state is written into S0 and z0 (writable, C-contiguous) "
        "instead of S_final, z_final (which must then be None). "
        "CUDA: stream is the caller's cudaStream_t (0 = the default stream), the kernels run on the "
        "device of q; allocate_workspace(nbytes), when given, returns the device memory for the "
        "call's temporary buffers (an array of at least nbytes bytes on that device). cu_seqlens (int64, "
        "S + 1 offsets from 0 to N): packed sequences in one row (B = 1); the states then have S in place of B.");
  m.def("backward", &backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mu"), py::arg("omega"),
        py::arg("alpha"), py::arg("mask"), py::arg("S0"), py::arg("z0"), py::arg("out"), py::arg("gq"),
        py::arg("gk"), py::arg("den"), py::arg("dout"), py::arg("dS_final"), py::arg("dz_final"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("dmu"), py::arg("domega"), py::arg("dalpha"), py::arg("dS0"),
        py::arg("dz0"), py::arg("causal"), py::arg("eps"), py::arg("sigma_eps"), py::arg("num_threads") = 0,
        py::arg("stream") = 0, py::arg("deterministic") = true, py::arg("S_end") = py::none(),
        py::arg("z_end") = py::none(), py::arg("allocate_workspace") = py::none(),
        py::arg("cu_seqlens") = py::none(),
        "Backward pass: writes dq, dk, dv, dmu, domega, dalpha (and dS0, dz0 when given) in place. "
        "S_end, z_end (bidirectional, optional): the forward's final state, which spares re-summing it. "
        "stream, allocate_workspace: as for forward.");
#ifndef GMATTN_BACKEND_CUDA
  m.def("step", &step,
        "step(q, k, v, mu, omega, alpha, S0, z0, out, S_final, z_final, causal, eps, sigma_eps, num_threads) -> bool. "
        "The plain forward for decoding steps and short calls, arguments by position: no mask, no packed sequences, "
        "nothing saved for a backward; arrays through the buffer protocol (NumPy: float16/32/64) or as DLPack "
        "capsules; S0, z0 and S_final, z_final None or given (S_final, z_final being S0, z0 themselves: the state "
        "updated in place). Returns True when it ran; False, having run nothing, when an argument is of another kind "
        "or would be refused by forward (which then says why).");
#endif
#if defined(GMATTN_CUDA_EMULATION)
  py::module_ emu = m.def_submodule(
      "emulation", "The emulated CUDA runtime this module runs on (CPU emulation of the kernels, for tests).");
  emu.def("set_device", &gma_emu_set_device, py::arg("sm_count"), py::arg("max_smem_optin"),
          "The emulated GPU's size: streaming multiprocessors and opt-in shared memory per block.");
  emu.def("set_device_count", &gma_emu_set_device_count, py::arg("count"));
  emu.def("current_device", &gma_emu_current_device, "The calling thread's current device (cudaGetDevice).");
  emu.def("set_current_device", &gma_emu_set_current_device, py::arg("device"));
  emu.def(
      "set_fault_kernel", [](const std::string& name) { gma_emu_set_fault_kernel(name.c_str()); },
      py::arg("name"), "Launches of the kernel with this name fault (\"\": none).");
  emu.def("async_allocations", &gma_emu_async_allocations,
          "How many workspaces the core has allocated itself (cudaMallocAsync) so far.");
#endif
#ifndef GMATTN_BACKEND_CUDA
  py::class_<CpuBuffer>(m, "CpuBuffer", py::buffer_protocol(),
                        "Uninitialised memory from the CPU core's buffer cache (a writable byte buffer).")
      .def_buffer([](CpuBuffer& b) {
        return py::buffer_info(b.data, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.bytes)}, {static_cast<py::ssize_t>(1)}, false);
      });
  m.def(
      "cpu_buffer", [](size_t bytes) { return std::make_unique<CpuBuffer>(bytes); }, py::arg("bytes"),
      "`bytes` of uninitialised memory from the CPU core's buffer cache, returned to it when the last "
      "view is gone (GMATTN_BUFFER_CACHE_MIB: the cache's budget; by default an eighth of the physical "
      "memory, at least 512 MiB; 0 turns it off).");
  m.def("empty_buffer_cache", &gmattn::cpu::empty_scratch_cache,
        "Hands the released blocks the CPU buffer cache keeps back to the system; returns their bytes.");
  m.def(
      "buffer_cache_info",
      [] {
        size_t held = 0, budget = 0;
        gmattn::cpu::scratch_cache_info(held, budget);
        py::dict d;
        d["held_bytes"] = held;
        d["budget_bytes"] = budget;
        return d;
      },
      "The CPU buffer cache: bytes of released blocks kept now (held_bytes) and its budget.");
#endif
}
