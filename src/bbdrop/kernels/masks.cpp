// bbdrop's compiled CPU kernels: relaxed-Bernoulli masks drawn and applied in one pass.
//
// A BB gate multiplies unit k of example n by z_nk = sigmoid((l_k + L_nk) / tau), with
// L_nk standard logistic noise; a DBB gate by the product of two such masks. In eager
// PyTorch that is a serial torch.rand call and half a dozen passes over the (N, K)
// activations, forward and backward. Here the noise comes from a counter-based
// generator (SplitMix64 evaluated at counter n*K + k, seeded per call from torch's
// generator), so every element is independent of the others, the loops vectorise and
// split across threads, and the mask is drawn, applied and saved in one pass.
//
// Built on first use by bbdrop/kernels/__init__.py (torch.utils.cpp_extension.load).
// The Python side checks shapes and dtypes; the TORCH_CHECKs below are the last guard.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;  // SplitMix64's increment

// SplitMix64 (Steele, Lea & Flood 2014): its i-th output for state `seed` is
// mix(seed + (i + 1) * gamma), so any element can be drawn without the others.
inline uint64_t splitmix64(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * kGamma;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline float as_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline int32_t as_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// exp and log in float32 without library calls, so that the loops vectorise.
// Cody-Waite range reduction and the minimax polynomials of the Cephes library
// (S. Moshier); relative error about 2e-7 on the ranges used here.
inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // n = round(x / ln 2): adding and subtracting 1.5 2^23 rounds to an integer
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x -= n * 0.693359375f;
  x -= n * -2.12194440e-4f;
  const float x2 = x * x;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * x2 + x + 1.0f;
  return p * as_float((static_cast<int32_t>(n) + 127) << 23);
}

// Natural log of a positive normal float.
inline float log_f32(float x) {
  const int32_t bits = as_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = as_float((bits & 0x007fffff) | 0x3f000000);  // x = m 2^e, m in [0.5, 1)
  const bool low = m < 0.707106781186547524f;              // keep m - 1 in [-0.29, 0.41]
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float m2 = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = p * m * m2 - 2.12194440e-4f * e - 0.5f * m2;
  return m + y + 0.693359375f * e;
}

// Two uniforms on (0, 1) from one 64-bit draw: the top 23 bits of each half, centred
// in their bin, u = (j + 1/2) 2^-23. Both u and 1 - u are exact in float32.
inline float uniform_hi(uint64_t h) {
  return (static_cast<float>(static_cast<int32_t>(h >> 41)) + 0.5f) * 0x1p-23f;
}

inline float uniform_lo(uint64_t h) {
  return (static_cast<float>(static_cast<int32_t>((h & 0xffffffffULL) >> 9)) + 0.5f) * 0x1p-23f;
}

inline float logistic(float u) { return log_f32(u / (1.0f - u)); }

inline float sigmoid_f32(float t) { return 1.0f / (1.0f + exp_f32(-t)); }

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Row kernels. Each takes its arrays as restrict-qualified parameters, which is what
// lets the compiler vectorise them.

// z_j = sigmoid((l_j + L(u_hi)) / tau) for the units j of one example (counters base + j).
void draw_one(const float* __restrict l, float* __restrict z, uint64_t seed, uint64_t base,
              int64_t k, float inv_tau) {
  for (int64_t j = 0; j < k; ++j) {
    const uint64_t h = splitmix64(seed, base + j);
    z[j] = sigmoid_f32((l[j] + logistic(uniform_hi(h))) * inv_tau);
  }
}

// Two masks from the two halves of each draw, and their product.
void draw_two(const float* __restrict l1, const float* __restrict l2, float* __restrict z1,
              float* __restrict z2, float* __restrict zp, uint64_t seed, uint64_t base, int64_t k,
              float inv_tau) {
  for (int64_t j = 0; j < k; ++j) {
    const uint64_t h = splitmix64(seed, base + j);
    const float a = sigmoid_f32((l1[j] + logistic(uniform_hi(h))) * inv_tau);
    const float b = sigmoid_f32((l2[j] + logistic(uniform_lo(h))) * inv_tau);
    z1[j] = a;
    z2[j] = b;
    zp[j] = a * b;
  }
}

