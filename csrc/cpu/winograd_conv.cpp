// Winograd F(4x4, 3x3) for fp32 3x3 stride-1 pad-1 convolutions: each 4x4 output tile comes
// from a 6x6 input tile through 36 element-wise products in the transformed domain, which for
// all tiles at once are 36 matrix products [tiles x C] x [C x K] (oneDNN's batched matmul).
// A tile's 16 outputs per (input, output) channel pair take 36 multiplies instead of direct's
// 16 * 9 = 144: 4x fewer, at the cost of the transforms (memory-bound, vectorized over channels).
// oneDNN 3.2 has no Winograd for AVX-512 or AVX2, and its direct kernels already run near the
// FMA peak, so this is the one way to make these convs (about 40% of ResNet-50's and half of
// GoogLeNet's FLOPs) faster on the CPU. Measured on a 2-core AMD EPYC (AVX-512), against
// oneDNN's brgconv, each conv alone: 1.7-3.0x (benchmarks/cpu_winograd_convs.py).
//
// The price is precision: the input transform's coefficients (up to 5) and the output
// transform's (up to 8) grow rounding errors; the error is about 10x direct's, ~1e-5 of the
// outputs' scale with 512 input channels (fastcnn.cpu.winograd documents it and turns it off).
//
// Layout: V [36][tiles][Cp] (the transformed input), M [36][tiles][Kp] (the products), with the
// channels padded to a multiple of 16 (one AVX-512 vector; zeros in V and U). Tiles are taken
// in chunks whose V and M fit a budget, so that at batch 8 they stay in cache rather than
// stream through memory (at batch 8 up to 1.4x faster than one chunk); every chunk has the same
// number of tiles (one matmul primitive), the last one padded with zero tiles.
#ifdef FASTCNN_WITH_ONEDNN

#include "winograd_conv.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "../common/thread_buffer.h"
#include "onednn_common.h"

