// y = x W^T for W in llama.cpp's 4- and 8-bit block formats, float32 activations, float32
// accumulation: fastchat_cllm/core/cpu_kernels.py builds it for this CPU at first use.
//
// A weight block is 32 quants q with a scale d (and for Q4_0/Q4_1 a minimum m; Q4_0's is -8d), so
//     sum_k w_k x_k = sum_b ( d_b * sum_{k in b} q_k x_k + m_b * sum_{k in b} x_k ).
// The quants are read as stored (Q4: 16 bytes a block, low nibbles weights 0-15, high 16-31;
// Q8: 32 signed bytes); d and m were converted to float32 arrays at load. Each output element
// is summed in one fixed order whatever the number of rows M, so a row's result does not depend
// on the rows beside it: a Jacobi window and an AR step see the same numbers.
//
//   fastchat_cllm_cpu::q4_linear(x [M, K] f32, qs [N, K/2] u8, d [N, K/32], m [N, K/32]) -> [M, N]
//   fastchat_cllm_cpu::q8_linear(x [M, K] f32, qs [N, K] i8, d [N, K/32]) -> [M, N]
// (Tried and dropped, measured on an AVX-512 VM: a 512-bit version of `neuron`, no faster at
// 1-2 rows and 10-15% slower at 8-32; decoding by shuffles instead of shifts: the same; above
// 16 rows, each neuron dequantized once and a 4 x 3 register-tiled product over the floats:
// 1.0-1.45x slower at 17-64 rows; two accumulators a row: 5-10% slower.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GGUF_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;     // weights per block
constexpr int64_t TILE = 6;    // rows sharing one conversion of a block's quants
constexpr int64_t CHUNK_BYTES = 16 << 10;    // weights of the neurons that run row tile by tile

// The weight (within its block) each of the 4 x 8 lanes holds: Q4 vectors are the low nibbles
// of bytes 0-7 (weights 0-7), their high nibbles (16-23), then bytes 8-15 (8-15, 24-31).
constexpr int Q4_ORDER[QK] = {0, 4, 1, 5, 2, 6, 3, 7, 16, 20, 17, 21, 18, 22, 19, 23,
                              8, 12, 9, 13, 10, 14, 11, 15, 24, 28, 25, 29, 26, 30, 27, 31};
constexpr int Q8_ORDER[QK] = {0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15,
                              16, 20, 17, 21, 18, 22, 19, 23, 24, 28, 25, 29, 26, 30, 27, 31};

// x [M, K] with each block's values in ORDER.
std::vector<float> in_lane_order(const float* x, int64_t M, int64_t K, const int* order) {
    std::vector<float> out(M * K);
    for (int64_t i = 0; i < M * K; i += QK)
        for (int j = 0; j < QK; ++j) out[i + j] = x[i + order[j]];
    return out;
}

// The per-block sums of each row of x: sx [M, K/32] (the minimum's term).
void block_sums(const float* x, int64_t M, int64_t K, float* sx) {
    for (int64_t r = 0; r < M; ++r)
        for (int64_t b = 0; b < K / QK; ++b) {
            float s = 0.f;
            for (int64_t j = 0; j < QK; ++j) s += x[r * K + b * QK + j];
            sx[r * (K / QK) + b] = s;
        }
}

#ifdef GGUF_AVX2
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline __m256i broadcast8(const uint8_t* p) {      // 8 bytes into every 64-bit lane
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
}

// A block's 32 quants as 4 x 8 floats, lanes in Q4_ORDER / Q8_ORDER.
inline void quants(const uint8_t* qs, __m256 q[4], std::integral_constant<int, 4>) {
    const __m256i low = _mm256_setr_epi32(0, 0, 8, 8, 16, 16, 24, 24);
    const __m256i high = _mm256_add_epi32(low, _mm256_set1_epi32(4));
    const __m256i nibble = _mm256_set1_epi32(0x0f);
    const __m256i a = broadcast8(qs), b = broadcast8(qs + 8);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(a, low), nibble));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(a, high), nibble));
    q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(b, low), nibble));
    q[3] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(b, high), nibble));
}
inline void quants(const uint8_t* qs, __m256 q[4], std::integral_constant<int, 8>) {
    const __m256i up = _mm256_setr_epi32(24, 24, 16, 16, 8, 8, 0, 0);
    for (int c = 0; c < 4; ++c)
        q[c] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_sllv_epi32(broadcast8(qs + 8 * c), up), 24));
}

