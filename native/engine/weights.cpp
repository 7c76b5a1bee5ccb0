// Reading one tensor's data from a safetensors file (weights.h), and the f32 / bf16 / f16
// conversions.
#include "weights.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errors.h"

namespace lckv {

size_t dtypeSize(DType t) { return t == DType::F32 ? 4 : 2; }
const char* dtypeName(DType t) { return t == DType::F32 ? "F32" : t == DType::F16 ? "F16" : "BF16"; }

float bf16ToF32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16ToF32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                 // round to nearest even
}

uint16_t f32ToF16(float f) {
  // Round to nearest even through the hardware-independent bit recipe.
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return (uint16_t)sign;
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1))) ++h;
    return (uint16_t)(sign | h);
  }
  uint32_t h = ((uint32_t)exp << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return (uint16_t)(sign | h);
}

namespace {

struct Fd {
  int fd = -1;
  ~Fd() { if (fd >= 0) ::close(fd); }
};

std::string where(const TensorSource& s) { return "tensor '" + s.sourceName + "' in " + s.file; }

// dst [c, r] = src [r, c] transposed, for elements of type T (bytes moved as they are).
template <class T>
void transposeInto(const uint8_t* src, int64_t r, int64_t c, uint8_t* dst) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) std::memcpy(dst + (size_t)(j * r + i) * sizeof(T), src + (size_t)(i * c + j) * sizeof(T), sizeof(T));
}

}  // namespace

HostTensor readTensor(const TensorSource& src) {
  if (src.shape.empty() || src.shape.size() > 2)
    throw EngineError(kErrWeights, where(src) + ": expected a 1-D or 2-D tensor, got " + std::to_string(src.shape.size()) + " dimensions");
  uint64_t count = 1;
  const uint64_t limit = (uint64_t)1 << 40;  // elements; checked before each multiply, so it cannot wrap
  for (int64_t d : src.shape) {
    if (d <= 0) throw EngineError(kErrWeights, where(src) + ": dimensions must be positive");
    if ((uint64_t)d > limit / count) throw EngineError(kErrWeights, where(src) + ": tensor too large");
    count *= (uint64_t)d;
  }
  const uint64_t esize = dtypeSize(src.dtype);
  if (count * esize != src.nbytes)
    throw EngineError(kErrWeights, where(src) + ": shape needs " + std::to_string(count * esize) + " bytes of " +
                                       dtypeName(src.dtype) + " but the header gives " + std::to_string(src.nbytes));

  Fd f;
  f.fd = ::open(src.file.c_str(), O_RDONLY);
  if (f.fd < 0) throw EngineError(kErrIo, "cannot open " + src.file + ": " + std::strerror(errno));
  struct stat st;
  if (::fstat(f.fd, &st) != 0) throw EngineError(kErrIo, "cannot stat " + src.file + ": " + std::strerror(errno));
  if (src.offset > (uint64_t)st.st_size || src.nbytes > (uint64_t)st.st_size - src.offset)
    throw EngineError(kErrWeights, where(src) + ": data range [" + std::to_string(src.offset) + ", " +
                                       std::to_string(src.offset + src.nbytes) + ") lies past the end of the file (" +
                                       std::to_string((uint64_t)st.st_size) + " bytes)");

  HostTensor t;
  t.dtype = src.dtype;
  std::vector<uint8_t>& raw = t.bytes;
  raw.resize(src.nbytes);
  uint64_t done = 0;
  while (done < src.nbytes) {
    ssize_t r = ::pread(f.fd, raw.data() + done, src.nbytes - done, (off_t)(src.offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw EngineError(kErrIo, where(src) + ": read failed: " + (r < 0 ? std::strerror(errno) : "unexpected end of file"));
    done += (uint64_t)r;
  }

  // Logical layout: [out, in] for matrices, [1, n] for vectors. Values move as whole elements of
  // esize bytes, so the layout fixes work in any dtype.
  int64_t r = src.shape.size() == 2 ? src.shape[0] : 1;
  int64_t c = src.shape.size() == 2 ? src.shape[1] : src.shape[0];
  if (src.transpose && src.shape.size() == 2) {
    std::vector<uint8_t> tr(raw.size());
    if (esize == 4) transposeInto<uint32_t>(raw.data(), r, c, tr.data());
    else transposeInto<uint16_t>(raw.data(), r, c, tr.data());
    raw.swap(tr);
    std::swap(r, c);
  }
  if (src.sliceStart >= 0) {
    const bool vec = src.shape.size() == 1;
    const int64_t outDim = vec ? c : r;
    if (src.sliceEnd <= src.sliceStart || src.sliceEnd > outDim)
      throw EngineError(kErrWeights, where(src) + ": slice [" + std::to_string(src.sliceStart) + ", " +
                                         std::to_string(src.sliceEnd) + ") outside " + std::to_string(outDim) + " features");
    const int64_t keep = src.sliceEnd - src.sliceStart;
    // A vector's features are its columns, a matrix's its rows: either way one contiguous range.
    const int64_t unit = vec ? 1 : c;
    raw = std::vector<uint8_t>(raw.begin() + (ptrdiff_t)((size_t)(src.sliceStart * unit) * esize),
                               raw.begin() + (ptrdiff_t)((size_t)(src.sliceEnd * unit) * esize));
    if (vec) c = keep;
    else r = keep;
  }
  t.rows = r;
  t.cols = c;
  return t;
}

// Whether a 16-bit value of type t (BF16 or F16) is NaN or infinite: an exponent of all ones.
static bool nonFinite16(uint16_t h, DType t) {
  const uint16_t expMask = t == DType::BF16 ? 0x7f80 : 0x7c00;
  return (h & expMask) == expMask;
}

bool allFinite(const HostTensor& t) {
  // Non-finite means an exponent of all ones, in each format's own bits.
  const size_t n = (size_t)(t.rows * t.cols);
  const uint8_t* p = t.bytes.data();
  if (t.dtype == DType::F32) {
    for (size_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, p + 4 * i, 4);
      if ((u & 0x7f800000u) == 0x7f800000u) return false;
    }
    return true;
  }
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    if (nonFinite16(h, t.dtype)) return false;
  }
  return true;
}

