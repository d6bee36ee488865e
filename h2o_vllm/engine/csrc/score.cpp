// H2O's per-layer scoring as one operator: torch.ops.h2o_vllm.score_layer.
//
// For every scored query row of every request in the step, the softmax of
// scale * q.K over the keys the row can see (read from vLLM's CPU key pages where
// they lie), and its mass per KV block, accumulated over heads (and layers, by the
// caller keeping the outputs across calls):
//   sum requests: sum_out[block] += mass, over heads and rows      (float64)
//   max requests: max_out[row, block] = max(itself, max over heads) (float32)
// The same arithmetic as h2o_vllm/engine/scoring.py's PyTorch path (float32
// logits and probabilities, whatever the cache's dtype), without its temporaries:
// work items are (request, tile of rows), run on torch's own thread pool.
//
// torch.ops.h2o_vllm.attend_layer does the same and, from the same probabilities, each scored
// row's attention output softmax(scale * q.K) V (value pages [block_size][head_dim], as vLLM's
// vec kernels write them): one pass over the key pages for the scores and the attention.
//
// Built by h2o_vllm/engine/fused.py with the machine's g++ (no ninja, no pybind), for any target
// GCC vectorises: x86-64 (SSE4.2, AVX2, AVX-512, the AVX512-BF16 dot products where the target has
// them) and aarch64 (NEON). The register width is the target's (kLanes below); nothing else
// depends on it. -DH2O_OPS_NAMESPACE=name registers the operator as torch.ops.<name>.score_layer
// (the tests load builds for several targets side by side).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 8;  // prompt rows per work item (x heads per KV head query vectors)

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// fp8 caches (vLLM stores e4m3 or e5m2 bytes; the layer's key scale is folded into `scale` by the caller):
// one table lookup per byte.
template <typename T>
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i) value[i] = static_cast<float>(T(static_cast<uint8_t>(i), T::from_bits()));
  }
};
const Fp8Table<c10::Float8_e4m3fn> kE4M3;
const Fp8Table<c10::Float8_e5m2> kE5M2;
inline float to_float(c10::Float8_e4m3fn x) { return kE4M3.value[x.x]; }
inline float to_float(c10::Float8_e5m2 x) { return kE5M2.value[x.x]; }

// exp(x) for x <= 0, branch-free so the compiler vectorises the loops that call it
// (Cephes' polynomial after a range reduction by ln 2; about 1 ulp).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

struct Layout {
  int64_t heads, kv_heads, head_dim, block_size;
  int64_t q_stride_token, q_stride_head;  // query[t, h, d] at t * q_stride_token + h * q_stride_head + d
  int64_t page_stride_block, page_stride_head;
  int64_t layout;  // a key page's layout: h2o_vllm/engine/pages.py's KeyLayout
};

// KeyLayout: [head_dim, block_size]; [block_size, head_dim]; [block_size / 16, head_dim / 2, 16, 2].
constexpr int64_t kDT = 0, kTD = 1, kAMX = 2;

// One KV head's page of block `block`, as float32 [head_dim][block_size].
template <typename T>
void load_page(const T* pages, const Layout& L, int64_t block, int64_t kv_head, float* out) {
  const T* page = pages + block * L.page_stride_block + kv_head * L.page_stride_head;
  const int64_t bs = L.block_size, hd = L.head_dim;
  if (L.layout == kDT) {
    for (int64_t i = 0; i < hd * bs; ++i) out[i] = to_float(page[i]);
  } else if (L.layout == kTD) {
    for (int64_t t = 0; t < bs; ++t)
      for (int64_t d = 0; d < hd; ++d) out[d * bs + t] = to_float(page[t * hd + d]);
  } else {  // kAMX: groups of 16 tokens, each dimension pair of a token side by side
    for (int64_t g = 0; g < bs / 16; ++g)
      for (int64_t d = 0; d < hd; d += 2)
        for (int64_t t = g * 16; t < g * 16 + 16; ++t, page += 2) {
          out[d * bs + t] = to_float(page[0]);
          out[(d + 1) * bs + t] = to_float(page[1]);
        }
  }
}

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // 16 floats (split by GCC where lanes are fewer)

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// The target's vector register, in floats, and how to keep a value in one (an empty asm whose
// operand must sit in a vector register: folding it into each FMA instead reloads it N times).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#define H2O_IN_REGISTER(x) asm("" : "+v"(x))
#elif defined(__AVX__)
constexpr int kLanes = 8;
#define H2O_IN_REGISTER(x) asm("" : "+x"(x))
#elif defined(__SSE2__)
constexpr int kLanes = 4;
#define H2O_IN_REGISTER(x) asm("" : "+x"(x))
#elif defined(__aarch64__)
constexpr int kLanes = 4;
#define H2O_IN_REGISTER(x) asm("" : "+w"(x))
#else
constexpr int kLanes = 4;
#define H2O_IN_REGISTER(x) (void)(x)
#endif
typedef float vreg __attribute__((vector_size(4 * kLanes), aligned(4)));

