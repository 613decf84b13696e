// edgelm's CPU kernels: weight-only int4/int8 GEMV-style matmuls for few rows (decode, batched
// decode, speculative verify) and a whole-model decode step for Llama-family models.
//
// Why: torch's stock int4/int8 CPU kernels reach ~5 GB/s on AVX2 and a 30-layer model pays ~1,000
// Python-dispatched ops per token (docs/profile-smollm2.md). Here activations are quantized to int16
// per 32-block so each 32-weight block is two madd_epi16 dot products, and the decode step runs every
// layer in one C++ call.
//
// Formats (edgelm/quant/primitives.py):
//   int4 "blocks": qs (N, K/2) uint8, sz (N, K/32, 2) bf16, one (scale, zero) per 32-weight block,
//     W[n,k] = (q - 8) * scale + zero, q in 0..15. Rows come in tiles of 8 (N % 8 == 0):
//     tile t, block b is 128 bytes at qs + (t * K/32 + b) * 128, eight 16-byte chunks c where byte i
//     = q[8t + i/2, 32b + 2c + i%2] | q[8t + i/2, 32b + 16 + 2c + i%2] << 4, and its scales are
//     16 bf16 at sz + (t * K/32 + b) * 16: scale[0..8) then zero[0..8) of the tile's rows. So one
//     16-byte load widens to two int16x16 vectors holding a k-pair of each of the 8 rows per 32-bit
//     lane: madd_epi16 with a broadcast activation pair gives the 8 rows' partial sums with no
//     horizontal reduction.
//   int8: w (N, K) int8, scale (N,) bf16; W[n,k] = w * scale. Rows in tiles of 8 as for int4: tile t,
//     block b is 256 bytes at w + (t * K/32 + b) * 256, sixteen 16-byte chunks c where byte i =
//     w[8t + i/2, 32b + 2c + i%2]; the N % 8 tail rows are row-major.
//   ternary "tiles" (BitLinear, edgelm/quant/ternary.py): codes c = t + 1 in 0..2, W[n,k] = (c - 1) *
//     scale, w (N, K/4) uint8 and s (N, K/32) fp16, one scale per 32-weight block. Rows in tiles of 8:
//     tile t, block b is 64 bytes at w + (t * K/32 + b) * 64, four 16-byte chunks c where byte i =
//     sum_s code[8t + i/2, 32b + 2c + i%2 + 8s] << 2s (s = 0..3), and its scales are 8 fp16 at
//     s + (t * K/32 + b) * 8. One load widens to an int16 vector of 4 k-pairs per 8 rows, shifts and
//     masks peel them off as madd_epi16 operands, as for int4.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EDGELM_AVX2 1
#endif

namespace {

constexpr int64_t QB = 32;  // activation quantization block (weights: one int4 block)
// K+V bytes of one KV head above which attention groups the heads sharing it (L2-sized); tests
// lower it to run the grouped path on short sequences.
int64_t g_group_attention_bytes = 256 << 10;
int64_t g_attention_parts = 0;  // key-range parts per (token, KV head); 0 = enough tasks for the threads

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#ifdef EDGELM_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef EDGELM_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  s = hsum(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {  // y += alpha * x
  int64_t i = 0;
#ifdef EDGELM_AVX2
  __m256 va = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += alpha * x[i];
}

#ifdef EDGELM_AVX2
// exp(x) for x <= 0 (softmax after subtracting the max), Cephes-style: 2^n * p(r), |rel err| < 2e-7.
inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// sc[0..S) = exp(sc - max(sc)); returns their sum (and the max in *max_out).
inline float softmax_numerators(float* sc, int64_t S, float* max_out = nullptr) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) mx = std::max(mx, sc[s]);
  if (max_out) *max_out = mx;
  float sum = 0.f;
  int64_t s = 0;
#ifdef EDGELM_AVX2
  __m256 acc = _mm256_setzero_ps();
  const __m256 vmx = _mm256_set1_ps(mx);
  for (; s + 8 <= S; s += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sc + s), vmx));
    _mm256_storeu_ps(sc + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; s < S; ++s) sum += (sc[s] = std::exp(sc[s] - mx));
  return sum;
}

// sc[0..n) = (q . K[s]) * scale for n keys (rows ks floats apart).
template <int DV>  // D / 8 when D is 64 or 128 (q in eight-float chunks), 0 = any D
void key_scores(const float* q, const float* Kb, int64_t ks, int64_t n, int64_t D, float scale, float* sc) {
  int64_t s0 = 0;
#ifdef EDGELM_AVX2
  if constexpr (DV > 0) {  // eight keys at a time: one horizontal reduction per 8 scores, not per score
    const __m256 vscale = _mm256_set1_ps(scale);
    for (; s0 + 8 <= n; s0 += 8) {
      __m256 a[8];
      for (int k = 0; k < 8; ++k) a[k] = _mm256_setzero_ps();
      for (int j = 0; j < DV; ++j) {
        const __m256 qj = _mm256_loadu_ps(q + 8 * j);
        for (int k = 0; k < 8; ++k) a[k] = _mm256_fmadd_ps(qj, _mm256_loadu_ps(Kb + (s0 + k) * ks + 8 * j), a[k]);
      }
      const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
      const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
      const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
      const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
      _mm256_storeu_ps(sc + s0, _mm256_mul_ps(r, vscale));
    }
  }
#endif
  for (int64_t s = s0; s < n; ++s) sc[s] = dot(q, Kb + s * ks, D) * scale;
}

// o (D) += sum_s p[s] V[s] over n values (rows vs floats apart).
template <int DV>
void accumulate_values(const float* p, const float* Vb, int64_t vs, int64_t n, int64_t D, float* o) {
#ifdef EDGELM_AVX2
  if constexpr (DV > 0) {  // the D outputs stay in registers across the n rows
    __m256 acc[DV];
    for (int j = 0; j < DV; ++j) acc[j] = _mm256_loadu_ps(o + 8 * j);
    for (int64_t s = 0; s < n; ++s) {
      const __m256 ps = _mm256_set1_ps(p[s]);
      const float* v = Vb + s * vs;
      for (int j = 0; j < DV; ++j) acc[j] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(v + 8 * j), acc[j]);
    }
    for (int j = 0; j < DV; ++j) _mm256_storeu_ps(o + 8 * j, acc[j]);
    return;
  }
#endif
  for (int64_t s = 0; s < n; ++s) axpy(p[s], Vb + s * vs, o, D);
}

// Calls f(std::integral_constant<int, DV>) with DV = D / 8 for head sizes 64 and 128, else 0.
template <class F>
void with_head_dim(int64_t D, F&& f) {
  if (D == 64) f(std::integral_constant<int, 8>{});
  else if (D == 128) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 0>{});
}

// One query head over S keys/values (rows `stride` floats apart): o = softmax(q K^T * scale) V.
// A tree verify passes `visible` (S - first bytes): which of the keys from `first` on the query sees.
template <int DV>
void attend_head(const float* q, const float* Kb, const float* Vb, int64_t kstride, int64_t vstride, int64_t S,
                 int64_t D, float scale, float* sc, float* o, const uint8_t* visible = nullptr, int64_t first = 0) {
  key_scores<DV>(q, Kb, kstride, S, D, scale, sc);
  if (visible != nullptr) {
    for (int64_t s = first; s < S; ++s) {
      if (!visible[s - first]) sc[s] = -INFINITY;
    }
  }
  const float inv = 1.f / softmax_numerators(sc, S);
  std::fill(o, o + D, 0.f);
  accumulate_values<DV>(sc, Vb, vstride, S, D, o);
  for (int64_t j = 0; j < D; ++j) o[j] *= inv;
}

// Long contexts: the G query heads sharing a KV head over keys [s0, s1), each K and V row read
// once for all G (a per-head pass re-reads the whole cache G times once it outgrows L2). Writes
// unnormalised outputs o (G, D), each head's score max and sum of exp (merged across parts later).
void attend_group_part(const float* q, int64_t G, const float* Kb, const float* Vb, int64_t ks, int64_t vs, int64_t s0,
                       int64_t s1, int64_t D, float scale, std::vector<float>& sc, float* o, float* mx, float* sum) {
  const int64_t n = s1 - s0;
  sc.resize(G * n);
  for (int64_t s = s0; s < s1; ++s) {
    const float* k = Kb + s * ks;
    for (int64_t h = 0; h < G; ++h) sc[h * n + s - s0] = dot(q + h * D, k, D) * scale;
  }
  for (int64_t h = 0; h < G; ++h) sum[h] = softmax_numerators(sc.data() + h * n, n, mx + h);
  std::fill(o, o + G * D, 0.f);
  for (int64_t s = s0; s < s1; ++s) {
    const float* v = Vb + s * vs;
    for (int64_t h = 0; h < G; ++h) axpy(sc[h * n + s - s0], v, o + h * D, D);
  }
}

