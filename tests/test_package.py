"""cogrt as a package: one `cogrt` namespace in site-packages beside Hugging Face's `kernels`, a quiet command line,
and output files with the user's permissions."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("engine", "kernels", "serving", "train", "bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tracked files (the build leaves nothing in the working tree)."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((ROOT / f).read_bytes())
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    return next(out.glob("cogrt-*.whl"))


def test_the_wheel_puts_one_name_at_the_top(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"cogrt", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    for sub in SUBPACKAGES:
        assert f"cogrt/{sub}/__init__.py" in names
    assert "cogrt/models/cogrt-tiny/transformer/config.json" in names  # the bundled model travels with it
    assert "cogrt/engine/caches/probe.py" in names  # subpackages are listed in pyproject.toml too


def test_installed_wheel_beside_huggingface_kernels(wheel, tmp_path):
    """A fresh venv holding our wheel; the test venv's site-packages (torch, and Hugging Face's `kernels`) come in
    through a .pth file. Both `kernels` and `cogrt.kernels` import, each the right one, and the command runs."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels package is one of the test extras")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # pip --target puts the console script in bin/ beside the packages
    assert {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth"))} - {"bin"} == {"cogrt"}
    code = ("import kernels, cogrt.kernels, cogrt.engine, cogrt.train, cogrt.bench, cogrt.serving, sys; "
            "print(kernels.__file__); print(cogrt.kernels.__file__); "
            "import cogrt.engine.cli as c; print(c.BUNDLED_MODEL.is_dir())")
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    hf, ours, bundled = out.stdout.split()
    assert "site-packages/kernels/" in hf and not hf.startswith(str(ROOT / "kernels"))
    assert ours.startswith(str(site / "cogrt" / "kernels")) and bundled == "True"
    version = subprocess.run([py, "-m", "cogrt.engine.cli", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("cogrt "), version.stderr


def test_version():
    out = subprocess.run([Path(sys.executable).parent / "cogrt", "--version"], capture_output=True, text=True)
    from importlib.metadata import version
    assert out.returncode == 0 and out.stdout.strip() == f"cogrt {version('cogrt')}"


def test_generate_on_the_cpu_is_quiet_and_writes_a_readable_file(tmp_path):
    """`cogrt generate` in exact on the CPU: the progress bar and its result line, no library warnings, torchao not
    imported, and the mp4 with the mode the user's umask gives (not the temporary file's 0600)."""
    out = tmp_path / "v.mp4"
    code = ("import sys, runpy; sys.argv = ['cogrt', 'generate', 'a red circle moving right on a black background', "
            f"'--frames', '9', '--height', '64', '--width', '64', '--steps', '2', '-o', {str(out)!r}]; "
            "from cogrt.engine.cli import main; rc = main(); "
            "print('torchao imported' if any(m.startswith('torchao') for m in sys.modules) else 'no torchao'); "
            "sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    old = os.umask(0o027)
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"wrote {out}") and lines[1] == "no torchao", res.stdout
    # stderr holds the progress bar alone
    err = res.stderr.replace("\r", "\n")
    assert all(line.startswith("denoise:") for line in err.splitlines() if line.strip()), res.stderr
    assert out.stat().st_mode & 0o777 == 0o640
