// Matrix-vector products and dequantization of b-bit weights stored as bit planes.
//
// Layout (see optimum_evo/compressors/packed_linear.py): the integer codes q of a row are cut in
// blocks of 32 columns; a block is stored as `bits` 32-bit words, word j holding bit j of the 32
// codes (bit i of the word = column i of the block). A row is nblk = in_features / 32 blocks. Scales
// are float16, one per row and group of `group_size` columns (a multiple of 32); the integer
// zero-points are packed back to back at `bits` bits each, least significant bit first (zero of
// row n, group g at bit (n * G + g) * bits). The weight is w = scale * (q - zero).
//
// y[m, n] = sum_g scale[n, g] * (sum_{k in g} q[n, k] x[m, k] - zero[n, g] * sum_{k in g} x[m, k]),
// and sum_k q x = sum_j 2^j * (sum of x over the columns whose bit j is set): with AVX-512 the inner
// sum is one masked add per 16 columns and bit, the plane word itself being the mask; with AVX2 one
// shift and one masked load (the shift puts the column's bit in the sign) and one add per 8 columns
// and bit, for float32 inputs. Half-precision inputs on AVX2 take an integer path instead: each block
// of 32 inputs is rounded to int16 with its own scale (an error of at most max|x| / 65534 in the
// block, far below the input's own rounding), the block's codes are rebuilt as bytes (a shuffle, an
// and and a compare per bit plane) and multiplied with vpmaddwd, about half the instructions.
//
// Built on first use by torch.utils.cpp_extension (optimum_evo/compressors/kernels/__init__.py) with
// -O3 -march=native; AVX-512, AVX2 and portable paths are chosen at compile time.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal
      int e = -1;
      uint32_t m = man;
      do { m <<= 1; ++e; } while ((m & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Layer {
  const uint32_t* planes;
  const uint16_t* scales;
  const uint8_t* zeros;  // bit-packed
  int64_t N, K, G, nblk, bpg, bits;

  float zero(int64_t n, int64_t g) const {
    const int64_t pos = (n * G + g) * bits;
    uint32_t v = zeros[pos >> 3] >> (pos & 7);
    if ((pos & 7) + bits > 8) v |= uint32_t(zeros[(pos >> 3) + 1]) << (8 - (pos & 7));
    return float(v & ((1u << bits) - 1u));
  }
};

#if defined(__AVX2__) && !defined(__AVX512F__)
inline float hsum(__m256 v) {  // the sum of the 8 lanes
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(h);
}

// The 8 lanes of sum_k q[k] x[k] over the blocks [t0, t1) of one row (x: the row's input). Lane i of
// chunk c holds column 8c + i: shifting a plane's word left by 31 - (8c + i) puts that column's bit in
// the sign, which is the mask of a masked load of x (one shift, one load and one add per 8 weights and
// bit; two chains of adds per bit where registers allow, the adds' latency being the bound).
template <int B>
inline __m256 avx2_codes_dot(const uint32_t* row, int64_t t0, int64_t t1, const float* x) {
  const __m256i lanes = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  __m256i shift[4];
  for (int c = 0; c < 4; ++c) shift[c] = _mm256_sub_epi32(lanes, _mm256_set1_epi32(8 * c));
  constexpr int CH = B <= 5 ? 2 : 1;
  __m256 acc[CH][B];
  for (int h = 0; h < CH; ++h)
    for (int j = 0; j < B; ++j) acc[h][j] = _mm256_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    const uint32_t* w = row + t * B;
    const float* xb = x + t * 32;
    for (int j = 0; j < B; ++j) {
      const __m256i word = _mm256_set1_epi32((int)w[j]);
      for (int c = 0; c < 4; ++c)
        acc[c % CH][j] = _mm256_add_ps(acc[c % CH][j], _mm256_maskload_ps(xb + 8 * c, _mm256_sllv_epi32(word, shift[c])));
    }
  }
  __m256 q = CH == 2 ? _mm256_add_ps(acc[0][0], acc[CH - 1][0]) : acc[0][0];
  for (int j = 1; j < B; ++j) {
    const __m256 a = CH == 2 ? _mm256_add_ps(acc[0][j], acc[CH - 1][j]) : acc[0][j];
    q = _mm256_fmadd_ps(a, _mm256_set1_ps(float(1 << j)), q);
  }
  return q;
}

// Half-precision inputs on AVX2: each block of 32 inputs is rounded to int16 with its own scale,
// x ~= d[t] * xi (at most max|x_block| / 65534 off, far below bfloat16's own rounding), which lets
// the 32 codes of a block be rebuilt as bytes (a shuffle, an and and a compare per bit plane) and
// multiplied with vpmaddwd: about half the instructions of the float path. xi is stored in the order
// in which unpacking a block's code bytes yields the columns: [0..7, 16..23], then [8..15, 24..31].

// eight consecutive inputs as float32
inline __m256 load8(const at::BFloat16* x) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16));
}
inline __m256 load8(const at::Half* x) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
#else
  alignas(32) float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(x[i]);
  return _mm256_load_ps(f);
