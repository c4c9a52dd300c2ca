"""Shared test set-up: where the reference fixtures live, and small helpers to find them.

The fixtures (``../shared/fixtures`` beside the repository, see its MANIFEST.md) were made by llama.cpp's own
tools and PEFT; several tests compare against them. Those tests carry the ``fixtures`` marker, or sit in a module
that calls :func:`skip_module_without_fixtures` first. When the folder is absent:

- on a contributor's machine (a clone of the repository alone) they are skipped, with a reason that says so, and
  the rest of the suite runs;
- in CI (``CI`` set to true) nothing is skipped: they fail loudly, so a missing folder can never pass silently.

``scripts/standalone_check.py`` (part of the test command) clones the repository without the fixtures and checks
that the suite is green there with only such skips.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

#: The repository root (this file is ``<repo>/tests/conftest.py``).
REPO = Path(__file__).resolve().parent.parent
#: The shared reference fixtures, beside the repository.
FIXTURES = (REPO.parent / "shared" / "fixtures").resolve()
#: Whether this run is CI's (``CI=true``, as CI services set it): fixture tests then never skip.
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
#: Whether fixture tests may be skipped in this run (the folder is absent, and this is not CI).
SKIP_FIXTURE_TESTS = not FIXTURES.is_dir() and not IN_CI
#: The skip reason of every fixture test when the folder is absent.
FIXTURES_ABSENT = (
    f"needs the shared reference fixtures, absent here: {FIXTURES} (../shared/fixtures beside the repository); "
    "with CI=true this fails instead of skipping"
)


def _missing(what: str) -> str:
    return (
        f"required test fixture {what} not found (expected under {FIXTURES}: the shared fixtures must sit beside "
        "the repository as ../shared/fixtures)"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fixtures: reads ../shared/fixtures (skipped when absent, except in CI)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the fixtures folder (and outside CI), every test marked ``fixtures`` is skipped with the reason."""
    if SKIP_FIXTURE_TESTS:
        skip = pytest.mark.skip(reason=FIXTURES_ABSENT)
        for item in items:
            if item.get_closest_marker("fixtures"):
                item.add_marker(skip)


def skip_module_without_fixtures() -> None:
    """Called at the top of a module whose every test reads the fixtures (before it reads any): without the
    folder, outside CI, the whole module is reported skipped with the reason."""
    if SKIP_FIXTURE_TESTS:
        pytest.skip(FIXTURES_ABSENT, allow_module_level=True)


def fixture_path(*parts: str) -> Path:
    """The path of a fixture file. Missing: an error (at collection or in the test), except when the whole folder
    is absent outside CI, where the (absent) path is returned and the marked tests that use it are skipped."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists() and not SKIP_FIXTURE_TESTS:
        raise FileNotFoundError(_missing(os.path.join(*parts)))
    return path


def all_gguf_fixtures() -> list[Path]:
    """Every ``.gguf`` file under the fixtures folder, sorted; never empty (raises instead). When the folder is
    absent outside CI: one absent placeholder path, so a parametrized test still shows up (skipped)."""
    if SKIP_FIXTURE_TESTS:
        return [FIXTURES / "absent.gguf"]
    if not FIXTURES.is_dir():
        raise FileNotFoundError(_missing("folder"))
    files = sorted(FIXTURES.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(_missing("*.gguf files"))
    return files


def fixture_id(path: Path) -> str:
    """A short test id for a fixture file (its path relative to the fixtures folder)."""
    return path.relative_to(FIXTURES).as_posix()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The fixtures folder (fails the test when it is missing)."""
    if not FIXTURES.is_dir():
        pytest.fail(_missing("folder"))
    return FIXTURES


@pytest.fixture(scope="session")
def llama_gqa(fixtures_dir: Path) -> Path:
    """``llama-gqa/``: the small llama model, its quantizations and adapters."""
    path = fixtures_dir / "llama-gqa"
    if not path.is_dir():
        pytest.fail(_missing("llama-gqa/"))
    return path


# ---------------------------------------------------------------------------------------------------------
# comparing a file as ggml_lora reads it with gguf-py's GGUFReader