inline vreg loadv(const float* p) {
  vreg v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void storev(float* p, vreg v) { std::memcpy(p, &v, sizeof(v)); }

// logits[v, t] = q[v] . k[t] for N query vectors and one 32-token page, 2 registers of tokens at a
// time (the whole page with AVX-512, half of it with AVX2, a quarter with SSE or NEON): 2N accumulators
// (N = 6: 12 multiply-adds per 2 page loads and 6 broadcasts, so arithmetic, not loads, sets the pace;
// 12 + 2 + 1 registers fit the 16 of SSE and AVX2). Each logit adds over d in order on every target.
template <int N>
inline void page_logits_32(const float* q, const float* kt, int64_t head_dim, float* logits, int64_t stride) {
  constexpr int kTokens = 2 * kLanes;
  static_assert(32 % kTokens == 0, "a 32-token page is a whole number of register pairs");
  for (int base = 0; base < 32; base += kTokens) {
    vreg acc[N][2] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      vreg k0 = loadv(kt + d * 32 + base), k1 = loadv(kt + d * 32 + base + kLanes);
      H2O_IN_REGISTER(k0);
      H2O_IN_REGISTER(k1);
      for (int u = 0; u < N; ++u) {
        const float a = q[u * head_dim + d];
        acc[u][0] += a * k0;
        acc[u][1] += a * k1;
      }
    }
    for (int u = 0; u < N; ++u) {
      storev(logits + u * stride + base, acc[u][0]);
      storev(logits + u * stride + base + kLanes, acc[u][1]);
    }
  }
}

// logits[v, t] = q[v] . k[t] for nv query vectors and one page (k as [head_dim][block_size]).
inline void page_logits(const float* q, int64_t nv, const float* kt, int64_t head_dim, int64_t block_size,
                        float* logits, int64_t stride) {
  if (block_size == 32) {
    int64_t v = 0;
    for (; v + 6 <= nv; v += 6) page_logits_32<6>(q + v * head_dim, kt, head_dim, logits + v * stride, stride);
    for (; v + 3 <= nv; v += 3) page_logits_32<3>(q + v * head_dim, kt, head_dim, logits + v * stride, stride);
    for (; v < nv; ++v) page_logits_32<1>(q + v * head_dim, kt, head_dim, logits + v * stride, stride);
    return;
  }
  for (int64_t v = 0; v < nv; ++v) {
    float* o = logits + v * stride;
    const float* qv = q + v * head_dim;
    for (int64_t t = 0; t < block_size; ++t) o[t] = 0.0f;
    for (int64_t d = 0; d < head_dim; ++d) {
      const float* k = kt + d * block_size;
      const float a = qv[d];
      for (int64_t t = 0; t < block_size; ++t) o[t] += a * k[t];
    }
  }
}