// Rows [0, R) of x against one neuron: acc[r] += d_b * (q . x_r) over the blocks, then the
// horizontal sum plus sum_b m_b sx_rb.
template <int BITS, int R>
void neuron(const float* x, int64_t K, const uint8_t* qs, const float* d, const float* m,
            const float* sx, float* y, int64_t ldy) {
    const int64_t nb = K / QK, bytes = QK * BITS / 8;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m256 q[4];
        quants(qs + b * bytes, q, std::integral_constant<int, BITS>());
        const __m256 scale = _mm256_broadcast_ss(d + b);
        for (int r = 0; r < R; ++r) {
            const float* xb = x + r * K + b * QK;
            __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
            s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), s);
            s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), s);
            s = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), s);
            acc[r] = _mm256_fmadd_ps(s, scale, acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        float low = 0.f;
        if (m != nullptr)
            for (int64_t b = 0; b < nb; ++b) low = std::fma(m[b], sx[r * nb + b], low);
        y[r * ldy] = hsum(acc[r]) + low;
    }
}
#else
template <int BITS, int R>
void neuron(const float* x, int64_t K, const uint8_t* qs, const float* d, const float* m,
            const float* sx, float* y, int64_t ldy) {
    const int64_t nb = K / QK, bytes = QK * BITS / 8;
    for (int r = 0; r < R; ++r) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};      // the AVX2 path's lanes and rounding
        for (int64_t b = 0; b < nb; ++b) {
            float q[QK];                               // in lane order, as x is
            const uint8_t* p = qs + b * bytes;
            for (int j = 0; j < QK; ++j) {
                const int k = BITS == 4 ? Q4_ORDER[j] : Q8_ORDER[j];
                q[j] = BITS == 4 ? float(k < 16 ? p[k] & 0x0f : p[k - 16] >> 4)
                                 : float(static_cast<int8_t>(p[k]));
            }
            for (int l = 0; l < 8; ++l) {
                const float* xb = x + r * K + b * QK;
                float s = q[l] * xb[l];
                for (int c = 1; c < 4; ++c) s = std::fma(q[8 * c + l], xb[8 * c + l], s);
                acc[l] = std::fma(s, d[b], acc[l]);
            }
        }
        float low = 0.f;
        if (m != nullptr)
            for (int64_t b = 0; b < nb; ++b) low = std::fma(m[b], sx[r * nb + b], low);
        y[r * ldy] = (((acc[0] + acc[4]) + (acc[2] + acc[6])) +
                      ((acc[1] + acc[5]) + (acc[3] + acc[7]))) + low;
    }
}
#endif

template <int BITS>
at::Tensor linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                  const c10::optional<at::Tensor>& m) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                "gguf linear: x must be a 2-D float32 CPU tensor");
    const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), nb = K / QK;
    TORCH_CHECK(qs.element_size() == 1, "gguf linear: the quants must be 1-byte elements");
    TORCH_CHECK(K > 0 && K % QK == 0 && qs.dim() == 2 && qs.size(1) == K * BITS / 8 && qs.is_contiguous(),
                "gguf linear: x has ", K, " columns, the quants ", qs.sizes());
    TORCH_CHECK(d.scalar_type() == at::kFloat && d.is_contiguous() && d.numel() == N * nb,
                "gguf linear: the scales must be float32 [N, K/32]");
    TORCH_CHECK(!m.has_value() || (m->scalar_type() == at::kFloat && m->is_contiguous() &&
                                   m->numel() == N * nb), "gguf linear: bad minimums");
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0 || N == 0) return y;
    std::vector<float> sx(m.has_value() ? M * nb : 0);
    if (m.has_value()) block_sums(xc.data_ptr<float>(), M, K, sx.data());
    const std::vector<float> ordered = in_lane_order(xc.data_ptr<float>(), M, K,
                                                     BITS == 4 ? Q4_ORDER : Q8_ORDER);
    const float* xp = ordered.data();
    const auto* qp = static_cast<const uint8_t*>(qs.data_ptr());
    const float* dp = d.data_ptr<float>();
    const float* mp = m.has_value() ? m->data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    const int64_t row_bytes = K * BITS / 8;
    // grain: ~64k weights a task, so a small layer is not spread over idle threads
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / K);
    // Neurons go in chunks of about CHUNK_BYTES of weights (kept in L2) and rows in tiles of
    // TILE (x's tile kept in L1): each chunk runs every row tile before the next chunk.
    const int64_t chunk = std::max<int64_t>(4, CHUNK_BYTES / (row_bytes + nb * 8));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        for (int64_t n0 = begin; n0 < end; n0 += chunk) {
            const int64_t n1 = std::min(end, n0 + chunk);
            for (int64_t r = 0; r < M; r += TILE) {
                const int64_t rows = std::min<int64_t>(TILE, M - r);
                for (int64_t n = n0; n < n1; ++n) {
                    const uint8_t* q = qp + n * row_bytes;
                    const float* dn = dp + n * nb;
                    const float* mn = mp ? mp + n * nb : nullptr;
                    const float* xr = xp + r * K;
                    const float* sr = sx.data() + r * nb;
                    float* yr = yp + r * N + n;
                    switch (rows) {
                        case 6: neuron<BITS, 6>(xr, K, q, dn, mn, sr, yr, N); break;
                        case 5: neuron<BITS, 5>(xr, K, q, dn, mn, sr, yr, N); break;
                        case 4: neuron<BITS, 4>(xr, K, q, dn, mn, sr, yr, N); break;
                        case 3: neuron<BITS, 3>(xr, K, q, dn, mn, sr, yr, N); break;
                        case 2: neuron<BITS, 2>(xr, K, q, dn, mn, sr, yr, N); break;
                        default: neuron<BITS, 1>(xr, K, q, dn, mn, sr, yr, N); break;
                    }
                }
            }
        }
    });
    return y;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                     const at::Tensor& m) {
    return linear<4>(x, qs, d, m);
}
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
    return linear<8>(x, qs, d, c10::nullopt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastchat_cllm_cpu, lib) {
    lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
    lib.def("q8_linear(Tensor x, Tensor qs, Tensor d) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastchat_cllm_cpu, CPU, lib) {
    lib.impl("q4_linear", &q4_linear);
    lib.impl("q8_linear", &q8_linear);
}