bool staysFiniteIn(const HostTensor& t, DType kept) {
  // Widening, or keeping the stored type, rounds nothing. bf16 holds every f16 value.
  if (kept == DType::F32 || kept == t.dtype || (kept == DType::BF16 && t.dtype == DType::F16)) return true;
  // Left: f32 to bf16 or f16, and bf16 to f16. Rounding to nearest even sends a finite value to
  // infinity exactly when its magnitude reaches the largest finite value plus half an ulp (a tie
  // rounds up, the largest value's last bit being odd): for bf16 the f32 bits 0x7f7f0000 + 0x8000
  // (3.3961e38), for f16 65504 + 16 = 65520 (0x477ff000). Finite f32 bits order as magnitudes, so
  // one integer maximum replaces rounding every value (about 1 to 2.5 ns a value).
  const uint32_t firstInfinite = kept == DType::BF16 ? 0x7f7f8000u : 0x477ff000u;
  const size_t n = (size_t)(t.rows * t.cols);
  const uint8_t* p = t.bytes.data();
  uint32_t maxMagnitude = 0;
  if (t.dtype == DType::F32) {
    for (size_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, p + 4 * i, 4);
      maxMagnitude = std::max(maxMagnitude, u & 0x7fffffffu);
    }
  } else {  // bf16 to f16: a bf16 value's f32 bits are its own, shifted.
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      maxMagnitude = std::max(maxMagnitude, (uint32_t)(h & 0x7fffu) << 16);
    }
  }
  return maxMagnitude < firstInfinite;
}

void toF32(DType from, const void* src, size_t n, float* dst) {
  if (from == DType::F32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (from == DType::BF16)
    for (size_t i = 0; i < n; ++i) dst[i] = bf16ToF32(h[i]);
  else
    for (size_t i = 0; i < n; ++i) dst[i] = f16ToF32(h[i]);
}

// A backend that keeps every weight in one dtype of its own gets them as f32, as from upload().
Tensor Backend::uploadWeight(const void* host, DType hostType, int64_t rows, int64_t cols) {
  if (hostType == DType::F32) return upload(static_cast<const float*>(host), rows, cols);
  std::vector<float> vals((size_t)(rows * cols));
  toF32(hostType, host, vals.size(), vals.data());
  return upload(vals.data(), rows, cols);
}

}  // namespace lckv
