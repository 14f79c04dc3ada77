// jserve's native CPU kernels, called from XLA:CPU through the XLA FFI (see kernels_cpu/__init__.py).
//
// jserve_matmul_nt: y[M, N] = x[M, K] @ w[N, K]^T in float32, the product every linear layer does with its
// weight in torch's [out, in] layout. It is written for the small row counts of decode steps (M up to a few
// dozen), where XLA:CPU's dot streams weights at about half the memory's rate:
//   * register tiles of MR rows of x by NR rows of w, vectorized along K (16 floats per AVX-512 register),
//     each accumulator reduced once at the end, so w is read in its stored layout; the 4 x 4 tile of the
//     4-row blocks reduces its 16 accumulators together (SumEach16);
//   * with 4 rows or more, every 4-row block of x reuses a 4-row slice of w while it is in L1;
//   * the next slice of w is prefetched while the current one is multiplied (this alone takes an 8-row
//     product from 14 to 23 GB/s of weights streamed on two cores);
//   * chunks of 48 rows of w are shared out between threads (ParallelFor).
//
// jserve_paged_decode_attention: one query token per sequence over its paged K/V, grouped-query heads, an
// online softmax over runs of up to 16 keys, reading each page in place (XLA's form gathers every chunk
// of pages into a new buffer first); one work item per (sequence, KV head), shared out by ParallelFor.
//
// ParallelFor shares work through XLA's intra-op thread pool by an atomic counter. The calling thread works
// too and waits only for items another thread has already claimed, so a pool whose threads are all busy
// (XLA runs independent thunks side by side) cannot deadlock the call.
//
// The source needs AVX-512F; kernels_cpu/build.py compiles it with -march=native and falls back to XLA
// where the compiler or the CPU lacks it.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if !defined(__AVX512F__)
#error "jserve's native CPU kernels need AVX-512F"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunkRows = 48;  // rows of w per unit of work shared between threads (a multiple of every NR)

// The 16 sums of a[0..15]'s lanes, as one vector: lane i holds the sum of a[i] (45 shuffles and adds
// instead of 16 separate reductions of about 10 each).
inline __m512 SumEach16(const __m512* a) {
  __m512 t[8], u[4], v[2];
  for (int i = 0; i < 8; ++i)  // lanes of each 128-bit block: partial sums of a[2i], a[2i+1] interleaved
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // 128-bit block j of u[i]: partial sums of a[4i..4i+3] over block j
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
    u[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i)  // blocks: a[8i..8i+3] over blocks 0-1, over 2-3, a[8i+4..8i+7] likewise
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
}

// v, loaded once into a register and kept there. Without this GCC folds the loads of one operand of the
// tile into its FMAs as memory operands, loading each vector once per FMA that uses it: a 4 x 4 tile then
// loads 20 vectors per 16 FMAs instead of 8. A Zen 4 core loads one 512-bit vector per cycle, so its tile
// waited on loads (76 GFLOP/s on one core with the operands in L1, 115 with this; the FMA peak is 116).
inline __m512 InRegister(__m512 v) {
  asm("" : "+v"(v));
  return v;
}