inline float hsum(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// Softmax of scale * x[0, visible) in place, unnormalised, and zeros up to the end of the last visible
// block of `block_size`; returns 1 / sum. Reductions run 16 lanes wide by hand: the compiler
// does not vectorise float max and sum reductions without -ffast-math (which changes results).
inline float exp_row(float* x, int64_t visible, int64_t block_size, float scale) {
  const int64_t wide = visible / 16 * 16;
  v16 vm = {};
  vm += -INFINITY;
  for (int64_t t = 0; t < wide; t += 16) {
    const v16 v = load16(x + t);
    vm = vm > v ? vm : v;
  }
  float m = -INFINITY;
  for (int i = 0; i < 16; ++i) m = std::max(m, vm[i]);
  for (int64_t t = wide; t < visible; ++t) m = std::max(m, x[t]);
  for (int64_t t = 0; t < visible; ++t) x[t] = exp_nonpositive((x[t] - m) * scale);  // elementwise: vectorised
  v16 vs = {};
  for (int64_t t = 0; t < wide; t += 16) vs += load16(x + t);
  float s = hsum(vs);
  for (int64_t t = wide; t < visible; ++t) s += x[t];
  const int64_t padded = (visible + block_size - 1) / block_size * block_size;
  for (int64_t t = visible; t < padded; ++t) x[t] = 0.0f;
  return 1.0f / s;
}

// Sum of each block of `block_size` values of x, for `blocks` blocks.
inline void block_sums(const float* x, int64_t blocks, int64_t block_size, float* out) {
  if (block_size == 32) {
    for (int64_t b = 0; b < blocks; ++b) out[b] = hsum(load16(x + 32 * b) + load16(x + 32 * b + 16));
    return;
  }
  for (int64_t b = 0; b < blocks; ++b) {
    float s = 0.0f;
    for (int64_t t = 0; t < block_size; ++t) s += x[b * block_size + t];
    out[b] = s;
  }
}

// How a work item's logits are computed: queries and pages prepared once, then one page at a time.
// FloatLogits: float32 arithmetic whatever the dtypes (queries pre-scaled), as the PyTorch path.
template <typename Q, typename P>
struct FloatLogits {
  const Layout& L;
  std::vector<float> q, kt;
  static constexpr bool post_scale = false;  // the scale is in the queries

  explicit FloatLogits(const Layout& layout) : L(layout), kt(layout.head_dim * layout.block_size) {}

  void queries(const Q* const* rows, int64_t nv, float scale) {  // rows[v]: query vector v, head_dim values
    q.resize(nv * L.head_dim);
    for (int64_t v = 0; v < nv; ++v)
      for (int64_t d = 0; d < L.head_dim; ++d) q[v * L.head_dim + d] = to_float(rows[v][d]) * scale;
  }
  void page(const P* pages, int64_t block, int64_t kv_head) { load_page(pages, L, block, kv_head, kt.data()); }
  void logits(int64_t nv, float* out, int64_t stride) {
    page_logits(q.data(), nv, kt.data(), L.head_dim, L.block_size, out, stride);
  }
};

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Bf16Logits: bfloat16 queries and pages, 32-token pages, even head_dim: AVX512-BF16 dot products of
// (d, d+1) pairs into float32. Products of two bfloat16 values are exact in float32, so the logits
// differ from FloatLogits' only in the order of the additions; the scale is applied after.
struct Bf16Logits {
  const Layout& L;
  std::vector<uint32_t> q, kt;  // pairs of bfloat16: q [nv][head_dim / 2], kt [head_dim / 2][32]
  static constexpr bool post_scale = true;

  explicit Bf16Logits(const Layout& layout) : L(layout), kt(layout.head_dim / 2 * 32) {}

  static bool applies(const Layout& L) { return L.block_size == 32 && L.head_dim % 2 == 0; }

  void queries(const c10::BFloat16* const* rows, int64_t nv, float) {
    const int64_t pairs = L.head_dim / 2;
    q.resize(nv * pairs);
    for (int64_t v = 0; v < nv; ++v) std::memcpy(q.data() + v * pairs, rows[v], pairs * 4);
  }
  void page(const c10::BFloat16* pages, int64_t block, int64_t kv_head) {
    const uint16_t* p =
        reinterpret_cast<const uint16_t*>(pages + block * L.page_stride_block + kv_head * L.page_stride_head);
    const int64_t pairs = L.head_dim / 2;
    if (L.layout == kDT) {  // page [head_dim][32]: interleave rows 2i and 2i + 1, one register each
      // (a scalar loop here cost more than the dot products for a decode's few query vectors)
      const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                           6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
      const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
      for (int64_t i = 0; i < pairs; ++i) {
        const __m512i a = _mm512_loadu_si512(p + 2 * i * 32), b = _mm512_loadu_si512(p + (2 * i + 1) * 32);
        _mm512_storeu_si512(kt.data() + i * 32, _mm512_permutex2var_epi16(a, low, b));
        _mm512_storeu_si512(kt.data() + i * 32 + 16, _mm512_permutex2var_epi16(a, high, b));
      }
    } else if (L.layout == kAMX) {  // page [2 groups][pairs][16 tokens] of pairs already: two copies a pair
      const uint32_t* p32 = reinterpret_cast<const uint32_t*>(p);
      for (int64_t i = 0; i < pairs; ++i) {
        std::memcpy(kt.data() + i * 32, p32 + i * 16, 64);
        std::memcpy(kt.data() + i * 32 + 16, p32 + (pairs + i) * 16, 64);
      }
    } else {  // page [32][head_dim]: pairs are adjacent already, transpose them
      for (int64_t t = 0; t < 32; ++t)
        for (int64_t i = 0; i < pairs; ++i) kt[i * 32 + t] = uint32_t(p[t * L.head_dim + 2 * i]) |
                                                          (uint32_t(p[t * L.head_dim + 2 * i + 1]) << 16);
    }
  }
  template <int N>
  void logits_n(const uint32_t* qv, float* out, int64_t stride) {
    const int64_t pairs = L.head_dim / 2;
    __m512 acc[N][2];
    for (int u = 0; u < N; ++u) acc[u][0] = acc[u][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < pairs; ++i) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt.data() + i * 32);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt.data() + i * 32 + 16);
      for (int u = 0; u < N; ++u) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(qv[u * pairs + i]));
        acc[u][0] = _mm512_dpbf16_ps(acc[u][0], a, k0);
        acc[u][1] = _mm512_dpbf16_ps(acc[u][1], a, k1);
      }
    }
    for (int u = 0; u < N; ++u) {
      _mm512_storeu_ps(out + u * stride, acc[u][0]);
      _mm512_storeu_ps(out + u * stride + 16, acc[u][1]);
    }
  }
  void logits(int64_t nv, float* out, int64_t stride) {
    const int64_t pairs = L.head_dim / 2;
    int64_t v = 0;
    for (; v + 6 <= nv; v += 6) logits_n<6>(q.data() + v * pairs, out + v * stride, stride);
    for (; v + 3 <= nv; v += 3) logits_n<3>(q.data() + v * pairs, out + v * stride, stride);
    for (; v < nv; ++v) logits_n<1>(q.data() + v * pairs, out + v * stride, stride);
  }
};
#endif