// y[j, q] = x[j, q] z[j] over one example's (K, S) block.
void scale_units(const float* __restrict x, const float* __restrict z, float* __restrict y,
                 int64_t k, int64_t s) {
  if (s == 1) {
    for (int64_t j = 0; j < k; ++j) y[j] = x[j] * z[j];
    return;
  }
  for (int64_t j = 0; j < k; ++j) {
    const float zj = z[j];
    for (int64_t q = 0; q < s; ++q) y[j * s + q] = x[j * s + q] * zj;
  }
}

// G[j] = sum_q dy[j, q] x[j, q]: the gradient w.r.t. the mask value of unit j.
void mask_grad(const float* __restrict dy, const float* __restrict x, float* __restrict g,
               int64_t k, int64_t s) {
  if (s == 1) {
    for (int64_t j = 0; j < k; ++j) g[j] = dy[j] * x[j];
    return;
  }
  for (int64_t j = 0; j < k; ++j) {
    float acc = 0.0f;
    for (int64_t q = 0; q < s; ++q) acc += dy[j * s + q] * x[j * s + q];
    g[j] = acc;
  }
}

void logit_grad_one(const float* __restrict g, const float* __restrict a, float* __restrict o,
                    int64_t k, float inv_tau) {
  for (int64_t j = 0; j < k; ++j) o[j] = g[j] * a[j] * (1.0f - a[j]) * inv_tau;
}

void logit_grad_two(const float* __restrict g, const float* __restrict a,
                    const float* __restrict b, float* __restrict o1, float* __restrict o2,
                    float* __restrict zp, int64_t k, float inv_tau) {
  for (int64_t j = 0; j < k; ++j) {
    o1[j] = g[j] * b[j] * a[j] * (1.0f - a[j]) * inv_tau;
    o2[j] = g[j] * a[j] * b[j] * (1.0f - b[j]) * inv_tau;
    zp[j] = a[j] * b[j];
  }
}

// One example of DBB's phi: u = (h - m) inv_std, p = shift + scale u, the clamped logit
// and its derivative (zero outside [lo, hi], as torch.logit's with eps).
void phi_row(const float* __restrict h, const float* __restrict m,
             const float* __restrict inv_std, const float* __restrict shift,
             const float* __restrict scale, float* __restrict u, float* __restrict logit,
             float* __restrict dlogit, int64_t k, float lo, float hi) {
  for (int64_t j = 0; j < k; ++j) {
    const float uj = (h[j] - m[j]) * inv_std[j];
    const float p = shift[j] + scale[j] * uj;
    const float pc = p < lo ? lo : (p > hi ? hi : p);
    u[j] = uj;
    logit[j] = log_f32(pc / (1.0f - pc));
    dlogit[j] = (p < lo || p > hi) ? 0.0f : 1.0f / (pc * (1.0f - pc));
  }
}

void accumulate_phi_grads(const float* __restrict g, const float* __restrict u,
                          const float* __restrict d, float* __restrict g_shift,
                          float* __restrict g_scale, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    const float t = g[j] * d[j];
    g_shift[j] += t;
    g_scale[j] += t * u[j];
  }
}

// Rows of at least this many elements go to one thread.
constexpr int64_t kGrain = 16384;

int64_t row_grain(int64_t row_size) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_size, 1));
}

}  // namespace

// The uniforms the masks are drawn from, (count, 2): for tests of the generator.
at::Tensor uniforms(int64_t count, int64_t seed) {
  at::Tensor out = at::empty({count, 2}, at::kFloat);
  float* o = out.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed);
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t h = splitmix64(s, static_cast<uint64_t>(i));
    o[2 * i] = uniform_hi(h);
    o[2 * i + 1] = uniform_lo(h);
  }
  return out;
}

// The noise itself, (count, 2): logistic(u) with this file's log, for tests.
at::Tensor logistic_noise(int64_t count, int64_t seed) {
  at::Tensor out = uniforms(count, seed);
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < 2 * count; ++i) o[i] = logistic(o[i]);
  return out;
}

namespace {

int64_t check_logits(const at::Tensor& l, const char* name, int64_t n, int64_t k) {
  check_cpu_float(l, name);
  TORCH_CHECK((l.dim() == 1 && l.size(0) == k) ||
                  (l.dim() == 2 && l.size(0) == n && l.size(1) == k),
              name, " must be (K,) or (N, K)");
  return l.dim() == 2 ? k : 0;  // the stride between examples
}

}  // namespace