#endif
}

// One row of inputs: xi (int16, the order above), d (a scale per block) and xs (per group, the sum of
// d * xi, the inputs as the codes see them).
template <typename T>
void quantize_x16(const T* x, int64_t K, int64_t group_size, int16_t* xi, float* d, float* xs) {
  const int64_t nblk = K / 32, bpg = group_size / 32;
  const __m256 sign = _mm256_set1_ps(-0.f), inf = _mm256_set1_ps(INFINITY);
  for (int64_t t = 0; t < nblk; ++t) {
    __m256 v[4], amax = _mm256_setzero_ps();
    int bad = 0;
    for (int c = 0; c < 4; ++c) {
      v[c] = load8(x + t * 32 + 8 * c);
      const __m256 a = _mm256_andnot_ps(sign, v[c]);
      bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
      amax = _mm256_max_ps(amax, a);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float m = _mm_cvtss_f32(h);
    float inv = !bad && m > 0.f ? 32767.f / m : 0.f;
    if (!std::isfinite(inv)) inv = 0.f;  // a block below 1e-34: read as zeros
    d[t] = bad ? NAN : (inv > 0.f ? m / 32767.f : 0.f);  // a non-finite input makes its outputs NaN
    __m256i q[4];
    for (int c = 0; c < 4; ++c) q[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], _mm256_set1_ps(inv)));  // to nearest
    // packs interleaves 4-lane halves: [a0..3, b0..3 | a4..7, b4..7]; the permute puts a before b
    int16_t* o = xi + t * 32;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[2]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(q[1], q[3]), 0xD8));
    const __m256i qs = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i hs = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256(qs, 1));
    hs = _mm_add_epi32(hs, _mm_shuffle_epi32(hs, 0x4E));
    hs = _mm_add_epi32(hs, _mm_shuffle_epi32(hs, 0xB1));
    if (t % bpg == 0) xs[t / bpg] = 0.f;
    xs[t / bpg] += float(_mm_cvtsi128_si32(hs)) * d[t];
  }
}

// R rows of x against row n of the weight: the codes of a block are rebuilt once for the R rows.
template <int B, int R, typename T>
inline void x16_row(const Layer& L, const int16_t* XI, const float* D, const float* XS, T* O, int64_t n,
                    int64_t m0) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i select = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128,
                                          1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  const __m256i zero = _mm256_setzero_si256();
  const uint32_t* row = L.planes + n * L.nblk * B;
  const uint16_t* sc = L.scales + n * L.G;
  __m256 ytot[R];
  float ycorr[R];
  for (int r = 0; r < R; ++r) { ytot[r] = _mm256_setzero_ps(); ycorr[r] = 0.f; }
  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t t0 = g * L.bpg, t1 = std::min(L.nblk, t0 + L.bpg);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t t = t0; t < t1; ++t) {
      const uint32_t* w = row + t * B;
      __m256i codes = zero;
      for (int j = B - 1; j >= 0; --j) {  // codes = 2 codes + bit j, where bit j = -(byte & select == select)
        const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w[j]), spread);
        codes = _mm256_sub_epi8(_mm256_add_epi8(codes, codes),
                                _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select));
      }
      const __m256i lo = _mm256_unpacklo_epi8(codes, zero), hi = _mm256_unpackhi_epi8(codes, zero);
      for (int r = 0; r < R; ++r) {
        const int16_t* xi = XI + (m0 + r) * L.K + t * 32;
        const __m256i p = _mm256_add_epi32(
            _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi))),
            _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + 16))));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(D[(m0 + r) * L.nblk + t]), acc[r]);
      }
    }
    const float s = half_to_float(sc[g]), sz = s * L.zero(n, g);
    for (int r = 0; r < R; ++r) {
      ytot[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(s), ytot[r]);
      ycorr[r] += sz * XS[(m0 + r) * L.G + g];
    }
  }
  for (int r = 0; r < R; ++r) {
    O[(m0 + r) * L.N + n] = static_cast<T>(hsum(ytot[r]) - ycorr[r]);
  }
}