// y[i, j] (row stride ldy) = sum_k x[i, k] * w[j, k] for i < MR, j < NR; x rows and w rows are K long.
// Also prefetches rows [0, PF) of `pf` (rows K long) into L2, one cache line per row and 16 columns, so the
// next slice of w arrives while this one is multiplied.
template <int MR, int NR, int PF>
inline void Tile(const float* x, const float* w, int64_t K, float* y, int64_t ldy, const float* pf = nullptr) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) {
      wv[j] = InRegister(_mm512_loadu_ps(w + j * K + k));
    }
    for (int j = 0; j < PF; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * K + k), _MM_HINT_T1);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = InRegister(_mm512_loadu_ps(x + i * K + k));
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {  // the last K % 16 columns, masked
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if constexpr (MR == 4 && NR == 4) {  // the 4-row blocks' tile: its 16 sums at once, a row of 4 at a time
    const __m512 sums = SumEach16(&acc[0][0]);
    _mm_storeu_ps(y, _mm512_extractf32x4_ps(sums, 0));
    _mm_storeu_ps(y + ldy, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(y + 2 * ldy, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(y + 3 * ldy, _mm512_extractf32x4_ps(sums, 3));
  } else {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

// Rows [0, MR) of x against w rows [n0, n1): NR-row tiles, then single rows for what is left.
template <int MR, int NR, bool kPrefetch>
inline void RowBlock(const float* x, const float* w, int64_t K, float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) Tile<MR, NR, kPrefetch ? NR : 0>(x, w + n * K, K, y + n, N, w + (n + NR) * K);
  for (; n < n1; ++n) Tile<MR, 1, 0>(x, w + n * K, K, y + n, N);
}

// The 1-3 rows left after the 4-row blocks, each count with a tile of 8-12 accumulators.
template <bool kPrefetch>
inline void RemainderRows(int64_t rows, const float* x, const float* w, int64_t K, float* y, int64_t N, int64_t n0,
                          int64_t n1) {
  switch (rows) {
    case 1: return RowBlock<1, 8, kPrefetch>(x, w, K, y, N, n0, n1);
    case 2: return RowBlock<2, 6, kPrefetch>(x, w, K, y, N, n0, n1);
    case 3: return RowBlock<3, 4, kPrefetch>(x, w, K, y, N, n0, n1);
    default: return;
  }
}

// All M rows of x against w rows [n0, n1).
void MatmulChunk(const float* x, int64_t M, const float* w, int64_t K, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t full = M / 4 * 4;
  if (full > 0) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      // Every 4-row block of x multiplies these 4 rows of w (in L1 after the first block), and the first
      // blocks share the prefetch of the next 4 rows between them: spread over the whole slice's time,
      // the prefetches do not all wait on memory at once.
      const float* wn = w + n * K;
      const float* next = wn + 4 * K;
      float* yn = y + n;
      if (full == 4) {
        Tile<4, 4, 4>(x, wn, K, yn, N, next);
      } else if (full < 16) {
        Tile<4, 4, 2>(x, wn, K, yn, N, next);
        Tile<4, 4, 2>(x + 4 * K, wn, K, yn + 4 * N, N, next + 2 * K);
        for (int64_t m = 8; m < full; m += 4) Tile<4, 4, 0>(x + m * K, wn, K, yn + m * N, N);
      } else {
        for (int64_t m = 0; m < 16; m += 4) Tile<4, 4, 1>(x + m * K, wn, K, yn + m * N, N, next + m / 4 * K);
        for (int64_t m = 16; m < full; m += 4) Tile<4, 4, 0>(x + m * K, wn, K, yn + m * N, N);
      }
    }
    for (; n < n1; ++n)
      for (int64_t m = 0; m < full; m += 4) Tile<4, 1, 0>(x + m * K, w + n * K, K, y + m * N + n, N);
  }
  // With 4-row blocks above, this chunk of w is already in cache.
  if (full == 0) {
    RemainderRows<true>(M, x, w, K, y, N, n0, n1);
  } else {
    RemainderRows<false>(M - full, x + full * K, w, K, y + full * N, N, n0, n1);
  }
}

// Runs fn(i) for i in [0, n) on the calling thread and, when the whole takes longer than waking a thread
// costs (`seconds` is its single-thread estimate), on XLA's intra-op pool threads too. Items are claimed
// through an atomic counter; the caller waits only for items already claimed by a thread that is running
// them, so the call cannot deadlock when every pool thread is busy elsewhere. A pool task that starts after
// all items are claimed touches nothing but the shared counter (kept alive by the shared_ptr) and returns.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, double seconds, F fn) {
  struct State {
    explicit State(int64_t n, F fn) : n(n), fn(std::move(fn)) {}
    const int64_t n;
    F fn;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Work() {
      for (;;) {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= n) return;
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(n, std::move(fn));
  const int64_t helpers =
      seconds < 20e-6 ? 0 : std::min<int64_t>(std::max<int64_t>(pool.num_threads() - 1, 0), n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Work(); });
  state->Work();
  // Spin briefly, then yield the core: the thread finishing the last item may have been descheduled (two
  // cores shared with the host's Python thread), and spinning would keep it off this core.
  for (int spins = 0; state->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

ffi::Error MatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("jserve_matmul_nt: w must be [N, K]");
  const int64_t N = wd[0], K = wd[1];
  const auto xd = x.dimensions();
  if (xd.size() == 0 || xd.back() != K) return ffi::Error::InvalidArgument("jserve_matmul_nt: x must be [..., K]");
  int64_t M = 1;
  for (size_t d = 0; d + 1 < xd.size(); ++d) M *= xd[d];
  float* out = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(out, out + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  // Single-thread estimate: w streamed at ~12 GB/s by one core, or ~90 GFLOP/s of FMAs, whichever is slower.
  const double seconds = std::max(4.0 * N * K / 12e9, 2.0 * M * N * K / 90e9);
  ParallelFor(pool, (N + kChunkRows - 1) / kChunkRows, seconds, [=](int64_t c) {
    const int64_t n0 = c * kChunkRows;
    MatmulChunk(xp, M, wp, K, out, N, n0, std::min(N, n0 + kChunkRows));
  });
  return ffi::Error::Success();
}

// exp(x) for 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r), times 2^n.
// Relative error about 2e-7 over the softmax's range (x <= 0); x below -87 gives 0.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One sequence's attention for one KV head: its G query heads (grouped-query attention) over the first
// `length` tokens of its pages, with an online softmax taken 16 keys at a time.
//   q: [G, D] (scaled), k/v: this head's pages [P, S, D], table: [W] page ids, out: [G, D].
// D is a multiple of 16 and G * D <= kMaxGroupFloats (checked by the caller).
constexpr int64_t kMaxGroupFloats = 2048;

void DecodeAttentionItem(const float* q, const float* k, const float* v, const int32_t* table, int64_t length,
                         int64_t G, int64_t D, int64_t P, int64_t S, float* out) {
  alignas(64) float acc[kMaxGroupFloats];
  alignas(64) float probs[16 * (kMaxGroupFloats / 16)];  // [G, 16]
  float m[kMaxGroupFloats / 16], l[kMaxGroupFloats / 16];
  const int64_t vecs = D / 16;
  for (int64_t g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t start = 0, n = 0; start < length; start += n) {
    // Up to 16 keys [start, start + n) from one page: a run stops at the page's end.
    const int64_t page_slot = start / S, in_page = start % S;
    n = std::min<int64_t>(std::min<int64_t>(16, length - start), S - in_page);
    const int64_t page = std::min<int64_t>(std::max<int32_t>(table[page_slot], 0), P - 1);
    const float* kp = k + (page * S + in_page) * D;
    const float* vp = v + (page * S + in_page) * D;
    // Scores of every query head against these keys; each key row is loaded once for all G heads.
    alignas(64) float scores[kMaxGroupFloats / 16][16];
    for (int64_t t = 0; t < n; ++t) {
      const float* kt = kp + t * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * D;
        __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(kt));
        for (int64_t c = 1; c < vecs; ++c)
          dot = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), _mm512_loadu_ps(kt + 16 * c), dot);
        scores[g][t] = _mm512_reduce_add_ps(dot);
      }
    }
    const __mmask16 live = static_cast<__mmask16>((1u << n) - 1u);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, scores[g]);
      const float m_new = std::max(m[g], _mm512_reduce_max_ps(sv));
      const float correction = std::exp(m[g] - m_new);  // 0 on the first block (m = -inf)
      const __m512 pv = _mm512_maskz_mov_ps(live, Exp(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
      _mm512_store_ps(probs + 16 * g, pv);
      l[g] = l[g] * correction + _mm512_reduce_add_ps(pv);
      m[g] = m_new;
      const __m512 cv = _mm512_set1_ps(correction);
      for (int64_t c = 0; c < vecs; ++c)
        _mm512_store_ps(acc + g * D + 16 * c, _mm512_mul_ps(_mm512_load_ps(acc + g * D + 16 * c), cv));
    }
    // acc += p V, each value row loaded once for all G heads.
    for (int64_t t = 0; t < n; ++t) {
      const float* vt = vp + t * D;
      for (int64_t c = 0; c < vecs; ++c) {
        const __m512 vv = _mm512_loadu_ps(vt + 16 * c);
        for (int64_t g = 0; g < G; ++g) {
          float* a = acc + g * D + 16 * c;
          _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(probs[16 * g + t]), vv, _mm512_load_ps(a)));
        }
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(length > 0 ? 1.0f / l[g] : 0.0f);
    for (int64_t c = 0; c < vecs; ++c)
      _mm512_storeu_ps(out + g * D + 16 * c, _mm512_mul_ps(_mm512_load_ps(acc + g * D + 16 * c), inv));
  }
}

