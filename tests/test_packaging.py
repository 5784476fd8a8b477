"""A non-editable install works outside the checkout: configs, sweep specs and the commands ship."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_list_covers_the_tree():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ipu_app").rglob("__init__.py")}
    data_only = {"ipu_app.ops.csrc", "ipu_app.configs", "ipu_app.configs.base", "ipu_app.configs.sweeps"}
    assert listed == found | data_only


def test_an_installed_wheel_finds_its_configs_and_commands(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("ipu_app", "configs"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("ipu_app-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import ipu_app.config as c, ipu_app.experiments.sweep as s; "
            "print(c.CONFIG_DIR); print(c.load_config('bert_tiny_sparse').name); print(s.load_sweep('pareto_cpu').name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env,
                         check=True).stdout.split()
    assert out == [str(site / "ipu_app" / "configs"), "bert_tiny_sparse", "pareto_cpu"]
    for script, needle in (("ipu-app", "prepare-data"), ("run-pretraining", "--describe")):
        proc = subprocess.run([sys.executable, str(site / "bin" / script), "--help"], capture_output=True,
                              text=True, cwd=elsewhere, env=env)
        assert proc.returncode == 0 and needle in proc.stdout