template <int B, typename T>
void gemv_rows_x16(const Layer& L, const int16_t* XI, const float* D, const float* XS, int64_t M, T* O,
                   int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) x16_row<B, 4>(L, XI, D, XS, O, n, m);
    if (m + 2 <= M) { x16_row<B, 2>(L, XI, D, XS, O, n, m); m += 2; }
    if (m < M) x16_row<B, 1>(L, XI, D, XS, O, n, m);
  }
}
#endif

// sum over the blocks [t0, t1) of row n of  sum_k q[k] x[k]  (x: the row's input, float32)
template <int B>
inline float dot_codes(const Layer& L, int64_t n, int64_t t0, int64_t t1, const float* x) {
  const uint32_t* row = L.planes + n * L.nblk * B;
#if defined(__AVX512F__)
  __m512 acc[B];
  for (int j = 0; j < B; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    const uint32_t* w = row + t * B;
    const __m512 x0 = _mm512_loadu_ps(x + t * 32), x1 = _mm512_loadu_ps(x + t * 32 + 16);
    for (int j = 0; j < B; ++j) {
      acc[j] = _mm512_mask_add_ps(acc[j], (__mmask16)(w[j] & 0xFFFFu), acc[j], x0);
      acc[j] = _mm512_mask_add_ps(acc[j], (__mmask16)(w[j] >> 16), acc[j], x1);
    }
  }
  __m512 q = acc[0];
  for (int j = 1; j < B; ++j) q = _mm512_fmadd_ps(acc[j], _mm512_set1_ps(float(1 << j)), q);
  return _mm512_reduce_add_ps(q);
#elif defined(__AVX2__)
  return hsum(avx2_codes_dot<B>(row, t0, t1, x));
#else
  float acc[B] = {0.f};
  for (int64_t t = t0; t < t1; ++t) {
    const uint32_t* w = row + t * B;
    const float* xb = x + t * 32;
    for (int j = 0; j < B; ++j) {
      float s = 0.f;
      for (int i = 0; i < 32; ++i) s += ((w[j] >> i) & 1u) ? xb[i] : 0.f;
      acc[j] += s;
    }
  }
  float q = 0.f;
  for (int j = 0; j < B; ++j) q += acc[j] * float(1 << j);
  return q;
#endif
}

