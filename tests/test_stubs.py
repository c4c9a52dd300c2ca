"""The type stubs of the native module (python/ggml_lora/_native.pyi) match the compiled extension."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_native_stubs_match_the_extension(tmp_path: Path) -> None:
    # Run from an empty folder so that the installed package (and its .pyi) is what gets checked.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "ggml_lora._native"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, f"stubtest found mismatches:\n{proc.stdout}\n{proc.stderr}"
    assert "Success" in proc.stdout


def test_package_is_typed() -> None:
    import ggml_lora

    package = Path(ggml_lora.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "_native.pyi").is_file()


def test_package_type_checks_against_the_stubs(tmp_path: Path) -> None:
    """mypy over the Python package (which uses the native module only through its stubs) finds no error."""
    package = Path(__file__).resolve().parents[1] / "python" / "ggml_lora"
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), str(package)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout}\n{proc.stderr}"


def test_extension_uses_the_stable_abi() -> None:
    """One wheel serves every CPython >= 3.9: the extension is built for the stable ABI (PEP 384), which the
    import system marks with the ``.abi3`` suffix (oracle: the file name the interpreter loaded)."""
    import importlib.machinery

    import ggml_lora._native as native

    assert native.__file__ is not None
    name = Path(native.__file__).name
    abi3_suffixes = [s for s in importlib.machinery.EXTENSION_SUFFIXES if "abi3" in s]
    assert abi3_suffixes, f"this interpreter lists no abi3 extension suffix: {importlib.machinery.EXTENSION_SUFFIXES}"
    assert any(name.endswith(s) for s in abi3_suffixes), f"{name} is not an abi3 module ({abi3_suffixes})"


def test_every_public_name_of_the_stub_is_documented() -> None:
    """Each public function, class, method and property in ``_native.pyi`` has a docstring (oracle: the stub's
    own syntax tree)."""
    import ast

    stub = Path(__file__).resolve().parents[1] / "python" / "ggml_lora" / "_native.pyi"
    missing: list[str] = []

    def walk(nodes: list[ast.stmt], prefix: str = "") -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if ast.get_docstring(node) is None:
                    missing.append(prefix + node.name)
                if isinstance(node, ast.ClassDef):
                    walk(node.body, node.name + ".")

    walk(ast.parse(stub.read_text()).body)
    assert not missing, f"undocumented in the stub: {missing}"