struct Item {
  int64_t seg, row_begin, row_end;
};

// One call's requests (see score_layer's arguments) and where their scores go.
struct Batch {
  const int64_t *seg_blocks, *seg_reduce, *block_ids, *row_query, *row_visible, *row_out;
  std::vector<Item> items;  // (request, up to kTileRows rows): the units of parallel work
  int64_t total_blocks;
  float scale;
  double* sum_out;
  float* max_out;
  // attend_layer only (null for score_layer): value pages, strided as the key pages, each [block_size][head_dim];
  // their scale (fp8); and where each scored row's attention output goes, in the query's dtype.
  const void* values = nullptr;
  float v_scale = 1.0f;
  void* out = nullptr;
  int64_t out_stride_token = 0, out_stride_head = 0;
};

// attend_layer's output: out[g] = inv[g] * sum over the row's visible tokens t of x[g][t] * V[t] for the query
// vectors g sharing one KV head (x[g]: the probabilities exp_row left), float32 sums in token order, rounded once
// to the output's dtype. Each value row is read and widened once for up to kAttendHeads vectors, whose sums stay
// in registers, kAttendRegs registers of dimensions at a time; a head_dim those do not divide goes one by one.
constexpr int kAttendRegs = kLanes == 16 ? 4 : 2;
constexpr int kAttendHeads = 4;

template <typename P>
inline vreg widen(const P* p) {
  float f[kLanes];
  for (int i = 0; i < kLanes; ++i) f[i] = to_float(p[i]);
  return loadv(f);
}

