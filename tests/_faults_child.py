"""Child-process actions of the fault suite: ``python tests/_faults_child.py <action> <json args>``.

Run in a separate process so that the parent can impose limits (RLIMIT_FSIZE), kill it (SIGKILL) or measure
its memory (ru_maxrss) without risking the test runner itself. Prints one JSON line with the outcome.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from pathlib import Path


def _outcome(fn) -> dict:  # type: ignore[no-untyped-def]
    try:
        value = fn()
        return {"ok": True, "value": value}
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        return {"ok": False, "type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                "errno": getattr(exc, "errno", None), "message": str(exc)}


def limit_fsize(nbytes: int) -> None:
    """Files this process writes may not grow past ``nbytes``; writing past it fails with EFBIG instead of the
    default SIGXFSZ kill (as on a full disk, the writer sees an OSError)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def action_write(args: dict) -> dict:
    import numpy as np

    import ggml_lora

    limit_fsize(args["limit"])
    tensors = {f"t{i}": np.full((args["rows"], 256), i, dtype=np.float32) for i in range(args["n"])}
    return _outcome(lambda: str(ggml_lora.write(args["out"], {"general.architecture": "llama"}, tensors)))


def action_patch(args: dict) -> dict:
    """``ggml_lora.patch``; with ``pause_at`` (a fraction), the progress callback prints
    ``{"paused": {bytes_done, bytes_total}}`` once that share of the output is done, and then blocks forever (the
    parent kills the child there)."""
    import ggml_lora

    if args.get("limit"):
        limit_fsize(args["limit"])
    progress = None
    if args.get("pause_at") is not None:
        def progress(p: ggml_lora.PatchProgress) -> None:
            if args["pause_at"] * p.bytes_total <= p.bytes_done < p.bytes_total:
                print(json.dumps({"paused": {"bytes_done": p.bytes_done, "bytes_total": p.bytes_total}}), flush=True)
                while True:
                    time.sleep(3600)
    return _outcome(lambda: str(ggml_lora.patch(args["model"], args["adapter"], base=args.get("base"),
                                                out=args["out"], threads=args.get("threads"),
                                                sync=args.get("sync", True), progress=progress).out))


def action_convert(args: dict) -> dict:
    from ggml_lora.convert import convert

    if args.get("limit"):
        limit_fsize(args["limit"])
    return _outcome(lambda: str(convert(args["peft_dir"], args["out"], base=args["base"],
                                        format=args.get("format", "gguf"))))


def action_open_all(args: dict) -> dict:
    """Opens every file of ``args["files"]``; each must raise GGUFError (or open and read, if listed as ok)."""
    import ggml_lora

    counts = {"error": 0, "ok": 0}
    warm = args.get("warmup")
    if warm:
        with ggml_lora.open(warm) as f:
            for name in f.tensors:
                f.raw(name)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in args["files"]:
        try:
            with ggml_lora.open(path) as f:
                for name in f.tensors:
                    f.raw(name)
            counts["ok"] += 1
        except ggml_lora.GGUFError as exc:
            assert str(exc), path
            counts["error"] += 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ok": True, "value": {**counts, "rss_before_kb": base_rss, "rss_after_kb": peak}}


def main() -> None:
    action, raw = sys.argv[1], sys.argv[2]
    result = globals()[f"action_{action}"](json.loads(raw))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("RAYON_NUM_THREADS", "2")
    main()