// --- One decode token of a Mamba-2 mixer (edgelm/layers/mamba2.py: Mamba2Mixer.forward's module
// path is the reference), everything between in_proj and out_proj in one pass: the causal conv
// step, SiLU, softplus(dt + dt_bias), the state recurrence with the D skip, and the gated RMSNorm.
// zxbcdt (B, d_inner + C + H) in_proj's output; conv_w (C, K); conv_state (B, C, K-1); h (B, H, P, N).
// Returns {y (B, d_inner) for out_proj, new conv_state, new h}: the states are new tensors (a
// MambaCache snapshot keeps references to the old ones).
std::vector<at::Tensor> mamba_step(at::Tensor zxbcdt, at::Tensor conv_w, std::optional<at::Tensor> conv_b, at::Tensor conv_state,
                                   at::Tensor dt_bias, at::Tensor A, at::Tensor D, at::Tensor norm_w, at::Tensor h, int64_t G,
                                   double eps) {
  const int64_t Bsz = h.size(0), H = h.size(1), P = h.size(2), N = h.size(3), di = H * P, C = conv_w.size(0), K = conv_w.size(1);
  TORCH_CHECK(zxbcdt.scalar_type() == at::kFloat && h.scalar_type() == at::kFloat && conv_state.scalar_type() == at::kFloat,
              "mamba_step runs in fp32");
  TORCH_CHECK(zxbcdt.dim() == 2 && zxbcdt.size(0) == Bsz && zxbcdt.size(1) == di + C + H && C == di + 2 * G * N && H % G == 0,
              "mamba_step: zxbcdt must be (B, d_inner + conv_dim + H)");
  TORCH_CHECK(conv_state.size(0) == Bsz && conv_state.size(1) == C && conv_state.size(2) == K - 1, "conv_state must be (B, C, K-1)");
  auto in = zxbcdt.contiguous();
  auto w = conv_w.to(at::kFloat).contiguous();
  auto cs = conv_state.contiguous();
  auto hs = h.contiguous();
  auto bias = conv_b.has_value() ? conv_b->to(at::kFloat).contiguous() : at::Tensor();
  auto dtb = dt_bias.to(at::kFloat).contiguous(), a = A.to(at::kFloat).contiguous(), d = D.to(at::kFloat).contiguous();
  auto nw = norm_w.to(at::kFloat).contiguous();
  auto y = at::empty({Bsz, di}, in.options());
  auto new_cs = at::empty_like(cs);
  auto new_h = at::empty_like(hs);
  auto xbc = at::empty({Bsz, C}, in.options());  // after the conv and SiLU
  const float* ip = in.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* csp = cs.data_ptr<float>();
  float* ncs = new_cs.data_ptr<float>();
  float* xp = xbc.data_ptr<float>();
  const int64_t row = di + C + H;
  for (int64_t b = 0; b < Bsz; ++b) {  // conv step: out = w[K-1]·x + Σ_k w[k]·past[k] + bias (the reference's order)
    for (int64_t c = 0; c < C; ++c) {
      const float* past = csp + (b * C + c) * (K - 1);
      const float* wc = wp + c * K;
      const float xin = ip[b * row + di + c];
      float o = xin * wc[K - 1];
      for (int64_t k = 0; k < K - 1; ++k) o += past[k] * wc[k];
      if (bp != nullptr) o += bp[c];
      xp[b * C + c] = o / (1.f + std::exp(-o));  // SiLU
      float* next = ncs + (b * C + c) * (K - 1);
      for (int64_t k = 0; k + 1 < K - 1; ++k) next[k] = past[k + 1];
      if (K > 1) next[K - 2] = xin;
    }
  }
  const float* hp = hs.data_ptr<float>();
  float* nh = new_h.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t hg = H / G;
  {
    pybind11::gil_scoped_release release;
    at::parallel_for(0, Bsz * H, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {  // one (row, head): h = exp(dt·A)·h + dt·x ⊗ B; y = h·C + D·x
        const int64_t b = i / H, hh = i % H, g = hh / hg;
        const float raw = ip[b * row + di + C + hh] + dtb.data_ptr<float>()[hh];
        const float dt = raw > 20.f ? raw : std::log1p(std::exp(raw));  // softplus, threshold 20 as torch's
        const float decay = std::exp(dt * a.data_ptr<float>()[hh]);
        const float* x = xp + b * C + hh * P;
        const float* Bv = xp + b * C + di + g * N;
        const float* Cv = xp + b * C + di + G * N + g * N;
        for (int64_t p = 0; p < P; ++p) {
          const float* ho = hp + ((b * H + hh) * P + p) * N;
          float* hn = nh + ((b * H + hh) * P + p) * N;
          const float dx = dt * x[p];
          for (int64_t n = 0; n < N; ++n) hn[n] = ho[n] * decay + dx * Bv[n];
          yp[b * di + hh * P + p] = dot(hn, Cv, N) + x[p] * d.data_ptr<float>()[hh];
        }
      }
    });
  }
  const int64_t gs = di / G;
  for (int64_t b = 0; b < Bsz; ++b) {  // gated RMSNorm per group: rmsnorm(y · silu(z)) · w
    const float* z = ip + b * row;
    float* yb = yp + b * di;
    for (int64_t j = 0; j < di; ++j) yb[j] *= z[j] / (1.f + std::exp(-z[j]));
    for (int64_t g = 0; g < G; ++g) {
      float ss = 0.f;
      for (int64_t j = g * gs; j < (g + 1) * gs; ++j) ss += yb[j] * yb[j];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(gs) + static_cast<float>(eps));
      for (int64_t j = g * gs; j < (g + 1) * gs; ++j) yb[j] = yb[j] * inv * nw.data_ptr<float>()[j];
    }
  }
  return {y, new_cs, new_h};
}

// --- InfLLM v2 block-sparse attention for the decode step (edgelm/layers/sparse_attention.py is
// the reference: select_blocks, attend_selected). Block size 0 = dense attention.
struct SparseCfg {
  int64_t block = 0, ksize = 32, kstride = 16, init = 1, window = 2048, topk = 64, dense_len = 8192;
};

inline int64_t num_kernels(int64_t len, int64_t p, int64_t s) { return len < p ? 0 : (len - p) / s + 1; }

// Blocks (ascending ids) that the query at position t of KV head group q (G, D) attends to: the
// init blocks and those overlapping the local window, plus the top-k others by block score: the G
// heads' softmaxes over the visible key kernels kern (row i every kst floats), summed, each block
// taking the max over the kernels overlapping it (ties go to the lower block id).
template <int DV>
void select_blocks(const float* q, int64_t G, const float* kern, int64_t kst, int64_t t, int64_t D, float scale,
                   const SparseCfg& c, std::vector<float>& tmp, std::vector<float>& score, std::vector<int64_t>& out) {
  const int64_t nk = num_kernels(t + 1, c.ksize, c.kstride), nb = t / c.block + 1;
  score.assign(nk, 0.f);
  tmp.resize(nk);
  for (int64_t h = 0; h < G && nk > 0; ++h) {
    key_scores<DV>(q + h * D, kern, kst, nk, D, scale, tmp.data());
    const float sum = softmax_numerators(tmp.data(), nk);
    for (int64_t i = 0; i < nk; ++i) score[i] += tmp[i] / sum;
  }
  const int64_t r = c.block / c.kstride, pad = c.ksize / c.kstride - 1;
  out.clear();
  std::vector<std::pair<float, int64_t>> cand;  // (-block score, id): sorted ascending = best first, lower id on ties
  for (int64_t j = 0; j < nb; ++j) {
    const bool forced = j < c.init || (j + 1) * c.block - 1 >= t - c.window + 1;
    if (forced) {
      out.push_back(j);
      continue;
    }
    float best = -INFINITY;
    for (int64_t i = std::max<int64_t>(0, j * r - pad); i < std::min(nk, j * r - pad + r + pad); ++i) best = std::max(best, score[i]);
    if (best > -INFINITY) cand.emplace_back(-best, j);
  }
  const int64_t k = std::min<int64_t>(c.topk, cand.size());
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end());
  for (int64_t i = 0; i < k; ++i) out.push_back(cand[i].second);
  std::sort(out.begin(), out.end());
}

// The keys at or before t of ascending block ids (block size m) as runs [start, start + length):
// adjacent blocks (the local window) merge into one run.
void block_runs(const std::vector<int64_t>& blocks, int64_t m, int64_t t, std::vector<std::pair<int64_t, int64_t>>& runs) {
  runs.clear();
  for (int64_t j : blocks) {
    const int64_t s0 = j * m, s1 = std::min(j * m + m, t + 1);
    if (s1 <= s0) continue;
    if (!runs.empty() && runs.back().first + runs.back().second == s0) runs.back().second += s1 - s0;
    else runs.emplace_back(s0, s1 - s0);
  }
}

constexpr int64_t kMaxGroup = 64;  // query heads per KV head the sparse routines take