// y = x * z1 [* z2], z_j = sigmoid((logits_j + L_j) / tau), one draw per (example, unit).
// x: (N, K, ...), the mask broadcast over the trailing dimensions; logits: (K,) or (N, K).
// Counter n K + k gives both noises of (n, k): L1 from the draw's high half, L2 from the
// low one. Returns {y, z1, z2}; z2 is empty when logits2 is not given.
std::vector<at::Tensor> masked_forward(const at::Tensor& x, const at::Tensor& logits1,
                                       const c10::optional<at::Tensor>& logits2, double tau,
                                       int64_t seed) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must be (N, K, ...)");
  const int64_t n = x.size(0), k = x.size(1);
  const int64_t s = k == 0 || n == 0 ? 1 : x.numel() / (n * k);
  const bool two = logits2.has_value();
  const int64_t stride1 = check_logits(logits1, "logits1", n, k);
  const int64_t stride2 = two ? check_logits(*logits2, "logits2", n, k) : 0;

  at::Tensor y = at::empty_like(x);
  at::Tensor z1 = at::empty({n, k}, x.options());
  at::Tensor z2 = two ? at::empty({n, k}, x.options()) : at::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* l1p = logits1.data_ptr<float>();
  const float* l2p = two ? logits2->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  float* z1p = z1.data_ptr<float>();
  float* z2p = two ? z2.data_ptr<float>() : nullptr;
  const float inv_tau = static_cast<float>(1.0 / tau);
  const uint64_t useed = static_cast<uint64_t>(seed);

  at::parallel_for(0, n, row_grain(k * s), [&](int64_t begin, int64_t end) {
    std::vector<float> zp(two ? k : 0);
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t base = static_cast<uint64_t>(i * k);
      float* z1r = z1p + i * k;
      if (two) {
        draw_two(l1p + i * stride1, l2p + i * stride2, z1r, z2p + i * k, zp.data(), useed, base,
                 k, inv_tau);
        scale_units(xp + i * k * s, zp.data(), yp + i * k * s, k, s);
      } else {
        draw_one(l1p + i * stride1, z1r, useed, base, k, inv_tau);
        scale_units(xp + i * k * s, z1r, yp + i * k * s, k, s);
      }
    }
  });
  return {y, z1, z2};
}

// Gradients of masked_forward. With G_nk = sum over the trailing dimensions of dy * x:
//   dx = dy z1 z2,  d logits1 = G z2 z1 (1 - z1) / tau,  d logits2 = G z1 z2 (1 - z2) / tau
// (z2 = 1 with one mask). The logits' gradients are returned per example, (N, K).
std::vector<at::Tensor> masked_backward(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& z1, const c10::optional<at::Tensor>& z2,
                                        double tau, bool need_x) {
  check_cpu_float(grad, "grad");
  check_cpu_float(x, "x");
  check_cpu_float(z1, "z1");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad and x must have the same shape");
  const int64_t n = x.size(0), k = x.size(1);
  const int64_t s = k == 0 || n == 0 ? 1 : x.numel() / (n * k);
  TORCH_CHECK(z1.dim() == 2 && z1.size(0) == n && z1.size(1) == k, "z1 must be (N, K)");
  const bool two = z2.has_value();
  if (two) {
    check_cpu_float(*z2, "z2");
    TORCH_CHECK(z2->sizes() == z1.sizes(), "z2 must be (N, K)");
  }
  at::Tensor gx = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor g1 = at::empty({n, k}, x.options());
  at::Tensor g2 = two ? at::empty({n, k}, x.options()) : at::empty({0}, x.options());
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* z1p = z1.data_ptr<float>();
  const float* z2p = two ? z2->data_ptr<float>() : nullptr;
  float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
  float* g1p = g1.data_ptr<float>();
  float* g2p = two ? g2.data_ptr<float>() : nullptr;
  const float inv_tau = static_cast<float>(1.0 / tau);

  at::parallel_for(0, n, row_grain(k * s), [&](int64_t begin, int64_t end) {
    std::vector<float> gm(k), zp(two ? k : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t off = i * k * s;
      mask_grad(gp + off, xp + off, gm.data(), k, s);
      const float* zrow = z1p + i * k;
      if (two) {
        logit_grad_two(gm.data(), z1p + i * k, z2p + i * k, g1p + i * k, g2p + i * k, zp.data(),
                       k, inv_tau);
        zrow = zp.data();
      } else {
        logit_grad_one(gm.data(), z1p + i * k, g1p + i * k, k, inv_tau);
      }
      if (need_x) scale_units(gp + off, zrow, gxp + off, k, s);
    }
  });
  return {gx, g1, g2};
}

