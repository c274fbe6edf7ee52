// kiln's own oneDNN convolutions, built by onednn.py against the oneDNN of the onednn-devel-cpu-gomp wheel: each
// layer's primitive is created once per input shape, with its weights reordered into the layout the primitive
// chose, its bias, and its residual sum and activation as post-ops; a call only wraps the activations' pointers
// and executes. Activations and weights are fp32, or bf16 (fp32 accumulation and bias). (Torch's oneDNN builds the
// primitive's descriptor on every call: 20-22 us, against 1-2 here.)
#include <oneapi/dnnl/dnnl.hpp>

#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

using namespace dnnl;

static engine& cpu_engine() {
  static engine instance(engine::kind::cpu, 0);
  return instance;
}

// A stream per thread: concurrent runs of one engine execute on streams of their own
static stream& cpu_stream() {
  thread_local stream instance(cpu_engine());
  return instance;
}

struct ConvSpec {
  int64_t n, c, h, w;                    // input, NHWC in memory
  int64_t oc, oh, ow, groups;
  int64_t kh, kw, sh, sw, pt, pl, pb, pr, dh, dw;
  int64_t activation;                    // below: ACT_*
  float alpha, beta;                     // the activation's parameters
  int64_t residual;                      // 1: a sum post-op adds the destination's contents (the residual) first
  int64_t ldy;                           // elements from one output pixel to the next: oc, or more in a slice
  int64_t bf16;                          // 1: bf16 activations and weights (fp32 accumulation and bias), else fp32
};

enum { ACT_NONE, ACT_RELU, ACT_LEAKY_RELU, ACT_CLIP, ACT_SIGMOID, ACT_TANH, ACT_HARDSWISH, ACT_SILU, ACT_GELU_ERF,
       ACT_GELU_TANH };

// The memory objects a call binds its pointers to, made once per convolution and thread (making them on every call
// cost about 1.2 of its 2.9 us, on a 16-channel 4x4 input)
struct Bound { memory src, dst, scratch; };

struct Convolution {
  convolution_forward primitive;
  memory::desc src, dst, scratchpad;
  memory weights, bias;
  int64_t pixels, oc, ldy;  // ldy > oc: the primitive writes dense pixels, copied out to the wider buffer's slice
  int64_t element;          // bytes an activation element takes: 4 (fp32) or 2 (bf16)
  std::mutex lock;          // guards `bound`, which runs on several threads add to
  std::unordered_map<std::thread::id, Bound> bound;
};

static Bound& bound(Convolution& conv) {
  std::lock_guard<std::mutex> guard(conv.lock);
  auto found = conv.bound.find(std::this_thread::get_id());
  if (found == conv.bound.end()) {
    found = conv.bound.emplace(std::this_thread::get_id(),
                               Bound{memory(conv.src, cpu_engine(), DNNL_MEMORY_NONE),
                                     memory(conv.dst, cpu_engine(), DNNL_MEMORY_NONE),
                                     memory(conv.scratchpad, cpu_engine(), DNNL_MEMORY_NONE)}).first;
  }
  return found->second;  // an element of an unordered_map stays where it is while others are added
}

// A dense output for a primitive whose destination is a slice that no optimized kernel writes, one per thread
static char* thread_dense_output(size_t bytes) {
  thread_local std::vector<char> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// The primitives' scratch space, one per thread: oneDNN's own (library-managed) scratchpad is shared by every
// execution of a primitive, so two runs of one engine at once would overwrite each other's
static void* thread_scratchpad(size_t bytes) {
  thread_local std::vector<char> buffer;
  if (buffer.size() < bytes + 64) buffer.resize(bytes + 64);
  const uintptr_t start = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<void*>((start + 63) & ~uintptr_t(63));
}

static void append_activation(post_ops& ops, int64_t activation, float alpha, float beta) {
  switch (activation) {
    case ACT_RELU: ops.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f); break;
    case ACT_LEAKY_RELU: ops.append_eltwise(algorithm::eltwise_relu, alpha, 0.f); break;
    case ACT_CLIP: ops.append_eltwise(algorithm::eltwise_clip, alpha, beta); break;
    case ACT_SIGMOID: ops.append_eltwise(algorithm::eltwise_logistic, 0.f, 0.f); break;
    case ACT_TANH: ops.append_eltwise(algorithm::eltwise_tanh, 0.f, 0.f); break;
    case ACT_HARDSWISH: ops.append_eltwise(algorithm::eltwise_hardswish, alpha, beta); break;
    case ACT_SILU: ops.append_eltwise(algorithm::eltwise_swish, 1.f, 0.f); break;
    case ACT_GELU_ERF: ops.append_eltwise(algorithm::eltwise_gelu_erf, 0.f, 0.f); break;
    case ACT_GELU_TANH: ops.append_eltwise(algorithm::eltwise_gelu_tanh, 0.f, 0.f); break;
    default: break;
  }
}