template <int G, typename Q, typename P>
void attend_heads_n(const float* const* x, const float* inv, int64_t visible, const P* values, const Layout& L,
                    const int64_t* blocks, int64_t kv_head, float v_scale, Q* const* out) {
  const int64_t hd = L.head_dim, bs = L.block_size;
  for (int64_t d0 = 0; d0 < hd; d0 += kAttendRegs * kLanes) {
    vreg acc[G][kAttendRegs] = {};
    for (int64_t t0 = 0; t0 < visible; t0 += bs) {
      const P* page = values + blocks[t0 / bs] * L.page_stride_block + kv_head * L.page_stride_head + d0;
      const int64_t n = std::min(bs, visible - t0);
      for (int64_t t = 0; t < n; ++t) {
        vreg v[kAttendRegs];
        for (int j = 0; j < kAttendRegs; ++j) v[j] = widen(page + t * hd + j * kLanes);
        for (int g = 0; g < G; ++g) {
          const float p = x[g][t0 + t];
          for (int j = 0; j < kAttendRegs; ++j) acc[g][j] += p * v[j];
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      float sums[kAttendRegs * kLanes];
      for (int j = 0; j < kAttendRegs; ++j) storev(sums + j * kLanes, acc[g][j] * (inv[g] * v_scale));
      for (int i = 0; i < kAttendRegs * kLanes; ++i) out[g][d0 + i] = static_cast<Q>(sums[i]);
    }
  }
}

template <typename Q, typename P>
void attend_one(const float* x, float inv, int64_t visible, const P* values, const Layout& L, const int64_t* blocks,
                int64_t kv_head, float v_scale, Q* out) {
  const int64_t hd = L.head_dim, bs = L.block_size;
  std::vector<float> acc(hd, 0.0f);
  for (int64_t t0 = 0; t0 < visible; t0 += bs) {
    const P* page = values + blocks[t0 / bs] * L.page_stride_block + kv_head * L.page_stride_head;
    for (int64_t t = 0; t < std::min(bs, visible - t0); ++t)
      for (int64_t d = 0; d < hd; ++d) acc[d] += x[t0 + t] * to_float(page[t * hd + d]);
  }
  for (int64_t d = 0; d < hd; ++d) out[d] = static_cast<Q>(acc[d] * (inv * v_scale));
}

template <typename Q, typename P>
void attend_heads(const float* const* x, const float* inv, int64_t group, int64_t visible, const P* values,
                  const Layout& L, const int64_t* blocks, int64_t kv_head, float v_scale, Q* const* out) {
  if (L.head_dim % (kAttendRegs * kLanes) != 0) {
    for (int64_t g = 0; g < group; ++g) attend_one(x[g], inv[g], visible, values, L, blocks, kv_head, v_scale, out[g]);
    return;
  }
  for (int64_t g = 0; g < group; g += kAttendHeads) {
    const auto n = std::min<int64_t>(kAttendHeads, group - g);
    if (n == 4) attend_heads_n<4>(x + g, inv + g, visible, values, L, blocks, kv_head, v_scale, out + g);
    if (n == 3) attend_heads_n<3>(x + g, inv + g, visible, values, L, blocks, kv_head, v_scale, out + g);
    if (n == 2) attend_heads_n<2>(x + g, inv + g, visible, values, L, blocks, kv_head, v_scale, out + g);
    if (n == 1) attend_heads_n<1>(x + g, inv + g, visible, values, L, blocks, kv_head, v_scale, out + g);
  }
}

template <typename Q, typename P, typename Kernel>
void score(const Q* query, const P* pages, const Layout& L, const Batch& B) {
  const int64_t* seg_blocks = B.seg_blocks;
  const int64_t* row_query = B.row_query;
  const int64_t* row_visible = B.row_visible;
  const float scale = B.scale;
  const int64_t group = L.heads / L.kv_heads;
  const int64_t bs = L.block_size;
  const int num_threads = at::get_num_threads();
  std::vector<std::vector<double>> partial(num_threads);  // each thread's sum_out contribution

  at::parallel_for(0, static_cast<int64_t>(B.items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<double>& acc = partial[at::get_thread_num()];
    if (acc.empty()) acc.assign(B.total_blocks, 0.0);
    Kernel kernel(L);
    std::vector<const Q*> q_rows;
    std::vector<float> logits, best, token_mass, head_mass, invs(group);
    std::vector<const float*> probs(group);
    std::vector<Q*> outs(group);
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = B.items[it];
      const int64_t rows = item.row_end - item.row_begin;
      const int64_t nv = rows * group;  // query vectors sharing one KV head: row-major (row, head in group)
      const int64_t visible_max = row_visible[item.row_end - 1];  // rows are in position order
      const int64_t blocks = (visible_max + bs - 1) / bs;
      const int64_t first_block = seg_blocks[item.seg];
      const int64_t seg_num_blocks = seg_blocks[item.seg + 1] - first_block;
      const bool is_max = B.seg_reduce[item.seg] != 0;
      q_rows.resize(nv);
      logits.resize(nv * blocks * bs);
      head_mass.resize(seg_num_blocks);
      if (is_max)
        best.assign(rows * seg_num_blocks, 0.0f);
      else
        token_mass.assign(blocks * bs, 0.0f);
      for (int64_t kh = 0; kh < L.kv_heads; ++kh) {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t g = 0; g < group; ++g)
            q_rows[r * group + g] =
                query + row_query[item.row_begin + r] * L.q_stride_token + (kh * group + g) * L.q_stride_head;
        kernel.queries(q_rows.data(), nv, scale);
        for (int64_t b = 0; b < blocks; ++b) {
          kernel.page(pages, B.block_ids[first_block + b], kh);
          kernel.logits(nv, logits.data() + b * bs, blocks * bs);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t visible = row_visible[item.row_begin + r];
          const int64_t vis_blocks = (visible + bs - 1) / bs;
          for (int64_t g = 0; g < group; ++g) {
            float* x = logits.data() + (r * group + g) * blocks * bs;
            const float inv = exp_row(x, visible, bs, Kernel::post_scale ? scale : 1.0f);
            probs[g] = x;
            invs[g] = inv;
            if (is_max) {  // this head's mass per block, then the best head so far
              block_sums(x, vis_blocks, bs, head_mass.data());
              float* row_best = best.data() + r * seg_num_blocks;
              for (int64_t b = 0; b < vis_blocks; ++b) row_best[b] = std::max(row_best[b], head_mass[b] * inv);
            } else {  // probabilities token by token; per block once the item is done
              for (int64_t t = 0; t < vis_blocks * bs; ++t) token_mass[t] += x[t] * inv;
            }
          }
          if (B.out) {  // attend_layer: the row's output for this KV head's query vectors
            const int64_t token = row_query[item.row_begin + r];
            for (int64_t g = 0; g < group; ++g)
              outs[g] = static_cast<Q*>(B.out) + token * B.out_stride_token + (kh * group + g) * B.out_stride_head;
            attend_heads(probs.data(), invs.data(), group, visible, static_cast<const P*>(B.values), L,
                         B.block_ids + first_block, kh, B.v_scale, outs.data());
          }
        }
      }
      if (is_max) {
        for (int64_t r = 0; r < rows; ++r) {
          float* out = B.max_out + B.row_out[item.row_begin + r];
          const float* row_best = best.data() + r * seg_num_blocks;
          for (int64_t b = 0; b < seg_num_blocks; ++b) out[b] = std::max(out[b], row_best[b]);
        }
      } else {
        block_sums(token_mass.data(), blocks, bs, head_mass.data());
        for (int64_t b = 0; b < blocks; ++b) acc[first_block + b] += head_mass[b];
      }
    }
  });
  for (const auto& acc : partial)
    for (int64_t i = 0; i < static_cast<int64_t>(acc.size()); ++i) B.sum_out[i] += acc[i];
}