template <int B>
void gemv_rows(const Layer& L, const float* X, const float* XS, int64_t M, float* O, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* sc = L.scales + n * L.G;
    for (int64_t m = 0; m < M; ++m) {
      const float* x = X + m * L.K;
      const float* xs = XS + m * L.G;
      float y = 0.f;
#if defined(__AVX512F__)
      const uint32_t* row = L.planes + n * L.nblk * B;
      __m512 ytot = _mm512_setzero_ps();
      for (int64_t g = 0; g < L.G; ++g) {
        const int64_t t0 = g * L.bpg, t1 = std::min(L.nblk, t0 + L.bpg);
        __m512 acc[B];
        for (int j = 0; j < B; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t t = t0; t < t1; ++t) {
          const uint32_t* w = row + t * B;
          const __m512 x0 = _mm512_loadu_ps(x + t * 32), x1 = _mm512_loadu_ps(x + t * 32 + 16);
          for (int j = 0; j < B; ++j) {
            acc[j] = _mm512_mask_add_ps(acc[j], (__mmask16)(w[j] & 0xFFFFu), acc[j], x0);
            acc[j] = _mm512_mask_add_ps(acc[j], (__mmask16)(w[j] >> 16), acc[j], x1);
          }
        }
        __m512 q = acc[0];
        for (int j = 1; j < B; ++j) q = _mm512_fmadd_ps(acc[j], _mm512_set1_ps(float(1 << j)), q);
        const float s = half_to_float(sc[g]);
        ytot = _mm512_fmadd_ps(q, _mm512_set1_ps(s), ytot);
        y -= s * L.zero(n, g) * xs[g];
      }
      y += _mm512_reduce_add_ps(ytot);
#elif defined(__AVX2__)
      const uint32_t* row = L.planes + n * L.nblk * B;
      __m256 ytot = _mm256_setzero_ps();
      for (int64_t g = 0; g < L.G; ++g) {
        const int64_t t0 = g * L.bpg, t1 = std::min(L.nblk, t0 + L.bpg);
        const float s = half_to_float(sc[g]);
        ytot = _mm256_fmadd_ps(avx2_codes_dot<B>(row, t0, t1, x), _mm256_set1_ps(s), ytot);
        y -= s * L.zero(n, g) * xs[g];
      }
      y += hsum(ytot);
#else
      for (int64_t g = 0; g < L.G; ++g) {
        const int64_t t0 = g * L.bpg, t1 = std::min(L.nblk, t0 + L.bpg);
        y += half_to_float(sc[g]) * (dot_codes<B>(L, n, t0, t1, x) - L.zero(n, g) * xs[g]);
      }
#endif
      O[m * L.N + n] = y;
    }
  }
}

template <int B>
void dequant_rows(const Layer& L, float* W, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* row = L.planes + n * L.nblk * B;
    float* out = W + n * L.K;
    for (int64_t t = 0; t < L.nblk; ++t) {
      const int64_t g = t / L.bpg;
      const float s = half_to_float(L.scales[n * L.G + g]), z = L.zero(n, g);
      const uint32_t* w = row + t * B;
#if defined(__AVX512F__)
      const __m512i lane0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (int half = 0; half < 2; ++half) {
        const __m512i lane = _mm512_add_epi32(lane0, _mm512_set1_epi32(16 * half));
        __m512i q = _mm512_setzero_si512();
        for (int j = 0; j < B; ++j) {
          const __m512i bit = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)w[j]), lane),
                                               _mm512_set1_epi32(1));
          q = _mm512_or_si512(q, _mm512_slli_epi32(bit, j));
        }
        const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(z)), _mm512_set1_ps(s));
        _mm512_storeu_ps(out + t * 32 + 16 * half, v);
      }
#else
      for (int i = 0; i < 32; ++i) {
        uint32_t q = 0;
        for (int j = 0; j < B; ++j) q |= ((w[j] >> i) & 1u) << j;
        out[t * 32 + i] = s * (float(q) - z);
      }
#endif
    }
  }
}

Layer make_layer(const torch::Tensor& planes, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t bits,
                 int64_t in_features, int64_t group_size) {
  TORCH_CHECK(planes.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous(), "buffers must be contiguous");
  TORCH_CHECK(in_features % 32 == 0 && group_size % 32 == 0, "in_features and group_size must be multiples of 32");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8");
  Layer L;
  L.N = scales.size(0);
  L.G = scales.size(1);
  L.K = in_features;
  L.nblk = in_features / 32;
  L.bpg = group_size / 32;
  L.bits = bits;
  TORCH_CHECK(planes.numel() == L.N * L.nblk * bits * 4, "planes has the wrong size");
  TORCH_CHECK(zeros.numel() * 8 >= L.N * L.G * bits, "zeros has the wrong size");
  L.planes = reinterpret_cast<const uint32_t*>(planes.data_ptr<uint8_t>());
  L.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  L.zeros = zeros.data_ptr<uint8_t>();
  return L;
}

