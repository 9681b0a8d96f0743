"""The built wheel: one import name (`loraloom`), the shipped toy world inside it, and the commands working from
any folder on the installed package (not on this checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout's files (setuptools writes build/ and *.egg-info beside the sources, which
    must not land in the checkout)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
                   check=True, cwd=out)
    (whl,) = out.glob("loraloom-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked into a folder of its own (what `pip install` puts into site-packages)."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_has_one_top_level_package_and_the_shipped_files(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"loraloom", wheel.name.split("-py")[0] + ".dist-info"}, tops
    for shipped in ("loraloom/assets/toyworld/model/model_index.json", "loraloom/assets/toyworld/checker/checker.safetensors",
                    "loraloom/assets/toyworld/clip/config.json", "loraloom/assets/toyworld/loras/character_1.safetensors",
                    "loraloom/assets/hypernet/toyworld_hypernet.safetensors", "loraloom/assets/examples/toyworld.yaml",
                    "loraloom/evaluation/templates/composlora_pairwise.yaml", "loraloom/app/cli.py"):
        assert shipped in names, shipped
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as z:
        assert "loraloom = loraloom.app.cli:main" in z.read(entry).decode()


def _loraloom(installed: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "loraloom", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_installed_package_runs_from_any_folder(installed, tmp_path):
    where = subprocess.run([sys.executable, "-c", "import loraloom, loraloom.resources as r; print(loraloom.__file__); "
                            "print(r.assets_dir())"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)},
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where), where  # the unpacked wheel, not this checkout

    gen = _loraloom(installed, tmp_path, "generate", "assets/examples/toyworld.yaml", "--method", "merge", "--seed", "0",
                    "--steps", "3")
    assert gen.returncode == 0, gen.stderr[-2000:]
    (png,) = (tmp_path / "outputs" / "toyworld-example").glob("merge_s0_*.png")
    assert png.stat().st_size > 0

    check = _loraloom(installed, tmp_path, "toyworld", "check", "--smoke", "--steps", "4", "--workers", "1", "--no-progress")
    assert check.returncode == 0, check.stderr[-2000:]
    lines = check.stdout.strip().splitlines()[-6:]
    assert [line.split()[0] for line in lines] == ["checker_accuracy_min", "base_prompt_accuracy", "lora_alone_min",
                                                   "lora_leak_max", "merge_all_concepts_2", "merge_all_concepts_4"]
    assert float(lines[0].split()[1]) > 0.9  # the shipped checker was found and works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # nothing else written into the folder