template <typename Q, typename P>
void score(const Q* query, const P* pages, const Layout& L, const Batch& B) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<Q, c10::BFloat16> && std::is_same_v<P, c10::BFloat16>) {
    if (Bf16Logits::applies(L)) return score<Q, P, Bf16Logits>(query, pages, L, B);
  }
#endif
  score<Q, P, FloatLogits<Q, P>>(query, pages, L, B);
}

// Key pages hold the model's dtype (the query's), or fp8 bytes with a query of any dtype.
template <typename Q>
void dispatch_pages(const at::Tensor& query, const at::Tensor& pages, const Layout& L, const Batch& B) {
  const Q* q = reinterpret_cast<const Q*>(query.const_data_ptr());
  const auto page_type = pages.scalar_type();
  if (page_type == at::kFloat8_e4m3fn) return score(q, pages.const_data_ptr<c10::Float8_e4m3fn>(), L, B);
  if (page_type == at::kFloat8_e5m2) return score(q, pages.const_data_ptr<c10::Float8_e5m2>(), L, B);
  TORCH_CHECK(page_type == query.scalar_type(), "h2o_vllm::score_layer: key pages of ", page_type,
              " with a query of ", query.scalar_type(), " (pages hold the query's dtype or fp8)");
  return score(q, reinterpret_cast<const Q*>(pages.const_data_ptr()), L, B);
}

