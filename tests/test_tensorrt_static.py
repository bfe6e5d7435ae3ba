"""TensorRT checked without TensorRT: the engine module against 10.13's type stubs and 11.x's bindings.

TensorRT cannot be installed here, but two references can (`make test` puts them in .trt-ref/):
`tensorrt-stubs` (third-party stubs generated from TensorRT 10.13's bindings) and NVIDIA's own 11.x
bindings wheel `tensorrt-cu13-bindings`, whose compiled module holds every API name as a string
even though it cannot load without libnvinfer. Each check is also shown failing on a misspelling.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

MODULE = REPO / "amp_deploy" / "deploy" / "tensorrt_engine.py"
REF = Path(os.environ.get("AMP_DEPLOY_TRT_REF", REPO / ".trt-ref"))


def _ref(kind: str) -> Path:
    path = REF / kind
    if not path.is_dir():
        pytest.fail(f"{path} is missing: `make test` installs the TensorRT references there "
                    "(tensorrt-stubs and tensorrt-cu13-bindings, with --no-deps --target)")
    return path


# --- 10.13 stubs, type-checked with mypy ----------------------------------------------------------


def _patched_stubs(dest: Path) -> Path:
    """A copy of the stubs with the lines mypy rejects mended: parameters named `in` (a keyword) and a
    parameter without a default after ones with defaults."""
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(_ref("stubs") / pkg, dest / pkg)
    for pyi in dest.rglob("*.pyi"):
        text = pyi.read_text()
        text = re.sub(r"([(,] ?)in: ", r"\1in_: ", text)
        pyi.write_text("\n".join(_defaults_in_order(line) for line in text.splitlines()) + "\n")
    return dest


def _defaults_in_order(line: str) -> str:
    m = re.match(r"(\s*def \w+\()(.*)(\) -> .*)$", line)
    if not m or "=" not in m[2]:
        return line
    params, seen_default = [], False
    for p in _split_params(m[2]):
        if "=" in p:
            seen_default = True
        elif seen_default and not p.strip().startswith("*"):
            p += " = ..."
        params.append(p)
    return m[1] + ",".join(params) + m[3]


def _split_params(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _mypy(module: Path, stubs: Path) -> subprocess.CompletedProcess:
    cfg = stubs.parent / "mypy.ini"
    cfg.write_text("[mypy]\nfollow_imports = silent\nignore_missing_imports = True\ncheck_untyped_defs = True\n"
                   "[mypy-torch.*,numpy.*,amp_deploy.*]\nfollow_imports = skip\n"
                   # the stubs shadow builtins such as `bool` with TensorRT's dtypes: judge our code, not theirs
                   "[mypy-tensorrt,tensorrt_bindings,tensorrt_bindings.*]\nignore_errors = True\n")
    env = {**os.environ, "MYPYPATH": str(stubs)}
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(cfg), "--no-incremental", str(module)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return _patched_stubs(tmp_path_factory.mktemp("trt") / "stubs")


def test_the_engine_module_type_checks_against_tensorrt_10_13_stubs(stubs):
    res = _mypy(MODULE, stubs)
    assert res.returncode == 0 and "Success" in res.stdout, res.stdout + res.stderr


# --- 11.x bindings: every name the module uses exists there (or is 10.x-only) -------------------


def binding_names() -> list[str]:
    """Identifier strings in the 11.x compiled module (the linker merges a name into the tail of a
    longer one, so a name counts as present when it ends one of these)."""
    so = next(_ref("bindings").glob("tensorrt_bindings/tensorrt*.so"))
    return [s.decode() for s in so.read_bytes().split(b"\0") if re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_]*", s)]


def _not_tensorrt() -> set[str]:
    """Attribute names of everything else the module touches (torch, paths, its own objects)."""
    import hashlib
    import importlib.metadata
    import importlib.util
    import json
    import time
    import warnings

    import torch

    from amp_deploy.deploy import tensorrt_engine as te

    objs = [torch, torch.cuda, torch.Tensor, torch.cuda.Stream, Path, json, time, hashlib, hashlib.sha256(), importlib,
            importlib.metadata,
            importlib.util, warnings, str, dict, list, tuple, bytes, te, te.BuildSettings, te.TensorRTRunner]
    names = {n for o in objs for n in dir(o)}
    tree = ast.parse(MODULE.read_text())
    names |= {t.attr for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
              if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return names | set(te.BuildSettings.__dataclass_fields__)


def used_names(source: str) -> set[str]:
    """Attribute names used in `source`, and names passed as strings to getattr/hasattr."""
    tree = ast.parse(source)
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.args[1].value for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
              and n.func.id in ("getattr", "hasattr") and len(n.args) > 1 and isinstance(n.args[1], ast.Constant)}
    return {n for n in names if not n.startswith("__")}


def missing_in_11(source: str, idents: list[str], exempt: frozenset[str]) -> set[str]:
    candidates = used_names(source) - _not_tensorrt()
    return {n for n in candidates if n not in exempt and not any(s.endswith(n) for s in idents)}


@pytest.fixture(scope="module")
def idents():
    return binding_names()


def test_every_tensorrt_name_the_module_uses_exists_in_the_11x_bindings(idents):
    from amp_deploy.deploy.tensorrt_engine import TRT10_ONLY

    assert len(idents) > 5000  # the real compiled module, not an empty file
    assert {"build_serialized_network", "execute_async_v3", "STRONGLY_TYPED"} <= set(idents)
    assert missing_in_11(MODULE.read_text(), idents, TRT10_ONLY) == set()
    # what the module declares 10.x-only really is gone in 11 (else the list hides nothing)
    assert all(not any(s.endswith(n) for s in idents) for n in TRT10_ONLY)


# --- both checks fail on a misspelled TensorRT attribute ---------------------------------------------


def test_a_misspelled_tensorrt_attribute_fails_both_checks(tmp_path, stubs, idents):
    from amp_deploy.deploy.tensorrt_engine import TRT10_ONLY

    source = MODULE.read_text()
    assert "self.context.set_input_shape(" in source
    broken = source.replace("self.context.set_input_shape(", "self.context.set_input_shpe(")
    assert missing_in_11(broken, idents, TRT10_ONLY) == {"set_input_shpe"}
    copy = tmp_path / "tensorrt_engine.py"
    copy.write_text(broken)
    res = _mypy(copy, stubs)
    assert res.returncode != 0 and "set_input_shpe" in res.stdout, res.stdout
