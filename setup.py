"""Build script. Metadata lives in pyproject.toml; this file only adds the C++ extension.

``spo_kernels._cpu`` (the ``cpu`` backend, sources in csrc/) is compiled with
torch.utils.cpp_extension against the torch installed in the environment, so torch must be importable
at build time: install torch first, then ``pip install --no-build-isolation .`` (pip's default
build isolation hides the installed torch). ``SPO_KERNELS_BUILD_CPU`` chooses what happens:

- ``1`` (default): build it; if torch is missing or compiling fails, the install fails with the
  reason and the fix (pip hides the output of builds that succeed, so a warning would go unseen);
- ``auto``: build it if possible, else install without it with a warning (CPU tensors then use the
  ``torch`` backend; ``spo_kernels.resolve_backend("cpu")`` says which one runs);
- ``0``: install without it.
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


_HOW = ("install torch first (the build you use: CPU or CUDA), then `pip install --no-build-isolation .`; or set "
        "SPO_KERNELS_BUILD_CPU=0 (skip the extension) or SPO_KERNELS_BUILD_CPU=auto (skip it if it cannot be built); "
        "without it CPU tensors use the slower 'torch' backend")


def _build_mode() -> str:
    value = os.environ.get("SPO_KERNELS_BUILD_CPU", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value == "auto":
        return "auto"
    if value in ("1", "true", "yes", "on", ""):
        return "required"
    raise SystemExit(f"spo-kernels: SPO_KERNELS_BUILD_CPU={value!r} is unknown; use 1, auto or 0")


def _warn(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (spo-kernels): {msg}\nThe package is installed without the C++ extension "
          f"{EXT_NAME}; the 'cpu' backend is unavailable and CPU tensors use the 'torch' backend.\n{bar}\n",
          file=sys.stderr, flush=True)


def _fail(msg: str):
    raise SystemExit(f"\nERROR (spo-kernels): {msg}\nThe C++ extension {EXT_NAME} (the 'cpu' backend) was not "
                     f"built. To fix: {_HOW}.\n")


def _extension_setup():
    """(ext_modules, cmdclass) for the extension; empty when it is skipped."""
    mode = _build_mode()
    if "sdist" in sys.argv[1:] and mode == "required":
        mode = "auto"  # a source distribution compiles nothing: the check runs when the wheel is built
    if mode == "off":
        print(f"spo-kernels: SPO_KERNELS_BUILD_CPU=0, skipping {EXT_NAME}", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing (build isolation) or broken at build time
        msg = f"torch is not importable at build time ({type(exc).__name__}: {exc})."
        if mode == "required":
            _fail(msg)
        _warn(msg + f" To build it: {_HOW}.")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that, on any error, fails with the fix (default) or drops the extension (auto)."""

        def run(self):
            try:
                super().run()
            except BaseException as exc:  # CompileError, LinkError, RuntimeError (ninja), SystemExit, ...
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._drop(exc)

        def _drop(self, exc):
            if mode == "required":
                _fail(f"building {EXT_NAME} failed ({type(exc).__name__}: {exc}).")
            _warn(f"building {EXT_NAME} failed ({type(exc).__name__}: {exc}).")
            self.extensions = []
            self.distribution.ext_modules = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    # -fno-trapping-math: lets GCC vectorize the row kernels' selects on SSE2 / AVX2 (csrc/row_kernels.h);
    # nothing reads floating-point exception flags.
    flags = ["-O3", "-g0", "-fno-trapping-math"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
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
