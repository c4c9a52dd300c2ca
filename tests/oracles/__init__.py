"""Independent oracles for the tests and benchmarks: code that never calls ggml_lora.

- :mod:`tests.oracles.sdist` fetches llama.cpp's sources (inside the ``llama-cpp-python`` sdist on PyPI) once and
  caches them.
- :mod:`tests.oracles.ggml_quants` compiles ggml's ``ggml-quants.c`` alone into a shared library (the
  quantization truth) and calls it through ctypes.
- :mod:`tests.oracles.llama_tools` builds llama.cpp's command-line tools (``llama-quantize``,
  ``llama-export-lora``, ``llama-gguf-split``) with cmake for the benchmarks.
"""