// The G query heads q (G, D) of one KV head over the keys of `runs`: o (G, D) = softmax(q K^T * scale) V.
// Each run's K (then V) rows are read once for all G heads: they stay in L1 while the heads use them.
template <int DV>
void attend_group_runs(const float* q, int64_t G, const float* Kb, const float* Vb, int64_t ks, int64_t vs,
                       const std::vector<std::pair<int64_t, int64_t>>& runs, int64_t D, float scale, std::vector<float>& sc,
                       float* o) {
  int64_t n = 0;
  for (const auto& r : runs) n += r.second;
  sc.resize(G * n);
  int64_t i = 0;
  for (const auto& [s0, len] : runs) {
    for (int64_t h = 0; h < G; ++h) key_scores<DV>(q + h * D, Kb + s0 * ks, ks, len, D, scale, sc.data() + h * n + i);
    i += len;
  }
  float inv[kMaxGroup];  // G <= kMaxGroup: checked by sparse_attention and set_sparse
  for (int64_t h = 0; h < G; ++h) inv[h] = 1.f / softmax_numerators(sc.data() + h * n, n);
  std::fill(o, o + G * D, 0.f);
  i = 0;
  for (const auto& [s0, len] : runs) {
    for (int64_t h = 0; h < G; ++h) accumulate_values<DV>(sc.data() + h * n + i, Vb + s0 * vs, vs, len, D, o + h * D);
    i += len;
  }
  for (int64_t h = 0; h < G; ++h) {
    for (int64_t j = 0; j < D; ++j) o[h * D + j] *= inv[h];
  }
}

// One (token at position t, KV head) of InfLLM v2 attention: dense below dense_len, else the selected blocks.
template <int DV>
void sparse_group(const float* q, int64_t G, const float* Kb, const float* Vb, int64_t ks, int64_t vs, const float* kern,
                  int64_t kst, int64_t t, int64_t D, float scale, const SparseCfg& c, std::vector<float>& sc,
                  std::vector<float>& tmp, std::vector<float>& score, std::vector<int64_t>& blocks,
                  std::vector<std::pair<int64_t, int64_t>>& runs, float* o) {
  if (t + 1 < c.dense_len) {
    runs.assign(1, {0, t + 1});
  } else {
    select_blocks<DV>(q, G, kern, kst, t, D, scale, c, tmp, score, blocks);
    block_runs(blocks, c.block, t, runs);
  }
  attend_group_runs<DV>(q, G, Kb, Vb, ks, vs, runs, D, scale, sc, o);
}

// InfLLM v2 attention for queries q (B, H, C, D) at positions pos0 + c over k/v (B, Hkv, >= pos0 + C, D)
// and their pooled key kernels (B, Hkv, >= nk, D): one task per (row, KV head, query), selection
// and attention over exactly the chosen blocks (layers/sparse_attention.py: sparse_attend is the reference).
at::Tensor sparse_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kern, int64_t pos0, std::vector<int64_t> cfg,
                            double scale) {
  TORCH_CHECK(cfg.size() == 7, "cfg: block, kernel_size, kernel_stride, init_blocks, window_size, topk, dense_len");
  const SparseCfg c{cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], cfg[5], cfg[6]};
  for (const auto& x : {q, k, v, kern}) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 4 && x.stride(3) == 1, "sparse_attention: fp32 (B, heads, S, D) tensors");
  }
  q = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), C = q.size(2), D = q.size(3), Hkv = k.size(1), G = H / Hkv;
  TORCH_CHECK(H % Hkv == 0 && G <= kMaxGroup && k.size(3) == D && v.size(3) == D && kern.size(3) == D && k.size(2) >= pos0 + C &&
                  v.size(2) >= pos0 + C && kern.size(2) >= num_kernels(pos0 + C, c.ksize, c.kstride),
              "sparse_attention: shapes do not match");
  auto out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float *K = k.data_ptr<float>(), *V = v.data_ptr<float>(), *kp = kern.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc_scale = static_cast<float>(scale);
  with_head_dim(D, [&](auto dv) {
    at::parallel_for(0, B * Hkv * C, 4, [&](int64_t i0, int64_t i1) {
      std::vector<float> sc, tmp, score, qg(G * D), og(G * D);
      std::vector<int64_t> blocks;
      std::vector<std::pair<int64_t, int64_t>> runs;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / (Hkv * C), g = i / C % Hkv, ci = i % C;
        for (int64_t h = 0; h < G; ++h) std::memcpy(qg.data() + h * D, qp + ((b * H + g * G + h) * C + ci) * D, D * 4);
        sparse_group<decltype(dv)::value>(qg.data(), G, K + b * k.stride(0) + g * k.stride(1), V + b * v.stride(0) + g * v.stride(1),
                                          k.stride(2), v.stride(2), kp + b * kern.stride(0) + g * kern.stride(1), kern.stride(2),
                                          pos0 + ci, D, sc_scale, c, sc, tmp, score, blocks, runs, og.data());
        for (int64_t h = 0; h < G; ++h) std::memcpy(op + ((b * H + g * G + h) * C + ci) * D, og.data() + h * D, D * 4);
      }
    });
  });
  return out;
}

// Activations, int16 per 32-block: x[m, k] ~= xs[m, b] * xq[m, k]; xss[m, b] = xs * sum(xq of block).
// int16, not llama.cpp's int8: int8 rounding costs ~1% relative error per matmul, which over 30
// layers flips SmolLM2's answers (it and llama.cpp answer "What is the capital of France?" with
// "L'Étoile, ..."); int16 rounding is ~1e-5 and madd_epi16 costs about what maddubs does.
struct QActs {
  std::vector<int16_t> q;
  std::vector<float> s, ss;
#ifdef EDGELM_AVX2
  // pairs[m * K/2 + j]: activation pair j of row m (int16 x[2j], x[2j+1]) broadcast to every 32-bit
  // lane, for the tile kernels to load as madd_epi16's operand (see madd_rows).
  std::vector<__m256i> pairs;
#endif
  int64_t M = 0, K = 0;

  void quantize(const float* x, int64_t M_, int64_t K_) {
    M = M_, K = K_;
    const int64_t nb = K / QB;
    q.resize(M * K), s.resize(M * nb), ss.resize(M * nb);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + m * K + b * QB;
        float amax = 0.f;
        for (int64_t j = 0; j < QB; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 32767.f, id = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        int16_t* qb = q.data() + m * K + b * QB;
        for (int64_t j = 0; j < QB; ++j) {
          const int v = static_cast<int>(std::nearbyint(xb[j] * id));
          qb[j] = static_cast<int16_t>(v);
          sum += v;
        }
        s[m * nb + b] = d;
        ss[m * nb + b] = d * static_cast<float>(sum);
      }
    }
#ifdef EDGELM_AVX2
    pairs.resize(M * K / 2);
    const int32_t* qp = reinterpret_cast<const int32_t*>(q.data());
    for (int64_t i = 0; i < M * K / 2; ++i) pairs[i] = _mm256_set1_epi32(qp[i]);
#endif
  }
};

// Rows per parallel task: enough work to amortise the thread hand-off (~100 KB of weights).
// Dense fp32 matmuls of up to this many rows run f32_rows (passes of 8 rows over an L2-sized slice
// of the weights); more rows go to MKL's GEMM, which only wins for prompts.
constexpr int64_t kFewRows = 64;

inline int64_t grain_rows(int64_t bytes_per_row) { return std::max<int64_t>(8, (96 << 10) / std::max<int64_t>(1, bytes_per_row)); }

#ifdef EDGELM_AVX2
// Eight blocks' int32x8 partial dot products -> one vector of the eight block sums (as floats).
inline __m256 reduce8(const __m256i* p) {
  const __m256i t0 = _mm256_hadd_epi32(p[0], p[1]), t1 = _mm256_hadd_epi32(p[2], p[3]);
  const __m256i t2 = _mm256_hadd_epi32(p[4], p[5]), t3 = _mm256_hadd_epi32(p[6], p[7]);
  const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  const __m256i r = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
  return _mm256_cvtepi32_ps(r);
}
#endif

#ifdef EDGELM_AVX2
// dot of 32 int16 activations (two vectors) with 32 int16 weights (two vectors) -> int32x8
inline __m256i dot32(__m256i w0, __m256i w1, const int16_t* x) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
  return _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
}

// a 16-byte int4 block -> its 32 codes as two int16x16 vectors (elements 0..15, 16..31)
inline void unpack_block(const uint8_t* p, __m256i& w0, __m256i& w1) {
  // widen each byte (lo | hi << 4) to int16 once, then split: lo = v & 15, hi = v >> 4
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  w0 = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
  w1 = _mm256_srli_epi16(v, 4);
}

// The tile kernels read their weights as one stream per thread; a software prefetch this far
// ahead keeps more lines in flight than the hardware prefetcher does when both cores stream
// (int4 GEMV over a 49152 x 576 head, both cores busy: 1.07-1.13x in a standalone test).
constexpr int64_t kPrefetchBytes = 1024;

template <int LINES>
inline void prefetch_lines(const void* p) {
  for (int i = 0; i < LINES; ++i) _mm_prefetch(static_cast<const char*>(p) + 64 * i, _MM_HINT_T0);
}

