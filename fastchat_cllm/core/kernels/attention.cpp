// The engine's packed attention on the CPU (core/engine/runner.py: packed_attention), as one op:
// every query token of a packed forward attends to its own slot's cached keys/values, under its
// group's mask, with no Python per layer. Each (token, head) is computed alone, in one fixed
// order, so a row's output does not depend on the rows beside it.
//
//   fastchat_cllm_cpu::packed_attention(query [1, H, T, D], key, value [slots, Hkv, L, D],
//       meta (int64: G, then start, width, rows, kv_len of each group, then the slots),
//       mask (bool: each group's [rows, 1, width, kv_len], flattened, concatenated), scale)
//       -> [1, T, H, D]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ATTN_AVX2 1
#endif

namespace {

float dot(const float* a, const float* b, int64_t n) {
#ifdef ATTN_AVX2
    if (n % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
#endif
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s = std::fma(a[i], b[i], s);
    return s;
}

void axpy(float p, const float* v, float* out, int64_t n) {     // out += p v
    for (int64_t i = 0; i < n; ++i) out[i] = std::fma(p, v[i], out[i]);
}

struct Task {          // one query token of one group
    int64_t token, slot, kv_len;
    const bool* mask;  // [kv_len]
};

at::Tensor packed_attention(const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& meta,
                            const at::Tensor& mask, double scale) {
    TORCH_CHECK(query.dim() == 4 && query.size(0) == 1 && query.scalar_type() == at::kFloat,
                "packed_attention: query must be float32 [1, H, T, D]");
    TORCH_CHECK(key.dim() == 4 && key.scalar_type() == at::kFloat && value.sizes() == key.sizes(),
                "packed_attention: key/value must be float32 [slots, Hkv, L, D]");
    TORCH_CHECK(mask.scalar_type() == at::kBool && meta.scalar_type() == at::kLong,
                "packed_attention: meta int64, mask bool");
    const int64_t H = query.size(1), T = query.size(2), D = query.size(3);
    const int64_t S = key.size(0), Hkv = key.size(1), L = key.size(2);
    TORCH_CHECK(Hkv > 0 && key.size(3) == D && H % Hkv == 0, "packed_attention: head shapes differ");
    const int64_t per_kv = H / Hkv;
    const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
    const at::Tensor mc = mask.contiguous(), mt = meta.contiguous();
    const int64_t* m = mt.data_ptr<int64_t>();
    TORCH_CHECK(mt.numel() >= 1 && mt.numel() >= 1 + 4 * m[0], "packed_attention: bad meta");
    const int64_t groups = m[0];
    const int64_t* slots = m + 1 + 4 * groups;
    const int64_t slot_count = mt.numel() - 1 - 4 * groups;
    const bool* mp = mc.data_ptr<bool>();
    std::vector<Task> tasks;
    tasks.reserve(T);
    int64_t at_slot = 0, at_mask = 0;
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t start = m[1 + 4 * g], width = m[2 + 4 * g], rows = m[3 + 4 * g],
                      kv_len = m[4 + 4 * g];
        TORCH_CHECK(start >= 0 && kv_len <= L && start + rows * width <= T &&
                    at_slot + rows <= slot_count, "packed_attention: bad meta");
        for (int64_t r = 0; r < rows; ++r) {
            TORCH_CHECK(slots[at_slot + r] >= 0 && slots[at_slot + r] < S,
                        "packed_attention: a slot out of range");
            for (int64_t c = 0; c < width; ++c)
                tasks.push_back({start + r * width + c, slots[at_slot + r], kv_len,
                                 mp + at_mask + (r * width + c) * kv_len});
        }
        at_slot += rows;
        at_mask += rows * width * kv_len;
    }
    TORCH_CHECK(at_mask <= mc.numel(), "packed_attention: the mask is too short");
    at::Tensor out = at::zeros({1, T, H, D}, query.options());
    const float* qp = q.data_ptr<float>();
    const float* kp = k.data_ptr<float>();
    const float* vp = v.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t work = static_cast<int64_t>(tasks.size()) * H;
    at::parallel_for(0, work, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(L);
        for (int64_t i = begin; i < end; ++i) {
            const Task& t = tasks[i / H];
            const int64_t h = i % H, kvh = h / per_kv;
            const float* qv = qp + (h * T + t.token) * D;
            const float* keys = kp + ((t.slot * Hkv + kvh) * L) * D;
            const float* vals = vp + ((t.slot * Hkv + kvh) * L) * D;
            float top = -std::numeric_limits<float>::infinity();
            for (int64_t j = 0; j < t.kv_len; ++j) {
                scores[j] = t.mask[j] ? dot(qv, keys + j * D, D) * static_cast<float>(scale)
                                      : -std::numeric_limits<float>::infinity();
                top = std::max(top, scores[j]);
            }
            float* o = op + (t.token * H + h) * D;
            if (top == -std::numeric_limits<float>::infinity()) continue;   // nothing visible
            float total = 0.f;
            for (int64_t j = 0; j < t.kv_len; ++j) {
                scores[j] = t.mask[j] ? std::exp(scores[j] - top) : 0.f;
                total += scores[j];
            }
            for (int64_t j = 0; j < t.kv_len; ++j)
                if (scores[j] != 0.f) axpy(scores[j], vals + j * D, o, D);
            const float inv = 1.f / total;
            for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        }
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastchat_cllm_cpu, lib) {
    lib.def("packed_attention(Tensor query, Tensor key, Tensor value, Tensor meta, Tensor mask, "
            "float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastchat_cllm_cpu, CPU, lib) {
    lib.impl("packed_attention", &packed_attention);
}
