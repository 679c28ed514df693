"""Build script. Metadata lives in pyproject.toml; this file only adds the optional C++ extension.

``spo_kernels._cpu`` (the ``cpu`` backend, sources in csrc/) is built with
torch.utils.cpp_extension when torch is importable at build time (``pip install
--no-build-isolation``) and a C++ compiler works. Otherwise, or if compiling fails, the package
installs without it (pure Python + Triton; CPU tensors then use the ``torch`` backend) and a
warning says why. Set ``SPO_KERNELS_BUILD_CPU=0`` to skip the extension.
"""

import os
import sys

from setuptools import setup

EXT_NAME = "spo_kernels._cpu"
SOURCES = [
    "csrc/bindings.cpp",
    "csrc/checks.cpp",
    "csrc/isa.cpp",
    "csrc/token_state.cpp",
    "csrc/logits.cpp",
    "csrc/linear.cpp",
    "csrc/linear_frozen.cpp",
    "csrc/row_kernels_generic.cpp",
    "csrc/row_kernels_avx2.cpp",
    "csrc/row_kernels_avx512.cpp",
]
HEADERS = ["csrc/checks.h", "csrc/ops.h", "csrc/linear_blocks.h", "csrc/row_kernels.h", "csrc/row_kernels_api.h"]  # rebuild triggers; shipped in sdists


def _warn(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (spo-kernels): {msg}\nThe package is installed without the C++ extension "
          f"{EXT_NAME}; the 'cpu' backend is unavailable and CPU tensors use the 'torch' backend.\n{bar}\n",
          file=sys.stderr, flush=True)


def _extension_setup():
    """(ext_modules, cmdclass) for the optional extension; empty when it cannot be built."""
    if os.environ.get("SPO_KERNELS_BUILD_CPU", "1").strip().lower() in ("0", "false", "no", "off"):
        print(f"spo-kernels: SPO_KERNELS_BUILD_CPU=0, skipping {EXT_NAME}", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing or broken at build time
        _warn(f"torch is not importable at build time ({type(exc).__name__}: {exc}); install torch first and "
              f"build with `pip install --no-build-isolation -e .` to get the extension.")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that never fails the install: on any error it drops the extension."""

        def run(self):
            try:
                super().run()
            except BaseException as exc:  # CompileError, LinkError, RuntimeError (ninja), SystemExit, ...
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._drop(exc)

        def _drop(self, exc):
            _warn(f"building {EXT_NAME} failed ({type(exc).__name__}: {exc}).")
            self.extensions = []
            self.distribution.ext_modules = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    flags = ["-O3", "-g0", "-fopenmp"] if sys.platform.startswith("linux") else ["-O3", "-g0"]
    ext = CppExtension(
        EXT_NAME,
        SOURCES,
        depends=HEADERS,
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"] if "-fopenmp" in flags else [],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extension_setup()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