// dot[m] += madd(w, row m's activation pair `pair` broadcast to every lane), m < MB: the tile
// kernels' inner step (lane i of w holds a k-pair of tile row i). kPairs loads the broadcast pair
// from QActs::pairs (xv: a block's pairs, row stride K/2); otherwise it broadcasts from the int16
// activations (xb: the block's, row stride K). Loads save the shuffle ports the weight unpacking
// needs (int4 and int8 GEMV 1.13x, int8 1.2-1.3x on a 49152 x 576 head at 1-2 rows), but 8 rows of
// int8 were 0.88x with them (their 4 KB of pairs per block crowd L1), so int8 takes them up to 4.
template <int MB, bool kPairs>
inline void madd_rows(__m256i* dot, __m256i w, const __m256i* xv, const int16_t* xb, int64_t K, int pair) {
  for (int m = 0; m < MB; ++m) {
    const __m256i x = kPairs ? _mm256_loadu_si256(xv + m * (K / 2) + pair)
                             : _mm256_set1_epi32(reinterpret_cast<const int32_t*>(xb + m * K)[pair]);
    dot[m] = _mm256_add_epi32(dot[m], _mm256_madd_epi16(w, x));
  }
}
#endif

// The two zero-point tile formats (header): W[n, k] = code * d + mn per 32-block, so per block and
// activation row y += d * xs * dot(code, xq) + mn * xss (xss = xs * sum(xq)). Each gives a tile's
// block bytes, its codes' madd_epi16 steps into dot[MB] (AVX2), its (d, mn) per row, and for the
// scalar build one code at a time.
struct Int4Tiles {  // int4 "blocks": W = (q - 8) * scale + zero, so d = scale, mn = zero - 8 * scale
  const uint8_t* qs;
  const uint16_t* sz;
  static constexpr int kLines = 2;  // 128-byte blocks
  const uint8_t* block(int64_t t, int64_t b, int64_t nb) const { return qs + (t * nb + b) * 128; }
#ifdef EDGELM_AVX2
  template <int MB>
  void madd_block(const uint8_t* p, __m256i* dot, const __m256i* xv, const int16_t* xb, int64_t K) const {
    for (int c = 0; c < 8; ++c) {
      __m256i lo, hi;
      unpack_block(p + 16 * c, lo, hi);
      madd_rows<MB, true>(dot, lo, xv, xb, K, c);  // k = 2c, 2c + 1
      madd_rows<MB, true>(dot, hi, xv, xb, K, c + 8);  // k = 16 + 2c, 17 + 2c
    }
  }
  void scales(int64_t t, int64_t b, int64_t nb, __m256& d, __m256& mn) const {
    const __m256i dz = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + (t * nb + b) * 16));  // scale[8], zero[8]
    d = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(dz)), 16));
    const __m256 z = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(dz, 1)), 16));
    mn = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), d, z);
  }
#endif
  int code(const uint8_t* p, int i, int k) const {  // row i of the tile, k in 0..31
    const uint8_t byte = p[16 * ((k % 16) / 2) + 2 * i + k % 2];
    return k < 16 ? byte & 15 : byte >> 4;
  }
  void scale(int64_t t, int64_t b, int64_t nb, int i, float& d, float& mn) const {
    d = bf16_to_float(sz[(t * nb + b) * 16 + i]);
    mn = bf16_to_float(sz[(t * nb + b) * 16 + 8 + i]) - 8.f * d;
  }
};

struct TernaryTiles {  // codes c = w + 1 in 0..2, W = (c - 1) * scale, so d = scale, mn = -scale
  const uint8_t* qs;
  const at::Half* sc;
  static constexpr int kLines = 1;  // 64-byte blocks: the same 16 madd_epi16 per row from half int4's bytes
  const uint8_t* block(int64_t t, int64_t b, int64_t nb) const { return qs + (t * nb + b) * 64; }
#ifdef EDGELM_AVX2
  template <int MB>
  void madd_block(const uint8_t* p, __m256i* dot, const __m256i* xv, const int16_t* xb, int64_t K) const {
    const __m256i three = _mm256_set1_epi16(3);
    for (int c = 0; c < 4; ++c) {  // bits 2s..2s+1 of each byte: k = 2c + 8s, 2c + 8s + 1
      const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * c)));
      madd_rows<MB, true>(dot, _mm256_and_si256(v, three), xv, xb, K, c);
      madd_rows<MB, true>(dot, _mm256_and_si256(_mm256_srli_epi16(v, 2), three), xv, xb, K, c + 4);
      madd_rows<MB, true>(dot, _mm256_and_si256(_mm256_srli_epi16(v, 4), three), xv, xb, K, c + 8);
      madd_rows<MB, true>(dot, _mm256_srli_epi16(v, 6), xv, xb, K, c + 12);
    }
  }
  void scales(int64_t t, int64_t b, int64_t nb, __m256& d, __m256& mn) const {
    d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + (t * nb + b) * 8)));
    mn = _mm256_sub_ps(_mm256_setzero_ps(), d);
  }
#endif
  int code(const uint8_t* p, int i, int k) const {
    const int r = k % 8;
    return (p[16 * (r / 2) + 2 * i + r % 2] >> (2 * (k / 8))) & 3;
  }
  void scale(int64_t t, int64_t b, int64_t nb, int i, float& d, float& mn) const {
    d = static_cast<float>(sc[(t * nb + b) * 8 + i]);
    mn = -d;
  }
};

// y[m, 8t + i] for tiles t in [t0, t1) of a zero-point tile format F, MB activation rows.
// Per (tile, block, row): 16 madd_epi16 of the unpacked weights with broadcast activation pairs
// into one int32x8 (lane i = row 8t + i), then scales as vectors: ~2x fewer instructions per
// weight than a row-major kernel's horizontal sums, and the unpacked weights serve all MB rows.
template <int MB, typename F>
void zp_tiles(const QActs& a, int64_t m0, const F& f, const float* bias, float* y, int64_t N, int64_t t0, int64_t t1) {
  const int64_t K = a.K, nb = K / QB;
  const int16_t* xq = a.q.data() + m0 * K;
  const float* xs = a.s.data() + m0 * nb;
  const float* xss = a.ss.data() + m0 * nb;
#ifdef EDGELM_AVX2
  const __m256i* xv = a.pairs.data() + m0 * (K / 2);
#endif
  for (int64_t t = t0; t < t1; ++t) {
#ifdef EDGELM_AVX2
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i dot[MB];
      for (int m = 0; m < MB; ++m) dot[m] = _mm256_setzero_si256();
      const uint8_t* p = f.block(t, b, nb);
      prefetch_lines<F::kLines>(p + kPrefetchBytes);
      f.template madd_block<MB>(p, dot, xv + b * 16, xq + b * QB, K);
      __m256 d, mn;
      f.scales(t, b, nb, d, mn);
      for (int m = 0; m < MB; ++m) {
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m]), _mm256_mul_ps(d, _mm256_set1_ps(xs[m * nb + b])), acc[m]);
        acc[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xss[m * nb + b]), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      __m256 v = acc[m];
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * t));
      _mm256_storeu_ps(y + (m0 + m) * N + 8 * t, v);
    }
#else
    for (int m = 0; m < MB; ++m) {
      for (int i = 0; i < 8; ++i) {
        float v = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* p = f.block(t, b, nb);
          const int16_t* xb = xq + m * K + b * QB;
          int sum = 0;
          for (int k = 0; k < QB; ++k) sum += f.code(p, i, k) * xb[k];
          float d, mn;
          f.scale(t, b, nb, i, d, mn);
          v += d * xs[m * nb + b] * sum + mn * xss[m * nb + b];
        }
        y[(m0 + m) * N + 8 * t + i] = v + (bias ? bias[8 * t + i] : 0.f);
      }
    }
#endif
  }
}

// y[m, 8t + i] for int8 tiles t in [t0, t1) (header): as zp_tiles, sixteen 16-byte chunks per
// block, each widened to one int16 vector; the per-channel scales are applied once at the end.
template <int MB>
void q8_tiles(const QActs& a, int64_t m0, const int8_t* w, const uint16_t* scale, const float* bias, float* y, int64_t N,
              int64_t t0, int64_t t1) {
  const int64_t K = a.K, nb = K / QB;
  const int16_t* xq = a.q.data() + m0 * K;
  const float* xs = a.s.data() + m0 * nb;
#ifdef EDGELM_AVX2
  const __m256i* xv = a.pairs.data() + m0 * (K / 2);
#endif
  for (int64_t t = t0; t < t1; ++t) {
    const int8_t* wt = w + t * nb * 256;
#ifdef EDGELM_AVX2
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i dot[MB];
      for (int m = 0; m < MB; ++m) dot[m] = _mm256_setzero_si256();
      const int8_t* p = wt + b * 256;
      prefetch_lines<4>(p + kPrefetchBytes);
      for (int c = 0; c < 16; ++c) {
        const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * c)));
        madd_rows<MB, (MB <= 4)>(dot, v, xv + b * 16, xq + b * QB, K, c);
      }
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m]), _mm256_set1_ps(xs[m * nb + b]), acc[m]);
    }
    const __m256 sc = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + 8 * t))), 16));
    for (int m = 0; m < MB; ++m) {
      __m256 v = _mm256_mul_ps(acc[m], sc);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * t));
      _mm256_storeu_ps(y + (m0 + m) * N + 8 * t, v);
    }