// The primitive for `s`, weights [oc, c / groups, kh, kw] and bias [oc] (fp32, read once: the primitive keeps its
// own reordered copy, rounded to bf16 in a bf16 one), or null with the reason in `error`.
extern "C" void* kiln_onednn_conv_create(const ConvSpec* spec, const float* weight, const float* bias, char* error,
                                         int64_t error_size) {
  const ConvSpec& s = *spec;
  try {
    using dt = memory::data_type;
    using tag = memory::format_tag;
    const dt activations = s.bf16 ? dt::bf16 : dt::f32;
    const memory::desc src({s.n, s.c, s.h, s.w}, activations, tag::nhwc);
    const memory::desc dense({s.n, s.oc, s.oh, s.ow}, activations, tag::nhwc);
    memory::desc dst({s.n, s.oc, s.oh, s.ow}, activations, {s.oh * s.ow * s.ldy, 1, s.ow * s.ldy, s.ldy});
    const memory::desc bias_desc({s.oc}, dt::f32, tag::a);
    const bool grouped = s.groups > 1;
    const memory::dims weight_dims = grouped ? memory::dims{s.groups, s.oc / s.groups, s.c / s.groups, s.kh, s.kw}
                                             : memory::dims{s.oc, s.c, s.kh, s.kw};
    const memory::desc user_weights(weight_dims, dt::f32, grouped ? tag::goihw : tag::oihw);
    const memory::desc any_weights(weight_dims, activations, tag::any);
    post_ops ops;
    if (s.residual) ops.append_sum(1.f);
    append_activation(ops, s.activation, s.alpha, s.beta);
    primitive_attr attr;
    attr.set_post_ops(ops);
    attr.set_scratchpad_mode(scratchpad_mode::user);
    auto describe = [&](const memory::desc& output) {
      return convolution_forward::primitive_desc(cpu_engine(), prop_kind::forward_inference, algorithm::convolution_direct,
                                                 src, any_weights, bias_desc, output, {s.sh, s.sw}, {s.dh - 1, s.dw - 1},
                                                 {s.pt, s.pl}, {s.pb, s.pr}, attr);
    };
    convolution_forward::primitive_desc descriptor = describe(dst);
    const bool slice = s.ldy != s.oc;
    if (slice && std::string(descriptor.impl_info_str()).rfind("ref", 0) == 0) {  // no optimized kernel writes this slice
      dst = dense;
      descriptor = describe(dst);
    }
    // oneDNN falls back to a reference kernel where none of its optimized ones takes a layer (an NCHW 3-channel
    // input took one 1.8 s): torch's call runs such a layer instead
    const std::string kernel = descriptor.impl_info_str();
    if (kernel.rfind("ref", 0) == 0) {
      std::snprintf(error, error_size, "only a reference kernel (%s) runs it", kernel.c_str());
      return nullptr;
    }
    auto* conv = new Convolution{convolution_forward(descriptor), src, dst, descriptor.scratchpad_desc(),
                                 memory(descriptor.weights_desc(), cpu_engine()), memory(bias_desc, cpu_engine()),
                                 s.n * s.oh * s.ow, s.oc, dst == dense ? s.ldy : s.oc, s.bf16 ? 2 : 4};
    memory given(user_weights, cpu_engine(), const_cast<float*>(weight));
    reorder(given, conv->weights).execute(cpu_stream(), given, conv->weights);
    std::memcpy(conv->bias.get_data_handle(), bias, s.oc * sizeof(float));
    cpu_stream().wait();
    return conv;
  } catch (const dnnl::error& e) {
    std::snprintf(error, error_size, "%s (status %d)", e.what(), static_cast<int>(e.status));
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
  }
  return nullptr;
}

extern "C" void kiln_onednn_conv_destroy(void* conv) { delete static_cast<Convolution*>(conv); }

// A launch (native.py's convention: the arguments, then the thread count; oneDNN takes its own from OpenMP):
// y = activation(conv(x) + bias [+ y: the residual, summed in its own buffer]).
struct OnednnConvArgs { const void* x; void* y; void* conv; };

extern "C" void kiln_onednn_conv(const OnednnConvArgs* args, int64_t threads) {
  Convolution& conv = *static_cast<Convolution*>(args->conv);
  const bool copy_out = conv.ldy != conv.oc;
  char* const dense = copy_out ? thread_dense_output(conv.pixels * conv.oc * conv.element) : nullptr;
  Bound& b = bound(conv);
  b.src.set_data_handle(const_cast<void*>(args->x));
  b.dst.set_data_handle(copy_out ? dense : args->y);
  b.scratch.set_data_handle(thread_scratchpad(conv.scratchpad.get_size()));
  const dnnl_exec_arg_t bindings[] = {{DNNL_ARG_SRC, b.src.get()}, {DNNL_ARG_WEIGHTS, conv.weights.get()},
                                      {DNNL_ARG_BIAS, conv.bias.get()}, {DNNL_ARG_DST, b.dst.get()},
                                      {DNNL_ARG_SCRATCHPAD, b.scratch.get()}};
  error::wrap_c_api(dnnl_primitive_execute(conv.primitive.get(), cpu_stream().get(), 5, bindings),
                    "could not execute a convolution");
  if (copy_out) {
    char* const y = static_cast<char*>(args->y);
    const int64_t row = conv.oc * conv.element;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < conv.pixels; ++p) std::memcpy(y + p * conv.ldy * conv.element, dense + p * row, row);
  }
}
