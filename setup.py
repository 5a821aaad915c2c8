"""Build the optional C data-plane engine (flanneld_py._engine).

The extension is marked optional: where it cannot be compiled, the package still installs and the
daemon runs its pure-Python engine (``--engine auto`` picks C only when it is importable).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "flanneld_py._engine",
            sources=["flanneld_py/_engine.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fno-strict-aliasing"],
            optional=True,
        )
    ]
)
