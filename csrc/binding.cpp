// Torch binding of the memtrain kernels (the extension module `memtrain_kernels`): tensor checks, output and
// workspace allocation (through torch's caching allocator), the current CUDA stream, and the calls of the
// launchers in fast_weight/ and rel_attention/.  Python wrappers with autograd live in pretrain/ops/.
//
// Compiled with MT_EMULATE (tests only: pretrain/ops/kernels.py load_emulator) the same binding takes CPU
// tensors and runs the kernels in the CPU block emulator of common/emulate.h.
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#ifndef MT_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "fast_weight/fast_weight.h"
#include "rel_attention/rel_attention.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#ifdef MT_EMULATE
constexpr bool kEmulated = true;
void* stream_of(const Tensor&) { return nullptr; }
#define MT_DEVICE_GUARD(t) (void)0
#else
constexpr bool kEmulated = false;
void* stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }
#define MT_DEVICE_GUARD(t) const c10::cuda::OptionalCUDAGuard device_guard_(at::device_of(t))
#endif

void check_tensor(const Tensor& t, const char* op, const char* name) {
#ifdef MT_EMULATE
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (emulated kernels)");
#else
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
#endif
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_same_device(const Tensor& a, const Tensor& b, const char* op, const char* name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name, " is on ", b.device(), ", expected ", a.device());
}

mt::DType dtype_of(const Tensor& t, const char* op, const char* name) {
  if (t.scalar_type() == at::kFloat) return mt::DType::kFloat32;
  if (t.scalar_type() == at::kBFloat16) return mt::DType::kBFloat16;
  TORCH_CHECK(false, op, ": ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  return mt::DType::kFloat32;
}

void check_shape(const Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape);
}