template <typename F>
void by_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

}  // namespace

// x: float32, bfloat16 or float16 [M, in_features]; returns [M, out_features] in x's dtype
torch::Tensor planes_gemv(torch::Tensor x, torch::Tensor planes, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                          int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                               x.scalar_type() == at::kHalf), "x must be float32, bfloat16 or float16 [M, in_features]");
#if defined(__AVX2__) && !defined(__AVX512F__)
  if (x.scalar_type() != at::kFloat) {  // the result in x's dtype
    auto xh = x.contiguous();
    const Layer L = make_layer(planes, scales, zeros, bits, xh.size(1), group_size);
    const int64_t M = xh.size(0);
    // scratch kept by the calling thread: decoding calls this once per layer and token
    thread_local std::vector<char> scratch;
    scratch.resize(M * L.K * sizeof(int16_t) + (M * L.nblk + M * L.G) * sizeof(float) + 64);
    int16_t* XI = reinterpret_cast<int16_t*>(scratch.data());
    float* Dp = reinterpret_cast<float*>(scratch.data() + ((M * L.K * sizeof(int16_t) + 31) & ~size_t(31)));
    float* XS = Dp + M * L.nblk;
    auto out = torch::empty({M, L.N}, xh.options());
    auto run = [&](auto* X, auto* O) {
      for (int64_t m = 0; m < M; ++m) quantize_x16(X + m * L.K, L.K, group_size, XI + m * L.K, Dp + m * L.nblk, XS + m * L.G);
      by_bits(bits, [&](auto b) {
        constexpr int B = decltype(b)::value;
        at::parallel_for(0, L.N, 16, [&](int64_t n0, int64_t n1) { gemv_rows_x16<B>(L, XI, Dp, XS, M, O, n0, n1); });
      });
    };
    if (xh.scalar_type() == at::kBFloat16)
      run(xh.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
    else
      run(xh.data_ptr<at::Half>(), out.data_ptr<at::Half>());
    return out;
  }
#endif
  auto xc = x.to(at::kFloat).contiguous();
  const Layer L = make_layer(planes, scales, zeros, bits, xc.size(1), group_size);
  const int64_t M = xc.size(0);
  const float* X = xc.data_ptr<float>();
  auto xsum = torch::empty({M, L.G}, xc.options());
  float* XS = xsum.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < L.G; ++g) {
      float s = 0.f;
      const int64_t k1 = std::min(L.K, (g + 1) * group_size);
      for (int64_t k = g * group_size; k < k1; ++k) s += X[m * L.K + k];
      XS[m * L.G + g] = s;
    }
  auto out = torch::empty({M, L.N}, xc.options());
  float* O = out.data_ptr<float>();
  by_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    at::parallel_for(0, L.N, 16, [&](int64_t n0, int64_t n1) { gemv_rows<B>(L, X, XS, M, O, n0, n1); });
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// returns the float32 weight [out_features, in_features]
torch::Tensor planes_dequantize(torch::Tensor planes, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                                int64_t in_features, int64_t group_size) {
  const Layer L = make_layer(planes, scales, zeros, bits, in_features, group_size);
  auto W = torch::empty({L.N, L.K}, torch::TensorOptions().dtype(at::kFloat));
  float* out = W.data_ptr<float>();
  by_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    at::parallel_for(0, L.N, 16, [&](int64_t n0, int64_t n1) { dequant_rows<B>(L, out, n0, n1); });
  });
  return W;
}

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "portable";
#endif
}

TORCH_LIBRARY(evopress_planes, m) {
  m.def("gemv(Tensor x, Tensor planes, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor");
  m.def("dequantize(Tensor planes, Tensor scales, Tensor zeros, int bits, int in_features, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(evopress_planes, CPU, m) {
  m.impl("gemv", &planes_gemv);
  m.impl("dequantize", &planes_dequantize);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the SIMD instruction set the kernels were built for");
  // the same function as the registered op, called without the dispatcher (decoding calls it per layer)
  m.def("gemv", &planes_gemv, "x @ W.T for a bit-plane weight");
}
