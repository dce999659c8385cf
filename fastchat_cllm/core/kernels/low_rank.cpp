// A LoRA delta row by row: delta[m, n] = sum_j (x_m . A_j) Bt_jn, with Bt = s B^T [r, N]
// (gguf_linear.py: GGUFLinear.add_lora): the dot products and the sum over j in one fixed
// order, so a row's delta does not depend on the rows beside it (torch's matmul picks its
// kernel, and so its rounding, by the row count). The sum over j runs as r vector updates of
// the output row (no horizontal sums: a dot product a output cost ~10x more).
//
//   fastchat_cllm_cpu::low_rank(x [M, K] f32, a [r, K] f32, bt [r, N] f32) -> [M, N]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOW_RANK_AVX2 1
#endif

namespace {

float dot(const float* p, const float* q, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#ifdef LOW_RANK_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + i), _mm256_loadu_ps(q + i), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#endif
    for (; i < n; ++i) s = std::fma(p[i], q[i], s);
    return s;
}

at::Tensor low_rank(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
    TORCH_CHECK(x.dim() == 2 && a.dim() == 2 && b.dim() == 2 && x.scalar_type() == at::kFloat &&
                a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
                "low_rank: float32 x [M, K], a [r, K], bt [r, N]");
    const int64_t M = x.size(0), K = x.size(1), r = a.size(0), N = b.size(1);
    TORCH_CHECK(a.size(1) == K && b.size(0) == r, "low_rank: shapes differ");
    const at::Tensor xc = x.contiguous(), ac = a.contiguous(), bc = b.contiguous();
    at::Tensor out = at::empty({M, N}, x.options());
    std::vector<float> low(M * r);
    const float* xp = xc.data_ptr<float>();
    const float* ap = ac.data_ptr<float>();
    const float* bp = bc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < r; ++j) low[m * r + j] = dot(xp + m * K, ap + j * K, K);
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            float* row = op + m * N;
            for (int64_t n = 0; n < N; ++n) row[n] = 0.f;
            for (int64_t j = 0; j < r; ++j) {          // row += low_mj * Bt_j, j in order
                const float c = low[m * r + j];
                const float* bj = bp + j * N;
                for (int64_t n = 0; n < N; ++n) row[n] = std::fma(c, bj[n], row[n]);
            }
        }
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastchat_cllm_cpu, lib) {
    lib.def("low_rank(Tensor x, Tensor a, Tensor b) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastchat_cllm_cpu, CPU, lib) {
    lib.impl("low_rank", &low_rank);
}
