// spo_kernels._cpu: the Python bindings of the cpu backend's ops (ops.h; the contract is
// spo_kernels/backends/base.py). Every op releases the GIL while it runs.
//
// ATen + torch's pybind11 casters only (not all of torch/extension.h): half the compile time.
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "spo_kernels cpu backend: fused log-prob kernels for the logits and fused-linear paths";
  m.def("logits_forward", &spo_cpu::logits_forward, "logits path forward -> (seq_logps [S] float64, lse [Nc])",
        py::arg("logits"), py::arg("token_idx"), py::arg("targets"), py::arg("seq_offsets"), py::arg("softcap"),
        py::arg("temperature"), py::call_guard<py::gil_scoped_release>());
  m.def("logits_backward", &spo_cpu::logits_backward, "logits path backward, writes dlogits into out",
        py::arg("logits"), py::arg("token_idx"), py::arg("targets"), py::arg("seq_id"), py::arg("lse"),
        py::arg("grad_seq"), py::arg("softcap"), py::arg("temperature"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_forward", &spo_cpu::linear_forward, "fused-linear forward -> (seq_logps [S] float64, lse [Nc])",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("token_idx"), py::arg("targets"),
        py::arg("seq_offsets"), py::arg("softcap"), py::arg("temperature"), py::arg("block_bytes"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_backward", &spo_cpu::linear_backward, "fused-linear backward -> (dhidden, dweight, dbias)",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("token_idx"), py::arg("targets"),
        py::arg("seq_id"), py::arg("lse"), py::arg("grad_seq"), py::arg("softcap"), py::arg("temperature"),
        py::arg("need_hidden"), py::arg("need_weight"), py::arg("need_bias"), py::arg("block_bytes"),
        py::arg("bf16_grad_gemms"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_forward_frozen", &spo_cpu::linear_forward_frozen,
        "fused-linear forward for a frozen head -> (seq_logps [S], lse [Nc], (onehot - softmax) @ W [Nc, H])",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("token_idx"), py::arg("targets"),
        py::arg("seq_offsets"), py::arg("softcap"), py::arg("temperature"), py::arg("block_bytes"),
        py::call_guard<py::gil_scoped_release>());
  m.def("isa", &spo_cpu::isa, "the instruction-set variant of the row kernels in use");
  m.def("set_isa", &spo_cpu::set_isa, py::arg("isa"),
        "pin the row kernels to 'generic', 'avx2' or 'avx512' (False if this CPU lacks it), or 'auto'");
  m.def("num_threads", []() { return at::get_num_threads(); }, "intra-op threads (torch.get_num_threads)");
}