// ---------------------------------------------------------------------------------------
// The BB posterior's per-unit quantities, from the raw parameters, in double precision:
// a = softplus(max(a_raw, a_min)), b = softplus(clamp(b_raw, b_min, b_max)) as in
// bbdrop/gates/bb.py, with the local derivatives w.r.t. a_raw and b_raw for the
// backward pass (zero where a clamp is active, as torch.clamp's gradient is).

namespace {

struct Softplus {
  double value, slope;  // softplus(x) and its derivative sigmoid(x), 0 outside the clamp
};

Softplus clamped_softplus(double raw, double lo, double hi) {
  const bool inside = raw >= lo && raw <= hi;
  const double x = raw < lo ? lo : (raw > hi ? hi : raw);
  const double value = x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
  const double slope = inside ? 1.0 / (1.0 + std::exp(-x)) : 0.0;
  return {value, slope};
}

// digamma and trigamma for x > 0: recurrence up to x >= 8, then the asymptotic series
// (Abramowitz & Stegun 6.3.18 and 6.4.12); absolute error below 1e-12 there.
double digamma(double x) {
  double acc = 0.0;
  while (x < 8.0) {
    acc -= 1.0 / x;
    x += 1.0;
  }
  const double r = 1.0 / (x * x);
  return acc + std::log(x) - 0.5 / x -
         r * (1.0 / 12 - r * (1.0 / 120 - r * (1.0 / 252 - r * (1.0 / 240 - r * (1.0 / 132)))));
}

double trigamma(double x) {
  double acc = 0.0;
  while (x < 8.0) {
    acc += 1.0 / (x * x);
    x += 1.0;
  }
  const double r = 1.0 / (x * x);
  return acc + 1.0 / x + 0.5 * r +
         (r / x) * (1.0 / 6 - r * (1.0 / 30 - r * (1.0 / 42 - r * (1.0 / 30 - r * (5.0 / 66)))));
}

constexpr double kEulerGamma = 0.5772156649015329;

void check_units(const at::Tensor& t, const char* name, int64_t k) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == k, name, " must be (K,)");
}

// The outputs of a per-unit function of two parameter vectors: {value, d/d first,
// d/d second}, three float32 (K,) tensors shaped like the checked input `like`.
std::vector<at::Tensor> per_unit_outputs(const at::Tensor& like) {
  return {at::empty_like(like), at::empty_like(like), at::empty_like(like)};
}

}  // namespace

// logit(pi) for pi = (1 - u^(1/b))^(1/a), u given in (0, 1), and its derivatives
// w.r.t. a_raw and b_raw. pi is clamped to [tiny, 1 - tiny] (float32's epsilon) as
// bbdrop.gates.functional.kumaraswamy_logit_rsample does, with zero gradient outside.
// Returns {logit, dlogit/da_raw, dlogit/db_raw}.
std::vector<at::Tensor> kumaraswamy_logit(const at::Tensor& a_raw, const at::Tensor& b_raw,
                                          const at::Tensor& u, double a_min, double b_min,
                                          double b_max) {
  const int64_t k = a_raw.numel();
  check_units(a_raw, "a_raw", k);
  check_units(b_raw, "b_raw", k);
  check_units(u, "u", k);
  std::vector<at::Tensor> out = per_unit_outputs(a_raw);  // {logit, da, db}
  const float *ap = a_raw.data_ptr<float>(), *bp = b_raw.data_ptr<float>(),
              *up = u.data_ptr<float>();
  float *lp = out[0].data_ptr<float>(), *dap = out[1].data_ptr<float>(),
        *dbp = out[2].data_ptr<float>();
  const double tiny = 1.1920928955078125e-07;  // float32 epsilon
  for (int64_t j = 0; j < k; ++j) {
    const Softplus sa = clamped_softplus(ap[j], a_min, INFINITY);
    const Softplus sb = clamped_softplus(bp[j], b_min, b_max);
    const double a = sa.value, b = sb.value;
    const double log_w = std::log(static_cast<double>(up[j])) / b;
    const double v = -std::expm1(log_w);  // 1 - w
    const double log_pi = std::log(v) / a;
    const double pi = std::exp(log_pi);
    const bool inside = pi > tiny && pi < 1.0 - tiny;
    const double pc = pi < tiny ? tiny : (pi > 1.0 - tiny ? 1.0 - tiny : pi);
    lp[j] = static_cast<float>(std::log(pc) - std::log1p(-pc));
    const double g = inside ? 1.0 / (1.0 - pi) : 0.0;  // d logit / d log pi
    dap[j] = static_cast<float>(g * (-log_pi / a) * sa.slope);
    dbp[j] = static_cast<float>(g * ((1.0 - v) / v) * log_w / (a * b) * sb.slope);
  }
  return out;
}

