"""The package's layers and its freedom from import circles, as import-linter checks them."""

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter with pyproject.toml's contracts over the package found under `root`."""
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--no-cache", str(REPO / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_layer_contracts_hold():
    res = _lint(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 kept, 0 broken" in res.stdout


def test_an_import_of_build_from_prune_breaks_them(tmp_path):
    shutil.copytree(REPO / "amp_deploy", tmp_path / "amp_deploy", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    victim = tmp_path / "amp_deploy" / "prune" / "score.py"
    victim.write_text(victim.read_text() + "\n\ndef _leak():\n    from amp_deploy.pipeline.context import Context  # noqa\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "amp_deploy.prune.score -> amp_deploy.pipeline.context" in res.stdout, res.stdout


def test_every_package_opens_with_a_one_line_docstring():
    for init in sorted((REPO / "amp_deploy").glob("*/__init__.py")):
        first = init.read_text().splitlines()[0]
        assert first.startswith('"""') and first.endswith('"""') and len(first) > 20, init


def test_every_public_name_has_a_docstring():
    import amp_deploy

    missing = [n for n in amp_deploy.__all__ if n != "__version__" and not (getattr(amp_deploy, n).__doc__ or "").strip()]
    assert not missing