#else
    for (int m = 0; m < MB; ++m) {
      for (int i = 0; i < 8; ++i) {
        float v = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          int dotq = 0;
          for (int c = 0; c < 16; ++c) {
            for (int j = 0; j < 2; ++j) dotq += wt[b * 256 + 16 * c + 2 * i + j] * xq[m * K + b * QB + 2 * c + j];
          }
          v += xs[m * nb + b] * dotq;
        }
        y[(m0 + m) * N + 8 * t + i] = v * bf16_to_float(scale[8 * t + i]) + (bias ? bias[8 * t + i] : 0.f);
      }
    }
#endif
  }
}

// Calls f(std::integral_constant<int, MB>(), m) over rows [0, M) in chunks of MB <= MAX rows
// starting at m: each chunk reads the weights once, and MB is a compile-time count of registers
// (8 for the tile kernels: 8 rows' int32 sums plus the unpacked block fit the 16 ymm registers,
// and for the fp32 kernel; 4 for the int8 tail kernel, whose accumulators are per weight row).
template <int R, typename F>
void rest_chunk(int64_t rows, int64_t m, F& f) {
  if constexpr (R > 0) {
    if (rows == R) f(std::integral_constant<int, R>(), m);
    else rest_chunk<R - 1>(rows, m, f);
  }
}

template <int MAX, typename F>
void for_row_chunks(int64_t M, F f) {
  int64_t m = 0;
  for (; m + MAX <= M; m += MAX) f(std::integral_constant<int, MAX>(), m);
  rest_chunk<MAX - 1>(M - m, m, f);
}

// f(s0, s1) over [0, n) in slices of at most `grain` weight rows, split among the threads.
// at::parallel_for hands each thread one contiguous range (half the weights on two threads), so
// the slicing is done here: all of a call's row chunks (passes of 8 activation rows) run over one
// L2-sized slice before the next, and passes after the first read the weights from L2, not memory.
template <typename F>
void for_slices(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t s = n0; s < n1; s += grain) f(s, std::min(n1, s + grain));
  });
}

// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias) for the row-major tail rows n in [n0, n1) of an int8
// W (N % 8 of them): eight blocks' int32 sums reduced into one vector, then the activation scales.
template <int MB>
void q8_rows(const QActs& a, int64_t m0, const int8_t* w, const uint16_t* scale, const float* bias, float* y,
             int64_t N, int64_t n0, int64_t n1) {
  const int64_t K = a.K, nb = K / QB;
  const int16_t* xq = a.q.data() + m0 * K;
  const float* xs = a.s.data() + m0 * nb;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    float sums[MB];
    for (int m = 0; m < MB; ++m) sums[m] = 0.f;
    int64_t b = 0;
#ifdef EDGELM_AVX2
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    auto widen = [&](int64_t blk, __m256i& w0, __m256i& w1) {
      w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + blk * QB)));
      w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + blk * QB + 16)));
    };
    for (; b + 8 <= nb; b += 8) {
      __m256i w0[8], w1[8];
      for (int j = 0; j < 8; ++j) widen(b + j, w0[j], w1[j]);
      for (int m = 0; m < MB; ++m) {
        __m256i p[8];
        for (int j = 0; j < 8; ++j) p[j] = dot32(w0[j], w1[j], xq + m * K + (b + j) * QB);
        acc[m] = _mm256_fmadd_ps(reduce8(p), _mm256_loadu_ps(xs + m * nb + b), acc[m]);
      }
    }
    for (; b < nb; ++b) {  // tail blocks, one at a time
      __m256i w0, w1;
      widen(b, w0, w1);
      for (int m = 0; m < MB; ++m) {
        const __m256i p = dot32(w0, w1, xq + m * K + b * QB);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xs[m * nb + b]), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) sums[m] = hsum(acc[m]);
#endif
    for (; b < nb; ++b) {
      for (int m = 0; m < MB; ++m) {
        int dotq = 0;
        for (int j = 0; j < QB; ++j) dotq += wr[b * QB + j] * xq[m * K + b * QB + j];
        sums[m] += xs[m * nb + b] * dotq;
      }
    }
    const float sc = bf16_to_float(scale[n]);
    for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = sums[m] * sc + (bias ? bias[n] : 0.f);
  }
}

// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias) for fp32 W, rows n in [n0, n1), MB <= 8 activation
// rows from m0 in one pass: R weight rows at a time (2 while MB <= 6, else 1, so the R * MB
// accumulators fit the 16 ymm registers), each 8-float slice loaded once for all MB rows. MKL's
// GEMM for 2-32 rows costs ~2.5-8x its one-row GEMV here; this stays near the memory time until
// the FMAs bound it (~8 rows). Every output sums its k-slices in the same order for any MB and R.
template <int MB>
void f32_rows(const float* x, int64_t K, int64_t m0, const float* w, const float* bias, float* y, int64_t N, int64_t n0,
              int64_t n1) {
  // Few activation rows are bandwidth-bound: more weight rows per pass keep more streams from
  // memory in flight (one row: 2 weight rows reached ~13 GB/s from DRAM on this CPU, 6 ~18; two
  // rows: 4 weight rows, 1.05-1.15x over 2). From three rows one weight row per pass is best: side
  // by side with 3 / 2 weight rows per pass, 3-6 activation rows ran 1.0-1.1x / 1.2-1.4x faster
  // with it (49152 x 576 and 3072 x 576, 2 threads). Accumulators R x MB stay within 12 registers.
  constexpr int R = MB == 1 ? 6 : MB == 2 ? 4 : 1;
  const float* xr = x + m0 * K;
  int64_t n = n0;
#ifdef EDGELM_AVX2
  for (; n + R <= n1; n += R) {
    __m256 acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      __m256 v[R];
      for (int r = 0; r < R; ++r) v[r] = _mm256_loadu_ps(w + (n + r) * K + k);
      for (int m = 0; m < MB; ++m) {
        const __m256 xv = _mm256_loadu_ps(xr + m * K + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(v[r], xv, acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float* wr = w + (n + r) * K;
      for (int m = 0; m < MB; ++m) {
        float s = hsum(acc[r][m]);
        for (int64_t kk = k; kk < K; ++kk) s += wr[kk] * xr[m * K + kk];
        y[(m0 + m) * N + n + r] = s + (bias ? bias[n + r] : 0.f);
      }
    }
  }
#endif
  for (; n < n1; ++n) {
    for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = dot(w + n * K, xr + m * K, K) + (bias ? bias[n] : 0.f);
  }
}


struct Linear {
  int kind = 0;  // 0 dense fp32 (w (N, K)), 1 int4 blocks, 2 int8 per channel, 3 ternary tiles
  at::Tensor w, s, bias;
  int64_t N = 0, K = 0;

  // y (M, N) = x (M, K) @ W^T + bias; `a` holds x quantized when kind != 0.
  void run(const float* x, int64_t M, QActs& a, float* y) const {
    const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
    if (kind == 0 && M <= kFewRows && w.is_contiguous()) {  // few rows: f32_rows, 8 rows per pass
      const float* wp = w.data_ptr<float>();
      for_slices(N, std::max<int64_t>(2, grain_rows(K * 4)), [&](int64_t n0, int64_t n1) {
        for_row_chunks<8>(M, [&](auto mb, int64_t m) { f32_rows<decltype(mb)::value>(x, K, m, wp, b, y, N, n0, n1); });
      });
      return;
    }
    if (kind == 0) {
      auto xt = at::from_blob(const_cast<float*>(x), {M, K}, at::kFloat);
      auto yt = at::from_blob(y, {M, N}, at::kFloat);
      if (bias.defined()) at::addmm_out(yt, bias, xt, w.t());
      else at::mm_out(yt, xt, w.t());
      return;
    }
    a.quantize(x, M, K);
    if (kind == 1) {
      const uint8_t* qs = w.data_ptr<uint8_t>();
      const uint16_t* sz = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
      const int64_t tiles = N / 8;
      for_slices(tiles, std::max<int64_t>(1, grain_rows(K / 2) / 8), [&](int64_t t0, int64_t t1) {
        for_row_chunks<8>(M, [&](auto mb, int64_t m) { zp_tiles<decltype(mb)::value>(a, m, Int4Tiles{qs, sz}, b, y, N, t0, t1); });
      });
    } else if (kind == 3) {
      const uint8_t* qs = w.data_ptr<uint8_t>();
      const at::Half* sc = s.data_ptr<at::Half>();
      for_slices(N / 8, std::max<int64_t>(1, grain_rows(K / 4) / 8), [&](int64_t t0, int64_t t1) {
        for_row_chunks<8>(M, [&](auto mb, int64_t m) { zp_tiles<decltype(mb)::value>(a, m, TernaryTiles{qs, sc}, b, y, N, t0, t1); });
      });
    } else {
      const int8_t* wq = w.data_ptr<int8_t>();
      const uint16_t* sc = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
      const int64_t tiles = N / 8;
      for_slices(tiles, std::max<int64_t>(1, grain_rows(K) / 8), [&](int64_t t0, int64_t t1) {
        for_row_chunks<8>(M, [&](auto mb, int64_t m) { q8_tiles<decltype(mb)::value>(a, m, wq, sc, b, y, N, t0, t1); });
      });
      if (N % 8) {  // the row-major tail rows
        for_row_chunks<4>(M, [&](auto mb, int64_t m) { q8_rows<decltype(mb)::value>(a, m, wq, sc, b, y, N, 8 * tiles, N); });
      }
    }
  }
};

void check_linear(const Linear& l) {
  TORCH_CHECK(l.kind == 0 || l.K % QB == 0, "edgelm's int kernels need in_features divisible by 32, got ", l.K);
  if (l.bias.defined()) TORCH_CHECK(l.bias.scalar_type() == at::kFloat && l.bias.is_contiguous(), "bias must be contiguous fp32");
  if (l.kind == 0) {
    TORCH_CHECK(l.w.scalar_type() == at::kFloat && l.w.dim() == 2, "dense weight must be 2-D fp32");
  } else if (l.kind == 1) {
    TORCH_CHECK(l.w.scalar_type() == at::kByte && l.w.is_contiguous() && l.w.size(1) * 2 == l.K, "int4 qs must be (N, K/2) uint8");
    TORCH_CHECK(l.s.scalar_type() == at::kBFloat16 && l.s.is_contiguous() && l.s.numel() == l.N * (l.K / QB) * 2,
                "int4 scales must be (N, K/32, 2) bf16 (one pair per 32-block)");
    TORCH_CHECK(l.N % 8 == 0, "int4 rows come in tiles of 8, got N = ", l.N);
  } else if (l.kind == 2) {
    TORCH_CHECK(l.w.scalar_type() == at::kChar && l.w.is_contiguous() && l.w.size(1) == l.K, "int8 weight must be (N, K) int8");
    TORCH_CHECK(l.s.scalar_type() == at::kBFloat16 && l.s.numel() == l.N, "int8 scales must be (N,) bf16");
  } else if (l.kind == 3) {
    TORCH_CHECK(l.w.scalar_type() == at::kByte && l.w.is_contiguous() && l.w.size(1) * 4 == l.K, "ternary codes must be (N, K/4) uint8");
    TORCH_CHECK(l.s.scalar_type() == at::kHalf && l.s.is_contiguous() && l.s.numel() == l.N * (l.K / QB),
                "ternary scales must be (N, K/32) fp16 (one per 32-block)");
    TORCH_CHECK(l.N % 8 == 0, "ternary rows come in tiles of 8, got N = ", l.N);
  } else {
    TORCH_CHECK(false, "unknown linear kind ", l.kind);
  }
}

Linear make_linear(int64_t kind, at::Tensor w, at::Tensor s, c10::optional<at::Tensor> bias) {
  Linear l;
  l.kind = static_cast<int>(kind), l.w = w, l.s = s;
  l.N = w.size(0);
  l.K = w.size(1) * (kind == 1 ? 2 : kind == 3 ? 4 : 1);
  if (bias) l.bias = *bias;
  check_linear(l);
  return l;
}

// One-off matmul for the nn.Module path: x (..., K) fp32 -> (..., N) fp32.
at::Tensor linear_forward(const Linear& l, at::Tensor x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "edgelm kernels take fp32 activations");
  auto x2 = x.reshape({-1, l.K}).contiguous();
  const int64_t M = x2.size(0);
  auto y = at::empty({M, l.N}, x.options());
  QActs a;
  {
    pybind11::gil_scoped_release release;
    l.run(x2.data_ptr<float>(), M, a, y.data_ptr<float>());
  }
  auto shape = x.sizes().vec();
  shape.back() = l.N;
  return y.view(shape);
}

// Row n of a quantized Linear's weight in fp32, bit-identical to the torch reference (dequantize_int4,
// int8 codes * scale, ternary_values).
void dequantize_row(const Linear& l, int64_t n, float* row) {
  const int64_t K = l.K, nb = K / QB;
  if (l.kind == 1) {
    const uint8_t* qs = l.w.data_ptr<uint8_t>();
    const uint16_t* sz = reinterpret_cast<const uint16_t*>(l.s.data_ptr<at::BFloat16>());
    const int64_t t = n / 8, i = n % 8;  // tile, row in it
    for (int64_t b = 0; b < nb; ++b) {
      const float d = bf16_to_float(sz[(t * nb + b) * 16 + i]), z = bf16_to_float(sz[(t * nb + b) * 16 + 8 + i]);
      for (int j = 0; j < 16; ++j) {  // codes k = j and k = j + 16 of the block
        const uint8_t byte = qs[(t * nb + b) * 128 + 16 * (j / 2) + 2 * i + j % 2];
        row[b * QB + j] = static_cast<float>((byte & 15) - 8) * d + z;
        row[b * QB + j + 16] = static_cast<float>((byte >> 4) - 8) * d + z;
      }
    }
    return;
  }
  if (l.kind == 3) {
    const uint8_t* qs = l.w.data_ptr<uint8_t>();
    const at::Half* sc = l.s.data_ptr<at::Half>();
    const int64_t t = n / 8, i = n % 8;
    for (int64_t b = 0; b < nb; ++b) {
      const float d = static_cast<float>(sc[(t * nb + b) * 8 + i]);
      for (int c = 0; c < 4; ++c) {
        for (int j = 0; j < 2; ++j) {
          const uint8_t byte = qs[(t * nb + b) * 64 + 16 * c + 2 * i + j];
          for (int q = 0; q < 4; ++q) row[b * QB + 2 * c + j + 8 * q] = static_cast<float>(((byte >> (2 * q)) & 3) - 1) * d;
        }
      }
    }
    return;
  }
  const int8_t* w = l.w.data_ptr<int8_t>();
  const float sc = bf16_to_float(reinterpret_cast<const uint16_t*>(l.s.data_ptr<at::BFloat16>())[n]);
  if (n < l.N / 8 * 8) {  // tile n / 8, row n % 8: byte 16c + 2i + j of each block's 256
    const int8_t* wt = w + (n / 8) * nb * 256 + 2 * (n % 8);
    for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(wt[(k / QB) * 256 + 16 * ((k % QB) / 2) + k % 2]) * sc;
  } else {
    for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(w[n * K + k]) * sc;
  }
}

// The dense fp32 weight (N, K) of a quantized Linear: prompts of many rows run dequantize + GEMM,
// and torch ops take ~1.5 ns per weight to unpack and scale; this is one pass at memory speed.
at::Tensor dequantize(const Linear& l) {
  TORCH_CHECK(l.kind != 0, "dequantize takes a quantized Linear");
  auto out = at::empty({l.N, l.K}, at::kFloat);
  float* o = out.data_ptr<float>();
  pybind11::gil_scoped_release release;
  at::parallel_for(0, l.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequantize_row(l, n, o + n * l.K);
  });
  return out;
}

// Rows `rows` (R,) int64 of the weight, (R, K) fp32: a quantized tied embedding's lookups (a decode
// step's token costs ~1 us here, ~0.4 ms through the torch unpacking ops).
at::Tensor dequantize_rows(const Linear& l, const at::Tensor& rows) {
  TORCH_CHECK(l.kind != 0, "dequantize_rows takes a quantized Linear");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rows must be a 1-d int64 tensor");
  const auto r = rows.contiguous();
  const int64_t R = r.numel();
  const int64_t* ids = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(ids[i] >= 0 && ids[i] < l.N, "row ", ids[i], " out of range [0, ", l.N, ")");
  auto out = at::empty({R, l.K}, at::kFloat);
  for (int64_t i = 0; i < R; ++i) dequantize_row(l, ids[i], out.data_ptr<float>() + i * l.K);
  return out;
}

void rmsnorm(const float* x, const float* w, float eps, float* out, int64_t T, int64_t n) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * n;
    const float inv = 1.f / std::sqrt(dot(xr, xr, n) / n + eps);
    for (int64_t i = 0; i < n; ++i) out[t * n + i] = xr[i] * inv * w[i];
  }
}

// Rotate-half RoPE on the first 2 * half dims of one head vector: pairs (j, j + half) turn by the
// angle whose (scaled) cos/sin are cs[j], sn[j] (HF's cos/sin tables repeat each angle twice).
void rope(float* v, const float* cs, const float* sn, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = v[j], x2 = v[j + half];
    v[j] = x1 * cs[j] - x2 * sn[j];
    v[j + half] = x2 * cs[j] + x1 * sn[j];
  }
}

struct Layer {
  Linear qkv, o, gate_up, down;
  at::Tensor in_norm, post_norm;
};