// KL(Kumaraswamy(a, b) || Beta(c, 1)) per unit (bbdrop.gates.functional.kumaraswamy_beta_kl)
// and its derivatives w.r.t. a_raw and b_raw. Returns {kl, dkl/da_raw, dkl/db_raw}.
std::vector<at::Tensor> kumaraswamy_beta_kl(const at::Tensor& a_raw, const at::Tensor& b_raw,
                                            double c, double a_min, double b_min, double b_max) {
  const int64_t k = a_raw.numel();
  check_units(a_raw, "a_raw", k);
  check_units(b_raw, "b_raw", k);
  std::vector<at::Tensor> out = per_unit_outputs(a_raw);  // {kl, da, db}
  const float *ap = a_raw.data_ptr<float>(), *bp = b_raw.data_ptr<float>();
  float *kp = out[0].data_ptr<float>(), *dap = out[1].data_ptr<float>(),
        *dbp = out[2].data_ptr<float>();
  const double log_c = std::log(c);
  for (int64_t j = 0; j < k; ++j) {
    const Softplus sa = clamped_softplus(ap[j], a_min, INFINITY);
    const Softplus sb = clamped_softplus(bp[j], b_min, b_max);
    const double a = sa.value, b = sb.value;
    const double inv_a = 1.0 / a, inv_b = 1.0 / b;
    const double t = -kEulerGamma - digamma(b) - inv_b;
    kp[j] = static_cast<float>((1.0 - c * inv_a) * t + std::log(a * b) - log_c - 1.0 + inv_b);
    dap[j] = static_cast<float>((c * inv_a * inv_a * t + inv_a) * sa.slope);
    dbp[j] = static_cast<float>(
        ((1.0 - c * inv_a) * (inv_b * inv_b - trigamma(b)) + inv_b - inv_b * inv_b) * sb.slope);
  }
  return out;
}