def same_value(a: object, b: object) -> bool:
    """Equal values of equal Python types; floats compared bit for bit (so -0.0 != 0.0 and NaN == NaN)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (a != a and b != b)
    return type(a) is type(b) and a == b


def gguf_py_value(field: object) -> object:
    """A gguf-py ReaderField's value; strings that are not UTF-8 come back as bytes (as ggml_lora gives them)."""
    import gguf

    types = field.types  # type: ignore[attr-defined]
    if types[0] == gguf.GGUFValueType.STRING:
        raw = bytes(field.parts[field.data[0]])  # type: ignore[attr-defined]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if types[0] == gguf.GGUFValueType.ARRAY and types[1:2] == [gguf.GGUFValueType.STRING]:
        out: list[object] = []
        for i in field.data:  # type: ignore[attr-defined]
            raw = bytes(field.parts[i])  # type: ignore[attr-defined]
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(raw)
        return out
    if types == [gguf.GGUFValueType.ARRAY]:  # empty array
        return []
    return field.contents()  # type: ignore[attr-defined]


def assert_reads_like_gguf_py(path: Path) -> None:
    """ggml_lora.open(path) and gguf.GGUFReader(path) agree on everything: version, alignment, data offset,
    metadata (keys in order, types, values), tensors (names in order, shapes, types, absolute offsets, sizes, bytes)."""
    import gguf

    import ggml_lora

    reader = gguf.GGUFReader(path)
    file_bytes = np.fromfile(path, dtype=np.uint8)
    with ggml_lora.open(path) as f:
        assert f.version == int(reader.fields["GGUF.version"].contents())
        assert f.alignment == reader.alignment
        if reader.tensors:  # without tensors ggml does not pad to the alignment, gguf-py still does
            assert f.data_offset == reader.data_offset
        assert f.file_size == Path(path).stat().st_size

        # gguf-py adds pseudo-fields for the header counts; they are not metadata.
        theirs = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
        assert list(f.fields) == list(theirs)  # same keys, same order
        for key, field in f.fields.items():
            ref = theirs[key]
            assert field.type.name == ref.types[0].name, key
            assert int(field.type) == int(ref.types[0]), key
            if ref.types[0] == gguf.GGUFValueType.ARRAY:
                # parts: key length, key, value type, element type, count, items (gguf-py lists the element type in
                # .types only for non-empty arrays)
                elem = gguf.GGUFValueType(int(ref.parts[3][0]))
                assert ref.types[1:2] in ([], [elem])
                assert field.sub_type is not None and field.sub_type.name == elem.name, key
            else:
                assert field.sub_type is None
            value = gguf_py_value(ref)
            assert same_value(field.value, value), (key, field.value, value)
            assert same_value(f.metadata[key], value), key

        assert list(f.tensors) == [t.name for t in reader.tensors]
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert info.name == t.name
            assert info.shape == tuple(int(d) for d in reversed(t.shape))  # gguf-py: ne order
            assert info.dims == tuple(int(d) for d in t.shape)
            assert info.type == t.tensor_type.name.lower()
            assert info.offset == t.data_offset  # absolute
            assert info.nbytes == t.n_bytes
            assert info.n_elements == t.n_elements
            raw = f.raw(t.name)
            assert raw.dtype == np.uint8 and raw.shape == (t.n_bytes,)
            assert np.array_equal(raw, np.ascontiguousarray(t.data).reshape(-1).view(np.uint8))
            assert np.array_equal(raw, file_bytes[t.data_offset : t.data_offset + t.n_bytes])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's figures of this run (hostile inputs tried, faults injected; RELIABILITY.md keeps the
    table). A report, not a test: it runs after every test whatever their order."""
    import sys

    figures = getattr(sys.modules.get("test_faults"), "FIGURES", None)
    if figures:
        terminalreporter.write_sep("-", "fault-suite figures")
        for key, value in sorted(figures.items()):
            terminalreporter.write_line(f"  {key}: {value}")


def write_with_gguf_py(path: Path, tensors: dict[str, tuple[np.ndarray, object]],
                       metadata: dict[str, str | float] | None = None, arch: str = "llama") -> Path:
    """A GGUF written by gguf-py's GGUFWriter: string / float32 metadata, then each tensor as ``(data, qtype)``
    (raw bytes for quantized types, shaped rows × row bytes). Returns ``path``."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, float(value))
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)  # type: ignore[arg-type]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
