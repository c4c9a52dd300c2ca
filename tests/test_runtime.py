"""Runtime properties of the native calls: the GIL is released during long work, and opening a huge file maps it
instead of reading it."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

import ggml_lora

from conftest import FIXTURES, skip_module_without_fixtures

LLAMA = FIXTURES / "llama-gqa"
skip_module_without_fixtures()


def python_progress_during(call: Callable[[], object]) -> int:
    """How many turns another Python thread gets while `call` runs in this thread.

    The switch interval is made huge, so this thread never hands the GIL over on its own: the other thread runs
    only when a native call releases the GIL. It yields back at once each turn (time.sleep(0) releases the GIL).
    Flags are plain dict entries: setting a threading.Event takes a lock, which may hand the GIL over by itself.
    """
    state = {"inside": False, "stop": False, "during": 0}

    def spin() -> None:
        while not state["stop"]:
            if state["inside"]:
                state["during"] += 1
            time.sleep(0)

    old = sys.getswitchinterval()
    # Before the worker starts: a thread that began waiting for the GIL under the old 5 ms interval would force a
    # hand-over 5 ms later, possibly inside `call` (seen under load), so the probe's negative control failed.
    sys.setswitchinterval(1000.0)
    worker = threading.Thread(target=spin)
    try:
        worker.start()
        state["inside"] = True
        call()
        state["inside"] = False
        during = state["during"]
    finally:
        sys.setswitchinterval(old)
        state["stop"] = True
        worker.join()
    return during


def test_the_gil_probe_sees_a_call_that_keeps_the_gil() -> None:
    """The probe's negative control: a regular expression match runs in C holding the GIL throughout."""
    assert python_progress_during(lambda: re.match(r"(a|aa)*c", "a" * 27)) == 0


def test_gil_is_released_by_long_native_calls(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    q = ggml_lora.quantize(x, "q8_0")
    assert python_progress_during(lambda: ggml_lora.quantize(x, "q4_0")) > 0
    assert python_progress_during(lambda: ggml_lora.dequantize(q, "q8_0", x.shape)) > 0
    big = {"w": x}
    assert python_progress_during(lambda: ggml_lora.write(tmp_path / "big.gguf", {}, big, sync=False)) > 0
    adapter = LLAMA / "lora-r8" / "ref-adapter-f32.gguf"
    assert python_progress_during(
        lambda: ggml_lora.patch(LLAMA / "base-q4_0.gguf", adapter, base=LLAMA / "base-f16.gguf",
                                out=tmp_path / "p.gguf", sync=False)
    ) > 0


CHILD = r"""
import sys, numpy as np, ggml_lora
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
before = rss_mb()
f = ggml_lora.open(sys.argv[1])
raw = f.raw("huge")
assert raw.size == 10 * 2**30 and not raw.flags.writeable and not raw.flags.owndata
tail = int(raw[-1])   # touches one page at the end of the 10 GiB view
print(rss_mb() - before, tail)
"""


def test_opening_a_10_gib_file_maps_it(tmp_path: Path) -> None:
    """A sparse 10 GiB GGUF: open() parses the header and raw() gives a view; resident memory hardly moves."""
    path = tmp_path / "huge.gguf"
    name = b"huge"
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    header += struct.pack("<Q", len(name)) + name + struct.pack("<I", 2) + struct.pack("<QQ", 2**30, 10)
    header += struct.pack("<IQ", 24, 0)  # type i8, offset 0
    data_offset = (len(header) + 31) // 32 * 32
    with open(path, "wb") as f:
        f.write(header + b"\0" * (data_offset - len(header)))
        f.truncate(data_offset + 10 * 2**30)  # sparse: no 10 GiB on disk
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown, tail = done.stdout.split()
    assert float(grown) < 64, f"opening a 10 GiB file grew RSS by {grown} MB"
    assert tail == "0"
