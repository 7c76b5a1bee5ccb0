// Reading one tensor of a safetensors file in its stored dtype, with the layout fixes the model
// needs, and the conversions between f32 and the 16-bit weight types.
// TypeScript has already parsed and checked the header; this code re-checks every offset and
// size against the file itself, because a header that lies must be an error, not a crash.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"

namespace lckv {

struct TensorSource {
  std::string name;        // canonical engine name, e.g. "layers.3.q.weight"
  std::string sourceName;  // name in the checkpoint, for messages
  std::string file;        // path of the safetensors file
  uint64_t offset = 0;     // absolute byte offset of the data in the file
  uint64_t nbytes = 0;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // as stored
  bool transpose = false;      // stored [in, out] (GPT-2 Conv1D); the engine wants [out, in]
  int64_t sliceStart = -1;     // keep output features [sliceStart, sliceEnd) (fused GPT-2 c_attn)
  int64_t sliceEnd = -1;
};

// A tensor's values on the host, row-major [rows, cols] (1-D tensors become rows = 1), in the
// dtype the checkpoint stores: the backend widens or rounds them as it keeps them, so that a
// load makes no f32 copy of a 16-bit tensor.
struct HostTensor {
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  std::vector<uint8_t> bytes;  // rows * cols values of dtypeSize(dtype) bytes
};
HostTensor readTensor(const TensorSource& src);
// Whether every value is finite (neither NaN nor infinite).
bool allFinite(const HostTensor& t);
// Whether every finite value stays finite once rounded to `kept`, the dtype the backend keeps the
// weight in (f16 holds nothing beyond 65504).
bool staysFiniteIn(const HostTensor& t, DType kept);

float bf16ToF32(uint16_t h);
float f16ToF32(uint16_t h);
// Round to nearest even; NaN stays NaN, overflow becomes infinity.
uint16_t f32ToBf16(float f);
uint16_t f32ToF16(float f);
// n values of dtype `from` (F32, BF16 or F16) at src, as f32 (exact: both 16-bit types widen
// to f32 without rounding).
void toF32(DType from, const void* src, size_t n, float* dst);

}  // namespace lckv
