// spo_kernels._cpu: the Python bindings of the cpu backend's ops (ops.h; the contract is
// spo_kernels/backends/base.py). Every op releases the GIL while it runs.
//
// Arguments shared by the ops: the plan (token_idx [nc], targets [nc], seq_offsets [S+1] or
// seq_id [nc], token_weights [nc] or None) and the transform (multiplier, softcap <= 0 for none,
// temperature). `stats`: also return the per-token statistics [4, nc] (entropy, log sum p^2, mean
// logit, is_argmax), else None in their place.
//
// ATen + torch's pybind11 casters only (not all of torch/extension.h): half the compile time.
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using py::arg;
  m.doc() = "spo_kernels cpu backend: fused log-prob kernels for the logits and fused-linear paths";
  m.def("logits_forward", &spo_cpu::logits_forward,
        "logits path forward -> (seq_logps [S] float64, lse [nc], stats [4, nc] or None)", arg("logits"),
        arg("token_idx"), arg("targets"), arg("seq_offsets"), arg("token_weights"), arg("multiplier"),
        arg("softcap"), arg("temperature"), arg("stats"), py::call_guard<py::gil_scoped_release>());
  m.def("logits_backward", &spo_cpu::logits_backward, "logits path backward, writes dlogits into out",
        arg("logits"), arg("token_idx"), arg("targets"), arg("seq_id"), arg("token_weights"), arg("lse"),
        arg("grad_seq"), arg("multiplier"), arg("softcap"), arg("temperature"), arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_forward", &spo_cpu::linear_forward,
        "fused-linear forward -> (seq_logps [S] float64, lse [nc], stats [4, nc] or None)", arg("hidden"),
        arg("weight"), arg("bias"), arg("token_idx"), arg("targets"), arg("seq_offsets"), arg("token_weights"),
        arg("multiplier"), arg("softcap"), arg("temperature"), arg("stats"), arg("block_bytes"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_backward", &spo_cpu::linear_backward, "fused-linear backward -> (dhidden, dweight, dbias)",
        arg("hidden"), arg("weight"), arg("bias"), arg("token_idx"), arg("targets"), arg("seq_id"),
        arg("token_weights"), arg("lse"), arg("grad_seq"), arg("multiplier"), arg("softcap"), arg("temperature"),
        arg("need_hidden"), arg("need_weight"), arg("need_bias"), arg("block_bytes"), arg("bf16_grad_gemms"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_forward_frozen", &spo_cpu::linear_forward_frozen,
        "fused-linear forward for a frozen head -> (seq_logps [S], lse [nc], stats [4, nc] or None, "
        "w_t (onehot - softmax) @ W [nc, H])",
        arg("hidden"), arg("weight"), arg("bias"), arg("token_idx"), arg("targets"), arg("seq_offsets"),
        arg("token_weights"), arg("multiplier"), arg("softcap"), arg("temperature"), arg("stats"),
        arg("block_bytes"), py::call_guard<py::gil_scoped_release>());
  m.def("isa", &spo_cpu::isa, "the instruction-set variant of the row kernels in use");
  m.def("set_isa", &spo_cpu::set_isa, arg("isa"),
        "pin the row kernels to 'generic', 'avx2' or 'avx512' (False if this CPU lacks it), or 'auto'");
  m.def("num_threads", []() { return at::get_num_threads(); }, "intra-op threads (torch.get_num_threads)");
}
