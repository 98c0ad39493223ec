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
// sum is one masked add per 16 columns and bit, the plane word itself being the mask; with AVX2
// one shift, one blend and one add per 8 columns and bit (the shift puts the column's bit in the sign).
//
// Built on first use by torch.utils.cpp_extension (optimum_evo/compressors/kernels/__init__.py) with
// -O3 -march=native; AVX-512, AVX2 and portable paths are chosen at compile time.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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
// The 8 lanes of sum_k q[k] x[k] over the blocks [t0, t1) of one row (x: the row's input). Lane i of
// chunk c holds column 8c + i: shifting a plane's word left by 31 - (8c + i) puts that column's bit in
// the sign, which selects x for the sum (one shift, one blend and one add per 8 weights and bit).
template <int B>
inline __m256 avx2_codes_dot(const uint32_t* row, int64_t t0, int64_t t1, const float* x) {
  const __m256i lanes = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  __m256i shift[4];
  for (int c = 0; c < 4; ++c) shift[c] = _mm256_sub_epi32(lanes, _mm256_set1_epi32(8 * c));
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc[B];
  for (int j = 0; j < B; ++j) acc[j] = zero;
  for (int64_t t = t0; t < t1; ++t) {
    const uint32_t* w = row + t * B;
    __m256 xs[4];
    for (int c = 0; c < 4; ++c) xs[c] = _mm256_loadu_ps(x + t * 32 + 8 * c);
    for (int j = 0; j < B; ++j) {
      const __m256i word = _mm256_set1_epi32((int)w[j]);
      for (int c = 0; c < 4; ++c)
        acc[j] = _mm256_add_ps(acc[j], _mm256_blendv_ps(zero, xs[c],
                               _mm256_castsi256_ps(_mm256_sllv_epi32(word, shift[c]))));
    }
  }
  __m256 q = acc[0];
  for (int j = 1; j < B; ++j) q = _mm256_fmadd_ps(acc[j], _mm256_set1_ps(float(1 << j)), q);
  return q;
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
  const __m256 q = avx2_codes_dot<B>(row, t0, t1, x);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
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
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(ytot), _mm256_extractf128_ps(ytot, 1));
      h = _mm_hadd_ps(h, h);
      h = _mm_hadd_ps(h, h);
      y += _mm_cvtss_f32(h);
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

// x: float32 [M, in_features]; returns float32 [M, out_features]
torch::Tensor planes_gemv(torch::Tensor x, torch::Tensor planes, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                          int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, in_features]");
  auto xc = x.contiguous();
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
  return out;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("isa", &isa, "the SIMD instruction set the kernels were built for"); }