// query: [tokens, heads, head_dim]; pages: [num_blocks, kv_heads, block_size * head_dim] (strided view), laid out
// as key_layout says; scale: the softmax scale (times the layer's key scale for fp8 pages).
// seg_rows [S+1], seg_blocks [S+1]: offsets of each request's rows and blocks; seg_reduce [S]: 0 sum, 1 max;
// block_ids [B]; row_query, row_visible, row_out [R]: each row's token in query, keys it sees, and
// offset of its block scores in max_out (max requests only).
// attend_layer: also value pages (strided as the key pages, [block_size][head_dim] each, the same dtype) and
// their scale, and output [tokens, heads, head_dim] in the query's dtype; null for score_layer.
void run_layer(const at::Tensor& query, const at::Tensor& pages, double scale, int64_t key_layout, int64_t block_size,
               const at::Tensor& seg_rows, const at::Tensor& seg_blocks, const at::Tensor& seg_reduce,
               const at::Tensor& block_ids, const at::Tensor& row_query, const at::Tensor& row_visible,
               const at::Tensor& row_out, at::Tensor& sum_out, at::Tensor& max_out, const at::Tensor* values,
               double v_scale, at::Tensor* output) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [tokens, heads, head_dim], dense rows");
  TORCH_CHECK(pages.dim() == 3 && pages.stride(2) == 1, "pages must be [blocks, kv_heads, page], dense pages");
  TORCH_CHECK(sum_out.scalar_type() == at::kDouble && sum_out.is_contiguous(), "sum_out: contiguous float64");
  TORCH_CHECK(max_out.scalar_type() == at::kFloat && max_out.is_contiguous(), "max_out: contiguous float32");
  for (const at::Tensor* t : {&seg_rows, &seg_blocks, &seg_reduce, &block_ids, &row_query, &row_visible, &row_out})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors: contiguous int64");
  Layout L{query.size(1), pages.size(1),     query.size(2), block_size, query.stride(0), query.stride(1),
           pages.stride(0), pages.stride(1), key_layout};
  TORCH_CHECK(key_layout == kDT || key_layout == kTD || key_layout == kAMX, "unknown key_layout ", key_layout);
  TORCH_CHECK(key_layout != kAMX || (block_size % 16 == 0 && L.head_dim % 2 == 0),
              "amx pages need 16-token groups and pairs of dimensions");
  TORCH_CHECK(L.heads % L.kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(pages.size(2) == L.head_dim * block_size, "page size != head_dim * block_size");
  TORCH_CHECK(sum_out.numel() == block_ids.numel(), "sum_out must hold one score per block");

  Batch B{seg_blocks.const_data_ptr<int64_t>(),
          seg_reduce.const_data_ptr<int64_t>(),
          block_ids.const_data_ptr<int64_t>(),
          row_query.const_data_ptr<int64_t>(),
          row_visible.const_data_ptr<int64_t>(),
          row_out.const_data_ptr<int64_t>(),
          {},
          block_ids.numel(),
          static_cast<float>(scale),
          sum_out.data_ptr<double>(),
          max_out.data_ptr<float>()};
  if (values != nullptr) {
    TORCH_CHECK(values->scalar_type() == pages.scalar_type() && values->sizes() == pages.sizes() &&
                    values->strides() == pages.strides(),
                "value pages must be shaped, strided and typed as the key pages");
    TORCH_CHECK(output->scalar_type() == query.scalar_type() && output->dim() == 3 && output->size(0) == query.size(0) &&
                    output->size(1) == L.heads && output->size(2) == L.head_dim && output->stride(2) == 1,
                "output must be [tokens, heads, head_dim] of the query's dtype, dense rows");
    B.values = values->const_data_ptr();
    B.v_scale = static_cast<float>(v_scale);
    B.out = output->data_ptr();
    B.out_stride_token = output->stride(0);
    B.out_stride_head = output->stride(1);
  }
  const int64_t* sr = seg_rows.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < seg_reduce.numel(); ++s)
    for (int64_t r = sr[s]; r < sr[s + 1]; r += kTileRows) B.items.push_back({s, r, std::min(r + kTileRows, sr[s + 1])});
  switch (query.scalar_type()) {
    case at::kFloat:
      return dispatch_pages<float>(query, pages, L, B);
    case at::kBFloat16:
      return dispatch_pages<c10::BFloat16>(query, pages, L, B);
    case at::kHalf:
      return dispatch_pages<c10::Half>(query, pages, L, B);
    default:
      TORCH_CHECK(false, "h2o_vllm::score_layer: unsupported query dtype ", query.scalar_type());
  }
}