// A Llama-family decoder run for few new tokens per row: x (B*L, hidden) embeddings in, final-norm
// hidden states out. Row b's token i sits at position offsets[b] + i; its keys/values are written to
// cache row b at that position and it attends to cache positions [0, offsets[b] + i].
class LlamaDecoder {
 public:
  LlamaDecoder(std::vector<Linear> linears, std::vector<at::Tensor> norms, at::Tensor final_norm, int64_t H, int64_t Hkv,
               int64_t D, int64_t rope_dim, double eps, double scale, double residual_multiplier)
      : final_norm_(final_norm), H_(H), Hkv_(Hkv), D_(D), rd_(rope_dim), eps_(eps), scale_(scale), rmul_(residual_multiplier) {
    TORCH_CHECK(linears.size() % 4 == 0 && norms.size() == linears.size() / 2, "4 linears and 2 norms per layer");
    for (size_t i = 0; i < linears.size() / 4; ++i) {
      layers_.push_back({linears[4 * i], linears[4 * i + 1], linears[4 * i + 2], linears[4 * i + 3], norms[2 * i].contiguous(),
                         norms[2 * i + 1].contiguous()});
    }
    hidden_ = final_norm.numel();
  }

  // x (B*L, hidden) embeddings; inv_freq (rope_dim / 2,) the RoPE frequencies for this call and
  // rope_scale their cos/sin factor (YaRN/LongRoPE); offsets (B,) each row's cached length.
  // kernels: with sparse attention, each layer's mean-pooled key kernels (B, Hkv, capacity, D)
  // holding those of the keys before offsets[b]; the ones completed by this call's keys are added.
  // tree (L,) int64, for one row: each new token's parent among the new tokens (-1: the cached
  // ones; parents first). Token i is written to slot offsets[0] + i but sits at position
  // offsets[0] + depth(i), and sees the cached keys, its ancestors and itself (a draft tree's verify).
  at::Tensor forward(at::Tensor x, at::Tensor inv_freq, double rope_scale, at::Tensor offsets, int64_t L,
                     std::vector<at::Tensor> keys, std::vector<at::Tensor> values, std::vector<at::Tensor> kernels,
                     std::optional<at::Tensor> tree) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == hidden_, "x must be (B*L, hidden) fp32");
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "one key and value buffer per layer");
    TORCH_CHECK(sparse_.block == 0 || kernels.size() == layers_.size(), "sparse attention needs one kernel buffer per layer");
    const int64_t T = x.size(0), B = T / L, half = rd_ / 2;
    TORCH_CHECK(B * L == T && offsets.numel() == B, "offsets must hold one entry per row");
    auto h = x.contiguous().clone();
    auto off = offsets.to(at::kLong).contiguous();
    auto inv = inv_freq.to(at::kFloat).contiguous();
    TORCH_CHECK(inv.numel() == half, "inv_freq must hold rope_dim / 2 frequencies");
    std::vector<int64_t> depth(T);  // position - offset of each token: t % L, or its depth in the tree
    for (int64_t t = 0; t < T; ++t) depth[t] = t % L;
    std::vector<uint8_t> visible;  // a tree verify's (L, L) ancestor mask; empty otherwise
    if (tree.has_value()) {
      auto parents = tree->to(at::kLong).contiguous();
      TORCH_CHECK(B == 1 && parents.numel() == L && sparse_.block == 0, "a tree verify takes one row of L tokens, dense attention");
      visible.assign(L * L, 0);  // (L, L): [i, j] when j is i or an ancestor of i
      for (int64_t i = 0; i < L; ++i) {
        const int64_t p = parents.data_ptr<int64_t>()[i];
        TORCH_CHECK(p >= -1 && p < i, "tree parents must come before their children");
        depth[i] = p < 0 ? 0 : depth[p] + 1;
        if (p >= 0) std::memcpy(&visible[i * L], &visible[p * L], L);
        visible[i * L + i] = 1;
      }
    }
    std::vector<float> cs(T * half), sn(T * half);  // the angle of pair j at each token's position
    for (int64_t t = 0; t < T; ++t) {
      const float pos = static_cast<float>(off.data_ptr<int64_t>()[t / L] + depth[t]);
      for (int64_t j = 0; j < half; ++j) {
        const float a = pos * inv.data_ptr<float>()[j];  // fp32, as RoPE.forward computes it
        cs[t * half + j] = std::cos(a) * static_cast<float>(rope_scale);
        sn[t * half + j] = std::sin(a) * static_cast<float>(rope_scale);
      }
    }
    {
      pybind11::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);  // scratch buffers are per decoder: one call at a time
      for (size_t i = 0; i < layers_.size(); ++i) {
        layer(layers_[i], h.data_ptr<float>(), T, L, off.data_ptr<int64_t>(), cs.data(), sn.data(), keys[i], values[i],
              sparse_.block ? &kernels[i] : nullptr, visible.empty() ? nullptr : visible.data());
      }
      rmsnorm(h.data_ptr<float>(), final_norm_.data_ptr<float>(), eps_, h.data_ptr<float>(), T, hidden_);
    }
    return h;
  }

  // Seconds spent in attention since the last call (benchmarks/sparse_attention.py).
  double take_attention_seconds() {
    const double t = attention_seconds_;
    attention_seconds_ = 0.0;
    return t;
  }

  void set_sparse(int64_t block, int64_t ksize, int64_t kstride, int64_t init, int64_t window, int64_t topk, int64_t dense_len) {
    TORCH_CHECK(block > 0 && kstride > 0 && block % kstride == 0 && ksize % kstride == 0 && ksize >= kstride && topk > 0,
                "sparse attention: block_size and kernel_size must be multiples of kernel_stride, topk > 0");
    TORCH_CHECK(H_ / Hkv_ <= kMaxGroup, "sparse attention: more than ", kMaxGroup, " query heads per KV head");
    sparse_ = {block, ksize, kstride, init, window, topk, dense_len};
  }

 private:
  // Mean-pooled key kernels completed by this call's keys (kernel i covers keys [i*s, i*s + p)).
  void update_kernels(const float* K, int64_t ks0, int64_t ks1, int64_t ks2, at::Tensor& kern, int64_t B, int64_t L,
                      const int64_t* off) {
    float* kp = kern.data_ptr<float>();
    const int64_t p = sparse_.ksize, s = sparse_.kstride;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n0 = num_kernels(off[b], p, s), n1 = num_kernels(off[b] + L, p, s);
      TORCH_CHECK(n1 <= kern.size(2), "kernel buffer too small for ", n1, " kernels");
      for (int64_t g = 0; g < Hkv_; ++g) {
        for (int64_t i = n0; i < n1; ++i) {
          float* o = kp + b * kern.stride(0) + g * kern.stride(1) + i * kern.stride(2);
          std::fill(o, o + D_, 0.f);
          for (int64_t j = 0; j < p; ++j) axpy(1.f, K + b * ks0 + g * ks1 + (i * s + j) * ks2, o, D_);
          for (int64_t d = 0; d < D_; ++d) o[d] /= static_cast<float>(p);
        }
      }
    }
  }

  void layer(const Layer& ly, float* h, int64_t T, int64_t L, const int64_t* off, const float* cs, const float* sn,
             at::Tensor& keys, at::Tensor& values, at::Tensor* kern, const uint8_t* visible) {
    const int64_t n = hidden_, qd = H_ * D_, kvd = Hkv_ * D_, inter = ly.down.K;
    xn_.resize(T * std::max(n, inter));
    qkv_.resize(T * ly.qkv.N);
    att_.resize(T * qd);
    gu_.resize(T * ly.gate_up.N);
    out_.resize(T * n);
    rmsnorm(h, ly.in_norm.data_ptr<float>(), eps_, xn_.data(), T, n);
    ly.qkv.run(xn_.data(), T, acts_, qkv_.data());
    // RoPE on q and k, then append k/v to the cache.
    float* K = keys.data_ptr<float>();
    float* V = values.data_ptr<float>();
    const int64_t ks0 = keys.stride(0), ks1 = keys.stride(1), ks2 = keys.stride(2);
    const int64_t vs0 = values.stride(0), vs1 = values.stride(1), vs2 = values.stride(2);
    for (int64_t t = 0; t < T; ++t) {
      float* row = qkv_.data() + t * ly.qkv.N;
      const int64_t b = t / L, pos = off[b] + t % L;
      TORCH_CHECK(pos < keys.size(2), "KV cache too small for position ", pos);
      if (rd_ > 0) {
        for (int64_t hh = 0; hh < H_ + Hkv_; ++hh) rope(row + hh * D_, cs + t * (rd_ / 2), sn + t * (rd_ / 2), rd_ / 2);
      }
      for (int64_t g = 0; g < Hkv_; ++g) {
        std::memcpy(K + b * ks0 + g * ks1 + pos * ks2, row + qd + g * D_, D_ * 4);
        std::memcpy(V + b * vs0 + g * vs1 + pos * vs2, row + qd + kvd + g * D_, D_ * 4);
      }
    }
    // Attention over the row's keys [0, pos]. Short contexts (this layer's K and V of one KV
    // head fit in L2): one task per (token, query head). Long ones: one task per (token, KV head,
    // part of the keys), the G heads of the group together, parts merged by their softmax maxima.
    const int64_t G = H_ / Hkv_;
    const float sc_scale = static_cast<float>(scale_);
    const int64_t B = T / L, longest = *std::max_element(off, off + B) + L;
    const auto attention_start = std::chrono::steady_clock::now();
    if (kern != nullptr) {  // InfLLM v2: one task per (token, KV head), dense below dense_len
      update_kernels(K, ks0, ks1, ks2, *kern, B, L, off);
      const float* kp = kern->data_ptr<float>();
      const int64_t kst0 = kern->stride(0), kst1 = kern->stride(1), kst2 = kern->stride(2);
      with_head_dim(D_, [&](auto dv) {
        at::parallel_for(0, T * Hkv_, 1, [&](int64_t i0, int64_t i1) {
          std::vector<float> sc, tmp, score;
          std::vector<int64_t> blocks;
          std::vector<std::pair<int64_t, int64_t>> runs;
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t t = i / Hkv_, g = i % Hkv_, b = t / L, pos = off[b] + t % L;
            sparse_group<decltype(dv)::value>(qkv_.data() + t * ly.qkv.N + g * G * D_, G, K + b * ks0 + g * ks1,
                                              V + b * vs0 + g * vs1, ks2, vs2, kp + b * kst0 + g * kst1, kst2, pos, D_,
                                              sc_scale, sparse_, sc, tmp, score, blocks, runs, att_.data() + t * qd + g * G * D_);
          }
        });
      });
    } else if (visible != nullptr || longest * D_ * 8 <= g_group_attention_bytes) {  // trees: always here
      at::parallel_for(0, T * H_, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> sc;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t t = i / H_, hh = i % H_, g = hh / G, b = t / L, S = off[b] + t % L + 1;
          const float* q = qkv_.data() + t * ly.qkv.N + hh * D_;
          const float* Kb = K + b * ks0 + g * ks1;
          const float* Vb = V + b * vs0 + g * vs1;
          float* o = att_.data() + t * qd + hh * D_;
          const uint8_t* seen = visible == nullptr ? nullptr : visible + (t % L) * L;
          sc.resize(S);
          with_head_dim(D_, [&](auto dv) {
            attend_head<decltype(dv)::value>(q, Kb, Vb, ks2, vs2, S, D_, sc_scale, sc.data(), o, seen, off[b]);
          });
        }
      });
    } else {
      const int64_t P = g_attention_parts > 0 ? g_attention_parts
                        : std::max<int64_t>(1, std::min<int64_t>(4, (2 * at::get_num_threads() + T * Hkv_ - 1) / (T * Hkv_)));
      const int64_t stride = G * D_ + 2 * G;  // per part: outputs (G, D), maxima (G), sums (G)
      part_.resize(T * Hkv_ * P * stride);
      at::parallel_for(0, T * Hkv_ * P, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> sc;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t p = i % P, tg = i / P, t = tg / Hkv_, g = tg % Hkv_, b = t / L, S = off[b] + t % L + 1;
          const int64_t chunk = (S + P - 1) / P, s0 = std::min(S, p * chunk), s1 = std::min(S, s0 + chunk);
          float* slot = part_.data() + i * stride;
          if (s0 == s1) {  // an empty part: contributes nothing to the merge
            std::fill(slot, slot + G * D_, 0.f);
            std::fill(slot + G * D_, slot + G * D_ + G, -INFINITY);
            std::fill(slot + G * D_ + G, slot + stride, 0.f);
            continue;
          }
          const float* q = qkv_.data() + t * ly.qkv.N + g * G * D_;
          attend_group_part(q, G, K + b * ks0 + g * ks1, V + b * vs0 + g * vs1, ks2, vs2, s0, s1, D_, sc_scale, sc, slot,
                            slot + G * D_, slot + G * D_ + G);
        }
      });
      for (int64_t tg = 0; tg < T * Hkv_; ++tg) {  // merge the parts of each (token, KV head)
        const int64_t t = tg / Hkv_, g = tg % Hkv_;
        for (int64_t h = 0; h < G; ++h) {
          float m = -INFINITY;
          for (int64_t p = 0; p < P; ++p) m = std::max(m, part_[(tg * P + p) * stride + G * D_ + h]);
          float* o = att_.data() + t * qd + (g * G + h) * D_;
          std::fill(o, o + D_, 0.f);
          float total = 0.f;
          for (int64_t p = 0; p < P; ++p) {
            const float* slot = part_.data() + (tg * P + p) * stride;
            const float w = slot[G * D_ + h] == -INFINITY ? 0.f : std::exp(slot[G * D_ + h] - m);
            total += w * slot[G * D_ + G + h];
            axpy(w, slot + h * D_, o, D_);
          }
          const float inv = 1.f / total;
          for (int64_t j = 0; j < D_; ++j) o[j] *= inv;
        }
      }
    }
    attention_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - attention_start).count();
    ly.o.run(att_.data(), T, acts_, out_.data());
    const float r = static_cast<float>(rmul_);
    for (int64_t i = 0; i < T * n; ++i) h[i] += r * out_[i];
    rmsnorm(h, ly.post_norm.data_ptr<float>(), eps_, xn_.data(), T, n);
    ly.gate_up.run(xn_.data(), T, acts_, gu_.data());
    for (int64_t t = 0; t < T; ++t) {  // silu(gate) * up, written over xn_ (T, inter)
      const float* gr = gu_.data() + t * 2 * inter;
      float* a = xn_.data() + t * inter;
      for (int64_t j = 0; j < inter; ++j) a[j] = gr[j] / (1.f + std::exp(-gr[j])) * gr[inter + j];
    }
    ly.down.run(xn_.data(), T, acts_, out_.data());
    for (int64_t i = 0; i < T * n; ++i) h[i] += r * out_[i];
  }

  std::vector<Layer> layers_;
  SparseCfg sparse_;
  double attention_seconds_ = 0.0;  // wall time in attention (kernel pooling, selection, softmax(qK)V)
  at::Tensor final_norm_;
  int64_t H_, Hkv_, D_, rd_, hidden_;
  double eps_, scale_, rmul_;
  QActs acts_;
  std::vector<float> xn_, qkv_, att_, gu_, out_, part_;
  std::mutex mutex_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Linear>(m, "Linear").def_readonly("N", &Linear::N).def_readonly("K", &Linear::K).def_readonly("kind", &Linear::kind);
  m.def("make_linear", &make_linear, "kind 0 dense / 1 int4 blocks / 2 int8 / 3 ternary tiles; (w, s, bias)");
  m.def("linear", &linear_forward, "x (..., K) fp32 -> (..., N) fp32");
  m.def("dequantize", &dequantize, "quantized Linear -> its fp32 weight (N, K)");
  m.def("dequantize_rows", &dequantize_rows, "quantized Linear, rows (R,) int64 -> W[rows] (R, K) fp32");
  m.def("sparse_attention", &sparse_attention,
        "InfLLM v2 attention: (q, k, v, kernels, pos0, [block, ksize, kstride, init, window, topk, dense_len], scale)");
  m.def("mamba_step", &mamba_step, "one Mamba-2 decode token between in_proj and out_proj",
        pybind11::arg("zxbcdt"), pybind11::arg("conv_w"), pybind11::arg("conv_b"), pybind11::arg("conv_state"),
        pybind11::arg("dt_bias"), pybind11::arg("A"), pybind11::arg("D"), pybind11::arg("norm_w"), pybind11::arg("h"),
        pybind11::arg("G"), pybind11::arg("eps"));
  m.def("set_group_attention_bytes", [](int64_t v) { g_group_attention_bytes = v; }, "long-context attention threshold");
  m.def("set_attention_parts", [](int64_t v) { g_attention_parts = v; }, "0 = auto");
  pybind11::class_<LlamaDecoder>(m, "LlamaDecoder")
      .def(pybind11::init<std::vector<Linear>, std::vector<at::Tensor>, at::Tensor, int64_t, int64_t, int64_t, int64_t, double,
                          double, double>())
      .def("forward", &LlamaDecoder::forward, pybind11::arg("x"), pybind11::arg("inv_freq"), pybind11::arg("rope_scale"),
           pybind11::arg("offsets"), pybind11::arg("L"), pybind11::arg("keys"), pybind11::arg("values"),
           pybind11::arg("kernels") = std::vector<at::Tensor>(), pybind11::arg("tree") = std::nullopt)
      .def("take_attention_seconds", &LlamaDecoder::take_attention_seconds, "attention wall time since the last call")
      .def("set_sparse", &LlamaDecoder::set_sparse, "InfLLM v2 settings (block, kernel, stride, init, window, topk, dense_len)");
  m.attr("few_rows") = kFewRows;  // dense fp32 rows up to which Linear runs f32_rows, not MKL
#ifdef EDGELM_AVX2
  m.attr("isa") = "avx2";
#else
  m.attr("isa") = "scalar";
#endif
}