void check_f32(const Tensor& t, at::IntArrayRef shape, const Tensor& ref, const char* op, const char* name) {
  check_tensor(t, op, name);
  check_same_device(ref, t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  check_shape(t, shape, op, name);
}

float* f32_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// Debugging switch (set_poison): fill every output and workspace with NaN when it is allocated, so that an
// element no kernel writes shows up as NaN (the tests turn it on).
bool g_poison = false;

Tensor alloc(at::IntArrayRef shape, const at::TensorOptions& options) {
  Tensor t = at::empty(shape, options);
  if (g_poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

Tensor workspace(int64_t n, const Tensor& like) { return alloc({n > 0 ? n : 1}, like.options().dtype(at::kFloat)); }

// ------------------------------------------------------------------------------------------------------
// fast weights

struct FwInputs {
  mt::FwShape shape;
  int64_t B, H;
};

FwInputs fw_check(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& beta,
                  const OptTensor& s0, double scale, int64_t chunk) {
  check_tensor(q, op, "q");
  check_tensor(k, op, "k");
  check_tensor(v, op, "v");
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, T, Dk], got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Dk = q.size(3);
  TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == H && v.size(2) == T, op, ": v must be [", B, ", ", H,
              ", ", T, ", Dv], got ", v.sizes());
  const int64_t Dv = v.size(3);
  check_shape(k, q.sizes(), op, "k");
  check_same_device(q, k, op, "k");
  check_same_device(q, v, op, "v");
  const mt::DType dt = dtype_of(q, op, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have the same dtype");
  TORCH_CHECK(T >= 1 && Dk >= 1 && Dk <= 256 && Dv >= 1 && Dv <= 256, op,
              ": T >= 1 and head sizes 1..256 are supported, got T=", T, ", Dk=", Dk, ", Dv=", Dv);
  TORCH_CHECK(chunk == 32 || chunk == 64, op, ": chunk_size must be 32 or 64, got ", chunk);
  TORCH_CHECK(B * H <= 65535, op, ": at most 65535 (batch x heads) rows, got ", B * H);
  if (beta.has_value()) check_f32(*beta, {B, H, T}, q, op, "beta");
  if (s0.has_value()) check_f32(*s0, {B, H, Dk, Dv}, q, op, "initial_state");
  FwInputs in;
  in.B = B;
  in.H = H;
  in.shape = mt::FwShape{static_cast<int>(B * H), static_cast<int>(T), static_cast<int>(Dk), static_cast<int>(Dv),
                         static_cast<int>(chunk), beta.has_value(), dt, static_cast<float>(scale)};
  return in;
}

// (o [B, H, T, Dv] in v's dtype, final state [B, H, Dk, Dv] fp32 or None).  Delta rule when beta is given,
// else sum rule.
std::vector<Tensor> fw_forward(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& beta,
                               const OptTensor& s0, double scale, int64_t chunk, bool want_final) {
  const char* op = "fast_weight_forward";
  MT_DEVICE_GUARD(q);
  const FwInputs in = fw_check(op, q, k, v, beta, s0, scale, chunk);
  const mt::FwShape& s = in.shape;
  const mt::FwWorkspace ws = mt::fw_workspace_sizes(s, false);
  Tensor o = alloc(v.sizes(), v.options());
  Tensor fin = want_final ? alloc({in.B, in.H, s.Dk, s.Dv}, q.options().dtype(at::kFloat)) : Tensor();
  Tensor ws_w = workspace(ws.w, q), ws_u = workspace(ws.u, q), ws_p = workspace(ws.p, q);
  mt::FwForwardArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.beta = f32_ptr(beta);
  a.s0 = f32_ptr(s0);
  a.o = o.data_ptr();
  a.final_state = want_final ? fin.data_ptr<float>() : nullptr;
  a.ws_w = ws_w.data_ptr<float>();
  a.ws_u = ws_u.data_ptr<float>();
  a.ws_p = ws_p.data_ptr<float>();
  const std::string err = mt::fw_forward(s, a, stream_of(q));
  TORCH_CHECK(err.empty(), op, ": ", err);
  return {o, fin};
}

// (dq, dk, dv, dbeta or None, d_initial_state or None), all fp32.
std::vector<Tensor> fw_backward(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& beta,
                                const OptTensor& s0, const Tensor& d_o, const OptTensor& d_final, double scale,
                                int64_t chunk, bool want_ds0) {
  const char* op = "fast_weight_backward";
  MT_DEVICE_GUARD(q);
  const FwInputs in = fw_check(op, q, k, v, beta, s0, scale, chunk);
  const mt::FwShape& s = in.shape;
  check_tensor(d_o, op, "grad_o");
  check_shape(d_o, v.sizes(), op, "grad_o");
  TORCH_CHECK(d_o.scalar_type() == v.scalar_type(), op, ": grad_o must have v's dtype");
  if (d_final.has_value()) check_f32(*d_final, {in.B, in.H, s.Dk, s.Dv}, q, op, "grad_final_state");
  const mt::FwWorkspace ws = mt::fw_workspace_sizes(s, true);
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor dq = alloc(q.sizes(), f32), dk = alloc(k.sizes(), f32);
  Tensor dv = s.delta ? alloc(v.sizes(), f32) : Tensor();
  Tensor dbeta = s.delta ? alloc({in.B, in.H, s.T}, f32) : Tensor();
  Tensor ds0 = want_ds0 ? alloc({in.B, in.H, s.Dk, s.Dv}, f32) : Tensor();
  Tensor ws_w = workspace(ws.w, q), ws_u = workspace(ws.u, q), ws_p = workspace(ws.p, q), ws_t = workspace(ws.t, q);
  Tensor ws_states = workspace(ws.states, q), ws_vnew = workspace(ws.vnew, q);
  Tensor ws_dstates = workspace(ws.dstates, q), ws_du = workspace(ws.du, q);
  mt::FwBackwardArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.d_o = d_o.data_ptr();
  a.beta = f32_ptr(beta);
  a.s0 = f32_ptr(s0);
  a.d_final = f32_ptr(d_final);
  a.dq = dq.data_ptr<float>();
  a.dk = dk.data_ptr<float>();
  a.dv = s.delta ? dv.data_ptr<float>() : nullptr;
  a.dbeta = s.delta ? dbeta.data_ptr<float>() : nullptr;
  a.ds0 = want_ds0 ? ds0.data_ptr<float>() : nullptr;
  a.ws_w = ws_w.data_ptr<float>();
  a.ws_u = ws_u.data_ptr<float>();
  a.ws_p = ws_p.data_ptr<float>();
  a.ws_t = ws_t.data_ptr<float>();
  a.ws_states = ws_states.data_ptr<float>();
  a.ws_vnew = ws_vnew.data_ptr<float>();
  a.ws_dstates = ws_dstates.data_ptr<float>();
  a.ws_du = ws_du.data_ptr<float>();
  const std::string err = mt::fw_backward(s, a, stream_of(q));
  TORCH_CHECK(err.empty(), op, ": ", err);
  if (!s.delta) {  // sum rule: dV = dU (the time axis of the workspace is padded to whole chunks)
    const int64_t Tp = ws.du / (static_cast<int64_t>(s.BH) * s.Dv);
    dv = ws_du.narrow(0, 0, ws.du).view({in.B, in.H, Tp, s.Dv}).narrow(2, 0, s.T).contiguous();
  }
  return {dq, dk, dv, dbeta, ds0};
}

// ------------------------------------------------------------------------------------------------------
// relative attention

struct RaInputs {
  mt::RelAttnShape shape;
  mt::RelAttnMaskArgs mask;
};

const int* int_ptr(const OptTensor& t, at::IntArrayRef shape, const Tensor& ref, const char* op, const char* name) {
  if (!t.has_value()) return nullptr;
  check_tensor(*t, op, name);
  check_same_device(ref, *t, op, name);
  TORCH_CHECK(t->scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t->scalar_type());
  check_shape(*t, shape, op, name);
  return t->data_ptr<int>();
}

RaInputs ra_check(const char* op, const Tensor& qu, const Tensor& qv, const Tensor& k, const Tensor& v,
                  const Tensor& r, const OptTensor& key_start, const OptTensor& q_doc, const OptTensor& k_doc,
                  int64_t r_offset, int64_t q_start, int64_t order, int64_t window) {
  const char* names[] = {"qu", "qv", "k", "v", "r"};
  const Tensor* ts[] = {&qu, &qv, &k, &v, &r};
  for (int i = 0; i < 5; ++i) {
    check_tensor(*ts[i], op, names[i]);
    check_same_device(qu, *ts[i], op, names[i]);
    TORCH_CHECK(ts[i]->scalar_type() == qu.scalar_type(), op, ": ", names[i], " must have qu's dtype ",
                qu.scalar_type());
  }
  TORCH_CHECK(qu.dim() == 4, op, ": qu must be [H, B, R, D], got ", qu.sizes());
  const int64_t H = qu.size(0), B = qu.size(1), R = qu.size(2), D = qu.size(3);
  check_shape(qv, qu.sizes(), op, "qv");
  TORCH_CHECK(k.dim() == 4 && k.size(0) == H && k.size(1) == B && k.size(3) == D, op, ": k must be [", H, ", ", B,
              ", C, ", D, "], got ", k.sizes());
  check_shape(v, k.sizes(), op, "v");
  TORCH_CHECK(r.dim() == 3 && r.size(0) == H && r.size(2) == D, op, ": r must be [", H, ", P, ", D, "], got ",
              r.sizes());
  TORCH_CHECK(D >= 1 && D <= mt::kRelAttnMaxHead, op, ": head size ", D, " is outside 1..", mt::kRelAttnMaxHead);
  TORCH_CHECK(order >= 0 && order <= 2, op, ": order must be 0 (none), 1 (past) or 2 (future)");
  TORCH_CHECK(q_doc.has_value() == k_doc.has_value(), op, ": q_doc and k_doc go together");
  TORCH_CHECK(H <= 65535 && B <= 65535, op, ": at most 65535 heads and batch rows");
  const int64_t Ck = k.size(2);
  RaInputs in;
  in.shape = mt::RelAttnShape{static_cast<int>(H), static_cast<int>(B), static_cast<int>(R), static_cast<int>(Ck),
                              static_cast<int>(r.size(1)), static_cast<int>(D), static_cast<int>(r_offset),
                              static_cast<int>(q_start), static_cast<mt::Order>(order), static_cast<int>(window),
                              dtype_of(qu, op, "qu")};
  in.mask.key_start = int_ptr(key_start, {B}, qu, op, "key_start");
  in.mask.q_doc = int_ptr(q_doc, {B, R}, qu, op, "q_doc");
  in.mask.k_doc = int_ptr(k_doc, {B, Ck}, qu, op, "k_doc");
  return in;
}

// (o [H, B, R, D] in qu's dtype, lse [H, B, R] fp32)
std::vector<Tensor> ra_forward(const Tensor& qu, const Tensor& qv, const Tensor& k, const Tensor& v, const Tensor& r,
                               const OptTensor& key_start, const OptTensor& q_doc, const OptTensor& k_doc,
                               int64_t r_offset, int64_t q_start, int64_t order, int64_t window) {
  const char* op = "rel_attention_forward";
  MT_DEVICE_GUARD(qu);
  const RaInputs in = ra_check(op, qu, qv, k, v, r, key_start, q_doc, k_doc, r_offset, q_start, order, window);
  Tensor o = alloc(qu.sizes(), qu.options());
  Tensor lse = alloc({qu.size(0), qu.size(1), qu.size(2)}, qu.options().dtype(at::kFloat));
  mt::RelAttnForwardArgs a{};
  a.qu = qu.data_ptr();
  a.qv = qv.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.r = r.data_ptr();
  a.mask = in.mask;
  a.o = o.data_ptr();
  a.lse = lse.data_ptr<float>();
  const std::string err = mt::rel_attn_forward(in.shape, a, stream_of(qu));
  TORCH_CHECK(err.empty(), op, ": ", err);
  return {o, lse};
}

// (dqu, dqv, dk, dv, dr), fp32
std::vector<Tensor> ra_backward(const Tensor& qu, const Tensor& qv, const Tensor& k, const Tensor& v, const Tensor& r,
                                const Tensor& d_o, const Tensor& lse, const Tensor& dl, const OptTensor& key_start,
                                const OptTensor& q_doc, const OptTensor& k_doc, int64_t r_offset, int64_t q_start,
                                int64_t order, int64_t window) {
  const char* op = "rel_attention_backward";
  MT_DEVICE_GUARD(qu);
  const RaInputs in = ra_check(op, qu, qv, k, v, r, key_start, q_doc, k_doc, r_offset, q_start, order, window);
  check_tensor(d_o, op, "grad_o");
  check_shape(d_o, qu.sizes(), op, "grad_o");
  TORCH_CHECK(d_o.scalar_type() == qu.scalar_type(), op, ": grad_o must have qu's dtype");
  const std::vector<int64_t> rows{qu.size(0), qu.size(1), qu.size(2)};
  check_f32(lse, rows, qu, op, "lse");
  check_f32(dl, rows, qu, op, "dl");
  const auto f32 = qu.options().dtype(at::kFloat);
  Tensor dqu = alloc(qu.sizes(), f32), dqv = alloc(qu.sizes(), f32);
  Tensor dk = alloc(k.sizes(), f32), dv = alloc(v.sizes(), f32), dr = at::zeros(r.sizes(), f32);
  mt::RelAttnBackwardArgs a{};
  a.qu = qu.data_ptr();
  a.qv = qv.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.r = r.data_ptr();
  a.d_o = d_o.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.dl = dl.data_ptr<float>();
  a.mask = in.mask;
  a.dqu = dqu.data_ptr<float>();
  a.dqv = dqv.data_ptr<float>();
  a.dk = dk.data_ptr<float>();
  a.dv = dv.data_ptr<float>();
  a.dr = dr.data_ptr<float>();
  const std::string err = mt::rel_attn_backward(in.shape, a, stream_of(qu));
  TORCH_CHECK(err.empty(), op, ": ", err);
  return {dqu, dqv, dk, dv, dr};
}

bool set_poison(bool flag) {
  const bool prev = g_poison;
  g_poison = flag;
  return prev;
}

py::dict info() {
  py::dict d;
  d["emulated"] = kEmulated;
  d["fast_weight_chunk_sizes"] = std::vector<int>{32, 64};
  d["fast_weight_max_head"] = 256;
  d["rel_attention_max_head"] = mt::kRelAttnMaxHead;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memtrain fused kernels: chunkwise delta/sum rule and Transformer-XL relative attention";
  m.def("fast_weight_forward", &fw_forward, "chunkwise delta rule (beta given) or sum rule, forward", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("beta"), py::arg("initial_state"), py::arg("scale"),
        py::arg("chunk_size"), py::arg("output_final_state"));
  m.def("fast_weight_backward", &fw_backward, "chunkwise delta rule or sum rule, backward", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("beta"), py::arg("initial_state"), py::arg("grad_o"),
        py::arg("grad_final_state"), py::arg("scale"), py::arg("chunk_size"), py::arg("want_initial_grad"));
  m.def("rel_attention_forward", &ra_forward, "relative-position attention, forward", py::arg("qu"), py::arg("qv"),
        py::arg("k"), py::arg("v"), py::arg("r"), py::arg("key_start"), py::arg("q_doc"), py::arg("k_doc"),
        py::arg("r_offset"), py::arg("q_start"), py::arg("order"), py::arg("window"));
  m.def("rel_attention_backward", &ra_backward, "relative-position attention, backward", py::arg("qu"),
        py::arg("qv"), py::arg("k"), py::arg("v"), py::arg("r"), py::arg("grad_o"), py::arg("lse"), py::arg("dl"),
        py::arg("key_start"), py::arg("q_doc"), py::arg("k_doc"), py::arg("r_offset"), py::arg("q_start"),
        py::arg("order"), py::arg("window"));
  m.def("info", &info, "how the module was built");
  m.def("set_poison", &set_poison, "fill outputs and workspaces with NaN when allocated (debugging); returns the "
        "previous setting", py::arg("flag"));
}