void score_layer(const at::Tensor& query, const at::Tensor& pages, double scale, int64_t key_layout, int64_t block_size,
                 const at::Tensor& seg_rows, const at::Tensor& seg_blocks, const at::Tensor& seg_reduce,
                 const at::Tensor& block_ids, const at::Tensor& row_query, const at::Tensor& row_visible,
                 const at::Tensor& row_out, at::Tensor& sum_out, at::Tensor& max_out) {
  run_layer(query, pages, scale, key_layout, block_size, seg_rows, seg_blocks, seg_reduce, block_ids, row_query,
            row_visible, row_out, sum_out, max_out, nullptr, 1.0, nullptr);
}

// score_layer, and the attention output of every scored row from the same probabilities: softmax(scale * q.K) V
// over the keys the row sees, into output (one pass over the key pages for both).
void attend_layer(const at::Tensor& query, const at::Tensor& pages, const at::Tensor& values, double scale,
                  double v_scale, int64_t key_layout, int64_t block_size, const at::Tensor& seg_rows,
                  const at::Tensor& seg_blocks, const at::Tensor& seg_reduce, const at::Tensor& block_ids,
                  const at::Tensor& row_query, const at::Tensor& row_visible, const at::Tensor& row_out,
                  at::Tensor& sum_out, at::Tensor& max_out, at::Tensor& output) {
  run_layer(query, pages, scale, key_layout, block_size, seg_rows, seg_blocks, seg_reduce, block_ids, row_query,
            row_visible, row_out, sum_out, max_out, &values, v_scale, &output);
}

// What this build's vector code uses, as compiled (logged by fused.py: the engine says what it runs).
std::string target_name() {
  std::string s;
#if defined(__x86_64__)
  s = "x86-64";
#elif defined(__aarch64__)
  s = "aarch64";
#else
  s = "generic";
#endif
#if defined(__AVX512F__)
  s += " AVX-512";
#elif defined(__AVX2__)
  s += " AVX2";
#elif defined(__AVX__)
  s += " AVX";
#elif defined(__SSE4_2__)
  s += " SSE4.2";
#elif defined(__SSE2__)
  s += " SSE2";
#elif defined(__ARM_NEON)
  s += " NEON";
#endif
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  s += " FMA";
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  s += ", AVX512-BF16 dot products";
#endif
  return s + " (" + std::to_string(kLanes * 32) + "-bit registers)";
}

}  // namespace

#ifndef H2O_OPS_NAMESPACE
#define H2O_OPS_NAMESPACE h2o_vllm
#endif
// One level of indirection so that the namespace macro is expanded before TORCH_LIBRARY pastes it.
#define H2O_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define H2O_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

H2O_LIBRARY(H2O_OPS_NAMESPACE, m) {
  m.def(
      "score_layer(Tensor query, Tensor pages, float scale, int key_layout, int block_size, Tensor seg_rows, "
      "Tensor seg_blocks, Tensor seg_reduce, Tensor block_ids, Tensor row_query, Tensor row_visible, "
      "Tensor row_out, Tensor(a!) sum_out, Tensor(b!) max_out) -> ()");
  m.def(
      "attend_layer(Tensor query, Tensor pages, Tensor values, float scale, float v_scale, int key_layout, "
      "int block_size, Tensor seg_rows, Tensor seg_blocks, Tensor seg_reduce, Tensor block_ids, Tensor row_query, "
      "Tensor row_visible, Tensor row_out, Tensor(a!) sum_out, Tensor(b!) max_out, Tensor(c!) output) -> ()");
  m.def("target() -> str", &target_name);
}

H2O_LIBRARY_IMPL(H2O_OPS_NAMESPACE, m) {
  m.impl("score_layer", &score_layer);
  m.impl("attend_layer", &attend_layer);
}
