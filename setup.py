"""Build the optional C data-plane engine (flanneld_py._engine).

The extension is marked optional: where it cannot be compiled, the package still installs and the
daemon runs its pure-Python engine (``--engine auto`` picks C only when it is importable).

It is one extension module built from the sources in ``flanneld_py/_engine_c/`` (``engine.h``
there says which file holds what).
"""

from setuptools import Extension, setup

ENGINE_SRC = "flanneld_py/_engine_c"

setup(
    ext_modules=[
        Extension(
            "flanneld_py._engine",
            sources=[
                f"{ENGINE_SRC}/{name}.c"
                for name in ("module", "loop", "forward", "offload", "routes", "packet")
            ],
            depends=[
                f"{ENGINE_SRC}/{name}.h"
                for name in ("engine", "loop", "forward", "offload", "routes", "packet")
            ],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fno-strict-aliasing"],
            optional=True,
        )
    ]
)