// out[b, h] = softmax(scale * q[b, h] . K[b, h / G]^T) V[b, h / G] over the first lengths[b] tokens of row b's
// pages (block_tables[b]); rows with length 0 give zeros. Page ids are clamped into the pool and lengths to
// the table's width, so a malformed table reads the wrong page instead of outside the pool.
ffi::Error PagedDecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                                ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> block_tables,
                                ffi::Buffer<ffi::S32> lengths, float scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k_pages.dimensions();
  const auto td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("jserve_paged_decode_attention: bad ranks");
  const int64_t B = qd[0], Hq = qd[1], D = qd[2];
  const int64_t Hkv = kd[0], P = kd[1], S = kd[2], W = td[1];
  if (Hkv == 0 || P == 0 || S == 0 || Hq % Hkv != 0 || D % 16 != 0 || (Hq / Hkv) * D > kMaxGroupFloats ||
      kd[3] != D || td[0] != B)
    return ffi::Error::InvalidArgument("jserve_paged_decode_attention: unsupported shapes");
  const int64_t G = Hq / Hkv;
  float* o = out->typed_data();
  if (B == 0 || Hq == 0 || D == 0) return ffi::Error::Success();
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  const int32_t* tp = block_tables.typed_data();
  const int32_t* lp = lengths.typed_data();
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += std::min<int64_t>(std::max<int32_t>(lp[b], 0), W * S);
  // Single-thread estimate: K and V of every attended token read at ~12 GB/s.
  const double seconds = 8.0 * total * Hkv * D / 12e9;
  ParallelFor(pool, B * Hkv, seconds, [=](int64_t item) {
    const int64_t b = item / Hkv, h = item % Hkv;
    const int64_t length = std::min<int64_t>(std::max<int32_t>(lp[b], 0), W * S);
    alignas(64) float qs[kMaxGroupFloats];
    const float* qrow = qp + (b * Hq + h * G) * D;
    for (int64_t i = 0; i < G * D; ++i) qs[i] = qrow[i] * scale;
    DecodeAttentionItem(qs, kp + h * P * S * D, vp + h * P * S * D, tp + b * W, length, G, D, P, S,
                        o + (b * Hq + h * G) * D);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jserve_matmul_nt, MatmulNT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jserve_paged_decode_attention, PagedDecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
