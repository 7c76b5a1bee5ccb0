// The sampler's random numbers: a uniform draw that depends only on (seed, position), computed
// identically on the host and in CUDA kernels, so both backends draw the same token.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define LCKV_HOST_DEVICE __host__ __device__
#else
#define LCKV_HOST_DEVICE
#endif

namespace lckv {

LCKV_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// 53 random bits as a double in [0, 1).
LCKV_HOST_DEVICE inline double uniformDraw(uint64_t seed, uint64_t position) {
  const uint64_t r = splitmix64(seed ^ splitmix64(position));
  return (double)(r >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace lckv