// KL(N(mean, s^2) || N(0, rho^2)) per unit with s = softplus(max(s_raw, s_min)), and its
// derivatives w.r.t. mean and s_raw (bbdrop.gates.functional.gaussian_kl; DBB's shift).
std::vector<at::Tensor> gaussian_kl(const at::Tensor& mean, const at::Tensor& s_raw, double s_min,
                                    double rho) {
  const int64_t k = mean.numel();
  check_units(mean, "mean", k);
  check_units(s_raw, "s_raw", k);
  std::vector<at::Tensor> out = per_unit_outputs(mean);  // {kl, dm, ds}
  const float *mp = mean.data_ptr<float>(), *sp = s_raw.data_ptr<float>();
  float *kp = out[0].data_ptr<float>(), *dmp = out[1].data_ptr<float>(),
        *dsp = out[2].data_ptr<float>();
  const double inv_rho2 = 1.0 / (rho * rho);
  for (int64_t j = 0; j < k; ++j) {
    const Softplus ss = clamped_softplus(sp[j], s_min, INFINITY);
    const double m = mp[j], sd = ss.value;
    kp[j] = static_cast<float>(std::log(rho / sd) + 0.5 * (sd * sd + m * m) * inv_rho2 - 0.5);
    dmp[j] = static_cast<float>(m * inv_rho2);
    dsp[j] = static_cast<float>((-1.0 / sd + sd * inv_rho2) * ss.slope);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// DBB's input-dependent logit(phi) in training (bbdrop/gates/dbb.py, logit_phi):
//   h = x pooled over its trailing dimensions (N, K); batch mean m and biased variance v;
//   u = (h - m) / sqrt(v + norm_eps);  p = shift + scale u;
//   logit(phi) = logit(clamp(p, eps, 1 - eps)), gradient zero outside [eps, 1 - eps].
// Returns {logit_phi, mean, var, u, dlogit/dp}; the last two are for the backward pass.
std::vector<at::Tensor> dbb_logit_phi(const at::Tensor& x, const at::Tensor& shift,
                                      const at::Tensor& scale, double norm_eps, double eps) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must be (N, K, ...)");
  const int64_t n = x.size(0), k = x.size(1);
  TORCH_CHECK(n > 0, "x must hold at least one example");
  const int64_t s = k == 0 ? 1 : x.numel() / (n * k);
  check_units(shift, "shift", k);
  check_units(scale, "scale", k);
  at::Tensor h = s == 1 ? x : x.reshape({n, k, s}).mean(2);  // (N, K), contiguous
  at::Tensor mean = at::zeros({k}, x.options());
  at::Tensor var = at::zeros({k}, x.options());
  at::Tensor u = at::empty({n, k}, x.options());
  at::Tensor logit = at::empty({n, k}, x.options());
  at::Tensor dlogit = at::empty({n, k}, x.options());
  const float* hp = h.data_ptr<float>();
  float *mp = mean.data_ptr<float>(), *vp = var.data_ptr<float>();
  // two-pass statistics, accumulated in double over examples, vectorised over units
  std::vector<double> acc(k, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j) acc[j] += hp[i * k + j];
  for (int64_t j = 0; j < k; ++j) mp[j] = static_cast<float>(acc[j] / n);
  std::fill(acc.begin(), acc.end(), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j) {
      const double c = hp[i * k + j] - mp[j];
      acc[j] += c * c;
    }
  std::vector<float> inv_std(k);
  for (int64_t j = 0; j < k; ++j) {
    vp[j] = static_cast<float>(acc[j] / n);
    inv_std[j] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(vp[j]) + norm_eps));
  }
  const float* shp = shift.data_ptr<float>();
  const float* scp = scale.data_ptr<float>();
  float *up = u.data_ptr<float>(), *lp = logit.data_ptr<float>(), *dp = dlogit.data_ptr<float>();
  const float lo = static_cast<float>(eps), hi = static_cast<float>(1.0 - eps);
  at::parallel_for(0, n, row_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      phi_row(hp + i * k, mp, inv_std.data(), shp, scp, up + i * k, lp + i * k, dp + i * k, k, lo,
              hi);
    }
  });
  return {logit, mean, var, u, dlogit};
}

// Gradients of dbb_logit_phi w.r.t. shift and scale, from the gradient of logit(phi):
//   d shift = sum_n g dlogit,  d scale = sum_n g dlogit u.
std::vector<at::Tensor> dbb_logit_phi_backward(const at::Tensor& grad, const at::Tensor& u,
                                               const at::Tensor& dlogit) {
  check_cpu_float(grad, "grad");
  check_cpu_float(u, "u");
  check_cpu_float(dlogit, "dlogit");
  TORCH_CHECK(grad.sizes() == u.sizes() && u.sizes() == dlogit.sizes() && u.dim() == 2,
              "grad, u and dlogit must be (N, K)");
  const int64_t n = u.size(0), k = u.size(1);
  at::Tensor g_shift = at::zeros({k}, u.options());
  at::Tensor g_scale = at::zeros({k}, u.options());
  const float *gp = grad.data_ptr<float>(), *up = u.data_ptr<float>(),
              *dp = dlogit.data_ptr<float>();
  float *osh = g_shift.data_ptr<float>(), *osc = g_scale.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    accumulate_phi_grads(gp + i * k, up + i * k, dp + i * k, osh, osc, k);
  return {g_shift, g_scale};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("uniforms", &uniforms, "the generator's uniforms, (count, 2)");
  m.def("logistic_noise", &logistic_noise, "logistic noise from those uniforms, (count, 2)");
  m.def("masked_forward", &masked_forward, "x times one or two relaxed-Bernoulli masks");
  m.def("masked_backward", &masked_backward, "gradients of masked_forward");
  m.def("kumaraswamy_logit", &kumaraswamy_logit, "logit(pi) of a Kumaraswamy draw, with derivatives");
  m.def("kumaraswamy_beta_kl", &kumaraswamy_beta_kl, "KL(Kumaraswamy || Beta(c, 1)), with derivatives");
  m.def("gaussian_kl", &gaussian_kl, "KL(N(m, s^2) || N(0, rho^2)), with derivatives");
  m.def("dbb_logit_phi", &dbb_logit_phi, "DBB's logit(phi) with batch statistics");
  m.def("dbb_logit_phi_backward", &dbb_logit_phi_backward, "gradients of dbb_logit_phi");
}
