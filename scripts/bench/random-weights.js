/**
 * Random weights for speed measurements, in the encodings the bench writes: bf16 (lckv's
 * safetensors), f16, f32 and ggml's Q8_0 and Q4_0 blocks (the GGUF files of node-llama-cpp).
 * Their text is noise; their magnitudes are those of trained weights (2^-7 to 2^-4), never zero,
 * infinite or NaN, so that no kernel takes a shortcut. One xorshift32 stream per writer, so a
 * seed gives the same file every time.
 */

class Xorshift32 {
  constructor(seed = 1) {
    this.x = seed >>> 0 || 1;
  }
  next() {
    let x = this.x;
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    this.x = x;
    return x;
  }
}

// bf16: sign, exponent 120..123 (2^-7..2^-4), 7 random mantissa bits: (x & 0x81ff) | 0x3c00.
function randomBf16(rng, count) {
  const out = new Uint16Array(count);
  for (let i = 0; i < count; i++) out[i] = (rng.next() & 0x81ff) | 0x3c00;
  return out;
}

// f16: sign, exponent 8..9 (2^-7..2^-5), 10 random mantissa bits; two values per draw.
function randomF16(rng, count) {
  const out = new Uint16Array(count);
  let i = 0;
  for (; i + 1 < count; i += 2) {
    const x = rng.next();
    out[i] = (x & 0x87ff) | 0x2000;
    out[i + 1] = ((x >>> 16) & 0x87ff) | 0x2000;
  }
  if (i < count) out[i] = (rng.next() & 0x87ff) | 0x2000;
  return out;
}

const BF16_ONE = 0x3f80;
const F16_ONE = 0x3c00;
const F32_ONE = 0x3f800000;

/**
 * ggml's block types: 32 weights a block, an f16 scale d first, then the quants.
 *   Q8_0: d, then 32 int8 q; weight = d * q.                         34 bytes a block.
 *   Q4_0: d, then 16 bytes of 4-bit q (low nibbles the block's first 16 weights, high nibbles
 *         the last 16); weight = d * (q - 8).                          18 bytes a block.
 * Random blocks are written directly: d of about 2^-11 (Q8_0) or 2^-10 (Q4_0) with a random
 * mantissa, so that d * q spans the magnitudes of randomBf16, and random quants.
 */
const QK = 32;
function randomQ8_0(rng, blocks) {
  const out = Buffer.allocUnsafe(blocks * 34);
  for (let b = 0, o = 0; b < blocks; b++, o += 34) {
    out.writeUInt16LE(0x1000 | (rng.next() & 0x3ff), o); // 2^-11 * (1 + m/1024)
    for (let j = 0; j < QK; j += 4) {
      const x = rng.next();
      for (let k = 0; k < 4; k++) {
        const q = (x >>> (8 * k)) & 0xff;
        out[o + 2 + j + k] = q === 0x80 ? 0x81 : q; // int8 -128 is outside the quantizer's range
      }
    }
  }
  return out;
}
function randomQ4_0(rng, blocks) {
  const out = Buffer.allocUnsafe(blocks * 18);
  for (let b = 0, o = 0; b < blocks; b++, o += 18) {
    out.writeUInt16LE(0x1400 | (rng.next() & 0x3ff), o); // 2^-10 * (1 + m/1024)
    for (let j = 0; j < QK / 2; j += 4) {
      const x = rng.next();
      out[o + 2 + j] = x & 0xff;
      out[o + 3 + j] = (x >>> 8) & 0xff;
      out[o + 4 + j] = (x >>> 16) & 0xff;
      out[o + 5 + j] = x >>> 24;
    }
  }
  return out;
}

module.exports = { Xorshift32, randomBf16, randomF16, randomQ8_0, randomQ4_0, BF16_ONE, F16_ONE, F32_ONE, QK };