namespace fastcnn {
namespace {

using dnnl::memory;
constexpr int64_t kLanes = 16;  // channels per vector step
constexpr int64_t kTile = 4, kIn = kTile + 2, kPoints = kIn * kIn;
// V and M of one chunk: within L2 + a share of L3 (chosen among 4, 16 MB and no chunks on a
// 2-core AMD EPYC: 4 MB with the weight rule of make_plan was best at batch 8 and 1)
constexpr int64_t kChunkBytes = 4 << 20;
constexpr int64_t kLargeChunkTiles = 128;  // tiles a chunk where the weight passes the budget
alignas(64) constexpr float kZeros[kLanes] = {};

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// B^T d for one line of 6 input values (per lane): the F(4, 3) input transform
inline void input_line(const float* const d[kIn], float* const o[kIn]) {
#pragma omp simd
  for (int64_t c = 0; c < kLanes; ++c) {
    const float d0 = d[0][c], d1 = d[1][c], d2 = d[2][c], d3 = d[3][c], d4 = d[4][c], d5 = d[5][c];
    o[0][c] = 4.f * d0 - 5.f * d2 + d4;
    o[1][c] = -4.f * (d1 + d2) + d3 + d4;
    o[2][c] = 4.f * (d1 - d2) - d3 + d4;
    o[3][c] = -2.f * (d1 - d3) - d2 + d4;
    o[4][c] = 2.f * (d1 - d3) - d2 + d4;
    o[5][c] = 4.f * d1 - 5.f * d3 + d5;
  }
}

// A^T m for one line of 6 products (per lane): the F(4, 3) output transform
inline void output_line(const float* const m[kIn], float* const o[kTile]) {
#pragma omp simd
  for (int64_t c = 0; c < kLanes; ++c) {
    const float a = m[1][c] + m[2][c], b = m[1][c] - m[2][c];
    const float p = m[3][c] + m[4][c], q = m[3][c] - m[4][c];
    o[0][c] = m[0][c] + a + p;
    o[1][c] = b + 2.f * q;
    o[2][c] = a + 4.f * p;
    o[3][c] = b + 8.f * q + m[5][c];
  }
}

// How a conv of these sizes is cut into chunks of tiles, and its matmul.
struct Plan {
  int64_t batch, h, w, c, k, cp, kp;
  int64_t tiles_h, tiles_w, tiles, chunk, chunks;
  std::shared_ptr<dnnl::matmul> matmul;
  memory::desc src, weights, dst, scratchpad;
};

std::shared_ptr<const Plan> make_plan(at::IntArrayRef x, int64_t k) {
  auto plan = std::make_shared<Plan>();
  plan->batch = x[0], plan->c = x[1], plan->h = x[2], plan->w = x[3], plan->k = k;
  plan->cp = round_up(plan->c, kLanes), plan->kp = round_up(k, kLanes);
  plan->tiles_h = (plan->h + kTile - 1) / kTile, plan->tiles_w = (plan->w + kTile - 1) / kTile;
  plan->tiles = plan->batch * plan->tiles_h * plan->tiles_w;
  TORCH_CHECK(plan->tiles > 0 && plan->c > 0 && k > 0, "fastcnn winograd: input sizes ", x, " and ",
              k, " outputs leave nothing to compute");
  const int64_t per_tile = kPoints * (plan->cp + plan->kp) * static_cast<int64_t>(sizeof(float));
  // Each chunk reads the whole transformed weight again: where that is larger than the budget,
  // re-reading it per chunk costs more than V and M leaving the cache, so such convs take
  // kLargeChunkTiles a chunk (ResNet-50's at batch 8: one chunk), which also bounds the
  // per-thread buffer at any batch size: 128 * 36 * (C + K) floats (19 MB for 512 -> 512).
  const int64_t weight_bytes = kPoints * plan->cp * plan->kp * static_cast<int64_t>(sizeof(float));
  const int64_t most =
      weight_bytes > kChunkBytes ? kLargeChunkTiles : std::max<int64_t>(1, kChunkBytes / per_tile);
  plan->chunks = (plan->tiles + most - 1) / most;
  plan->chunk = (plan->tiles + plan->chunks - 1) / plan->chunks;  // equal chunks
  using tag = memory::format_tag;
  const auto f32 = memory::data_type::f32;
  plan->src = memory::desc({kPoints, plan->chunk, plan->cp}, f32, tag::abc);
  plan->dst = memory::desc({kPoints, plan->chunk, plan->kp}, f32, tag::abc);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per call: safe across threads
  dnnl::matmul::primitive_desc pd(onednn_engine(), plan->src,
                                  memory::desc({kPoints, plan->cp, plan->kp}, f32, tag::any),
                                  plan->dst, attr);
  plan->weights = pd.weights_desc();
  plan->scratchpad = pd.scratchpad_desc();
  plan->matmul = std::make_shared<dnnl::matmul>(pd);
  return plan;
}

std::mutex plans_mutex;
std::unordered_map<OnednnKey, std::shared_ptr<const Plan>, OnednnKeyHash> plans;
// Plans kept (a matmul primitive each, no weights): a server cycling through every batch size up
// to 32 of a GoogLeNet needs ~600; past the bound the map is emptied and refilled.
constexpr size_t kMaxPlans = 4096;

// The plan for x's sizes and k outputs at this thread count (oneDNN picks the packed layout
// and the partitioning for it).
std::shared_ptr<const Plan> plan_for(at::IntArrayRef x, int64_t k) {
  OnednnKey key(x.begin(), x.end());
  key.insert(key.end(), {k, at::get_num_threads()});
  {
    std::lock_guard<std::mutex> lock(plans_mutex);
    auto hit = plans.find(key);
    if (hit != plans.end()) return hit->second;
  }
  auto plan = make_plan(x, k);
  std::lock_guard<std::mutex> lock(plans_mutex);
  if (plans.size() >= kMaxPlans) plans.clear();
  plans.emplace(key, plan);
  return plan;
}

// V rows [first, first + count) of the chunk starting at tile `base`: each tile's 6x6 input
// window (zeros outside the image and past C), transformed. Tiles past the last are zeros.
void transform_input(const Plan& p, const float* x, at::IntArrayRef xs, int64_t base, int64_t first,
                     int64_t count, float* v) {
  alignas(64) float window[kIn][kIn][kLanes];
  alignas(64) float rows[kIn][kIn][kLanes];
  const int64_t per_image = p.tiles_h * p.tiles_w;
  for (int64_t r = first; r < first + count; ++r) {
    const int64_t t = base + r;
    const int64_t n = t / per_image, i0 = (t % per_image) / p.tiles_w * kTile - 1,
                  j0 = t % p.tiles_w * kTile - 1;
    for (int64_t c0 = 0; c0 < p.cp; c0 += kLanes) {
      const int64_t lanes = std::min(kLanes, p.c - c0);
      // each pixel's lanes read in place; zeros outside the image; a copy padded with zeros
      // where the block passes C (no per-pixel copy in the common case: C a multiple of 16)
      const float* d[kIn][kIn];
      for (int64_t a = 0; a < kIn; ++a) {
        for (int64_t b = 0; b < kIn; ++b) {
          const int64_t i = i0 + a, j = j0 + b;
          if (t >= p.tiles || i < 0 || i >= p.h || j < 0 || j >= p.w) {
            d[a][b] = kZeros;
            continue;
          }
          const float* src = x + n * xs[0] + i * xs[2] + j * xs[3] + c0;
          if (lanes < kLanes) {
            for (int64_t c = 0; c < kLanes; ++c) window[a][b][c] = c < lanes ? src[c] : 0.f;
            src = window[a][b];
          }
          d[a][b] = src;
        }
      }
      for (int64_t b = 0; b < kIn; ++b) {  // down each column
        const float* column[kIn];
        float* o[kIn];
        for (int64_t a = 0; a < kIn; ++a) column[a] = d[a][b], o[a] = rows[a][b];
        input_line(column, o);
      }
      for (int64_t a = 0; a < kIn; ++a) {  // along each row, into V
        const float* d[kIn];
        float* o[kIn];
        for (int64_t b = 0; b < kIn; ++b) {
          d[b] = rows[a][b];
          o[b] = v + ((a * kIn + b) * p.chunk + r) * p.cp + c0;
        }
        input_line(d, o);
      }
    }
  }
}

// The chunk's M rows [first, first + count) back to 4x4 output tiles, + bias (+ residual),
// ReLU, written to out (rows past the last tile, and pixels past the image, are not written).
void transform_output(const Plan& p, const float* m, int64_t base, int64_t first, int64_t count,
                      const float* bias, const float* res, at::IntArrayRef rs, float* out,
                      at::IntArrayRef os, bool relu) {
  alignas(64) float cols[kTile][kIn][kLanes];
  alignas(64) float tile[kTile][kTile][kLanes];
  const int64_t per_image = p.tiles_h * p.tiles_w;
  for (int64_t r = first; r < first + count; ++r) {
    const int64_t t = base + r;
    if (t >= p.tiles) break;
    const int64_t n = t / per_image, i0 = (t % per_image) / p.tiles_w * kTile,
                  j0 = t % p.tiles_w * kTile;
    for (int64_t k0 = 0; k0 < p.kp; k0 += kLanes) {
      const int64_t lanes = std::min(kLanes, p.k - k0);
      for (int64_t b = 0; b < kIn; ++b) {
        const float* d[kIn];
        float* o[kTile];
        for (int64_t a = 0; a < kIn; ++a) d[a] = m + ((a * kIn + b) * p.chunk + r) * p.kp + k0;
        for (int64_t a = 0; a < kTile; ++a) o[a] = cols[a][b];
        output_line(d, o);
      }
      for (int64_t a = 0; a < kTile; ++a) {
        const float* d[kIn];
        float* o[kTile];
        for (int64_t b = 0; b < kIn; ++b) d[b] = cols[a][b];
        for (int64_t b = 0; b < kTile; ++b) o[b] = tile[a][b];
        output_line(d, o);
      }
      const float* bias_lanes = bias ? bias + k0 : kZeros;  // read only where lanes == 16
      for (int64_t a = 0; a < kTile && i0 + a < p.h; ++a) {
        for (int64_t b = 0; b < kTile && j0 + b < p.w; ++b) {
          const int64_t i = i0 + a, j = j0 + b;
          float* y = out + n * os[0] + i * os[2] + j * os[3] + k0 * os[1];
          const float* add = res ? res + n * rs[0] + i * rs[2] + j * rs[3] + k0 * rs[1] : nullptr;
          const float* value = tile[a][b];
          if (lanes == kLanes && os[1] == 1 && (!add || rs[1] == 1)) {  // the common case
            if (add) {
#pragma omp simd
              for (int64_t c = 0; c < kLanes; ++c) {
                const float s = value[c] + bias_lanes[c] + add[c];
                y[c] = relu && s < 0.f ? 0.f : s;  // NaN stays NaN, as torch.relu
              }
            } else {
#pragma omp simd
              for (int64_t c = 0; c < kLanes; ++c) {
                const float s = value[c] + bias_lanes[c];
                y[c] = relu && s < 0.f ? 0.f : s;
              }
            }
            continue;
          }
          // a block past K, or channels not innermost in out or the residual
          for (int64_t c = 0; c < lanes; ++c) {
            const float s = value[c] + (bias ? bias[k0 + c] : 0.f) + (add ? add[c * rs[1]] : 0.f);
            y[c * os[1]] = relu && s < 0.f ? 0.f : s;
          }
        }
      }
    }
  }
}

}  // namespace

bool winograd_applies(at::IntArrayRef w, at::IntArrayRef stride, at::IntArrayRef padding,
                      int64_t groups, at::ScalarType type) {
  return w.size() == 4 && w[2] == 3 && w[3] == 3 && stride.size() == 2 && stride[0] == 1 &&
         stride[1] == 1 && padding.size() == 2 && padding[0] == 1 && padding[1] == 1 &&
         groups == 1 && type == at::kFloat;
}

memory::desc winograd_weights_desc(at::IntArrayRef x_sizes, int64_t k) {
  return plan_for(x_sizes, k)->weights;
}

std::tuple<at::Tensor, memory::desc> winograd_pack(const at::Tensor& weight,
                                                   at::IntArrayRef x_sizes) {
  TORCH_CHECK(x_sizes.size() == 4 && x_sizes[1] == weight.size(1),
              "fastcnn winograd_pack: input sizes ", x_sizes, " do not fit the weight ",
              weight.sizes());
  auto plan = plan_for(x_sizes, weight.size(0));
  // U = G g G^T per (k, c), in float64 and rounded once to fp32 (G's sixths and 24ths are not
  // exact in fp32)
  auto g = at::tensor({1. / 4, 0., 0., -1. / 6, -1. / 6, -1. / 6, -1. / 6, 1. / 6, -1. / 6, 1. / 24,
                       1. / 12, 1. / 6, 1. / 24, -1. / 12, 1. / 6, 0., 0., 1.},
                      at::dtype(at::kDouble))
               .view({kIn, 3});
  auto u = at::einsum("ap,kcpq,bq->abck", {g, weight.to(at::kDouble), g})
               .reshape({kPoints, plan->c, plan->k});
  u = at::constant_pad_nd(u, {0, plan->kp - plan->k, 0, plan->cp - plan->c})
          .to(at::kFloat)
          .contiguous();
  auto packed = at::empty({static_cast<int64_t>(plan->weights.get_size())},
                          weight.options().dtype(at::kByte));
  auto& eng = onednn_engine();
  memory from(
      memory::desc({kPoints, plan->cp, plan->kp}, memory::data_type::f32, memory::format_tag::abc),
      eng, u.data_ptr());
  memory to(plan->weights, eng, packed.data_ptr());
  auto& stream = onednn_thread_stream();
  dnnl::reorder(from, to).execute(stream, from, to);
  stream.wait();
  return {packed, plan->weights};
}

bool winograd_conv(const at::Tensor& x, const at::Tensor& packed, const memory::desc& packed_layout,
                   at::IntArrayRef w, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& residual, const at::Tensor& out, bool relu) {
  if (x.stride(1) != 1) return false;
  auto plan = plan_for(x.sizes(), w[0]);
  const Plan& p = *plan;
  // the layout it was packed in must be this plan's (another thread count or batch size may
  // make oneDNN pick another blocking, possibly of the same size)
  TORCH_CHECK(
      p.weights == packed_layout && static_cast<size_t>(packed.numel()) == p.weights.get_size(),
      "fastcnn winograd_conv: the packed weight is not in this conv's layout (packed for "
      "another conv, batch size or thread count)");
  const int64_t v_floats = kPoints * p.chunk * p.cp, m_floats = kPoints * p.chunk * p.kp;
  auto* v = static_cast<float*>(
      thread_buffer<ThreadBuffer::kWinograd>((v_floats + m_floats) * sizeof(float)));
  float* m = v + v_floats;  // v_floats is a multiple of 16: m stays 64-byte aligned
  auto& eng = onednn_engine();
  std::unordered_map<int, memory> args = {
      {DNNL_ARG_SRC, memory(p.src, eng, v)},
      {DNNL_ARG_WEIGHTS, memory(p.weights, eng, packed.data_ptr())},
      {DNNL_ARG_DST, memory(p.dst, eng, m)}};
  if (p.scratchpad.get_size() > 0) {
    args.emplace(DNNL_ARG_SCRATCHPAD,
                 memory(p.scratchpad, eng,
                        thread_buffer<ThreadBuffer::kOnednnScratchpad>(p.scratchpad.get_size())));
  }
  const float* xp = x.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual ? residual->data_ptr<float>() : nullptr;
  const auto rs = residual ? residual->strides() : out.strides();
  float* op = out.data_ptr<float>();
  auto& stream = onednn_thread_stream();
  for (int64_t chunk = 0; chunk < p.chunks; ++chunk) {
    const int64_t base = chunk * p.chunk;
    at::parallel_for(0, p.chunk, 1, [&](int64_t begin, int64_t end) {
      transform_input(p, xp, x.strides(), base, begin, end - begin, v);
    });
    p.matmul->execute(stream, args);
    stream.wait();
    at::parallel_for(0, p.chunk, 1, [&](int64_t begin, int64_t end) {
      transform_output(p, m, base, begin, end - begin, bp, rp, rs, op, out.strides(), relu);
    });
  }
  return true;
}

}  // namespace fastcnn

#endif  // FASTCNN_WITH_ONEDNN
