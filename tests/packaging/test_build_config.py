"""How the build decides on CUDA, and what a CPU-only build says when asked for CUDA.

The CMake tests run only the configure step of the project against a fake torch package (a few
attributes and empty library files), so they take seconds and need no CUDA anywhere: they pin the
case of a CUDA build of torch on a machine without a CUDA toolkit, which must configure a CPU-only
build and say so in one line, and ``SPLISOSM_WITH_CUDA=ON`` without a compiler, which must stop
with a message naming what is missing. ``tools/check-cuda-torch-build.sh`` does the same with a
real CUDA torch wheel and a full build.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from splisosm import SplisosmGLMM
from splisosm.glmm.glm import MultinomGLM
from splisosm.ops import _native

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_LINE = "splisosm: CUDA kernels not built"

# --------------------------------------------------------------------------- the runtime error


@pytest.fixture
def cuda_torch_without_kernels(monkeypatch):
    """What a CUDA torch with a CPU-only build of splisosm looks like to the Python side."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_native, "NATIVE_AVAILABLE", True)
    monkeypatch.setattr(_native, "cuda_kernels_built", lambda: False)


def test_wrapper_names_the_missing_cuda_kernels(cuda_torch_without_kernels) -> None:
    with pytest.raises(RuntimeError, match="built without its CUDA kernels") as err:
        SplisosmGLMM(device="cuda")
    message = str(err.value)
    assert "nvcc" in message and "CUDA 13.x" in message
    assert "--no-build-isolation" in message
    SplisosmGLMM(device="cpu")  # CPU stays available


def test_missing_kernels_named_before_a_missing_gpu(cuda_torch_without_kernels, monkeypatch) -> None:
    # On a machine without a GPU the build problem is still the one to fix first.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        SplisosmGLMM(device="cuda")
    monkeypatch.setattr(_native, "cuda_kernels_built", lambda: True)
    with pytest.raises(ValueError, match="no CUDA GPU is visible to torch"):
        SplisosmGLMM(device="cuda")


def test_per_gene_model_names_the_missing_cuda_kernels(cuda_torch_without_kernels) -> None:
    counts = torch.ones(1, 5, 3)
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        MultinomGLM().setup_data(counts, device="cuda")
    MultinomGLM().setup_data(counts, device="cpu")


def test_no_kernel_error_when_kernels_exist_or_torch_lacks_cuda(monkeypatch) -> None:
    monkeypatch.setattr(_native, "NATIVE_AVAILABLE", True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_native, "cuda_kernels_built", lambda: True)
    SplisosmGLMM(device="cuda")
    # A CPU-only torch: the accurate message is that torch has no CUDA, not a build hint.
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_native, "cuda_kernels_built", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' is not available: this torch build has no CUDA"):
        SplisosmGLMM(device="cuda")


def test_cuda_kernels_built_matches_the_dispatcher() -> None:
    if not _native.NATIVE_AVAILABLE:
        pytest.skip("the compiled extension is not importable")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("splisosm::laplace_sparse", "CUDA")
    assert _native.cuda_kernels_built() == has_cuda
    if torch.version.cuda is None:
        assert not has_cuda


# --------------------------------------------------------------------------- the CMake logic

FAKE_TORCH = '''
import types
__version__ = "2.13.0+fake"
version = types.SimpleNamespace(cuda={cuda!r})
_C = types.SimpleNamespace(_GLIBCXX_USE_CXX11_ABI=True)
'''


def _nvcc_dirs() -> list[str]:
    """Directories holding an nvcc that CMake could find: PATH and its own standard prefixes."""
    candidates = os.environ.get("PATH", "").split(os.pathsep)
    candidates += ["/usr/local/bin", "/usr/bin", "/bin", "/opt/cuda/bin"]
    candidates += glob.glob("/usr/local/cuda*/bin")
    if os.environ.get("CUDA_PATH"):
        candidates.append(os.path.join(os.environ["CUDA_PATH"], "bin"))
    found = []
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, "nvcc")):
            real = os.path.realpath(d)
            for name in (d, real):
                if name not in found:
                    found.append(name)
    return found


def _configure_prerequisites() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("Python development headers are missing")
    eigen = [Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "share" / "eigen3",
             Path("/usr/share/eigen3"), Path("/usr/include/eigen3")]
    if not any(p.exists() for p in eigen):
        pytest.skip("Eigen 3 is not installed")
    return cmake


def _configure(tmp_path: Path, torch_cuda: str | None, *, hide_nvcc: bool,
               defines: tuple[str, ...] = ()) -> tuple[int, str, Path]:
    """Configure the project against a fake torch; return (exit code, output, build dir).

    Calls with the same ``tmp_path`` reconfigure the same build directory.
    """
    cmake = _configure_prerequisites()
    fake = tmp_path / f"fake-{torch_cuda}"
    pkg = fake / "torch"
    shutil.rmtree(fake, ignore_errors=True)
    (pkg / "include").mkdir(parents=True)
    (pkg / "lib").mkdir()
    for lib in ("torch_cpu", "c10", "torch_cuda", "c10_cuda"):
        for suffix in (".so", ".dylib"):
            (pkg / "lib" / f"lib{lib}{suffix}").touch()
    (pkg / "__init__.py").write_text(FAKE_TORCH.format(cuda=torch_cuda))
    # Like the real torch, it points at CMake config files, here absent: the project must not need
    # torch's CMake package, which demands a CUDA toolkit whenever torch has CUDA.
    (pkg / "utils").mkdir()
    (pkg / "utils" / "__init__.py").write_text(
        "import os\ncmake_prefix_path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "
        "'share', 'cmake')\n")

    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME", "CMAKE_TOOLCHAIN_FILE", "CMAKE_GENERATOR")}
    env["PYTHONPATH"] = str(fake)
    args = [cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"),
            f"-DPython3_EXECUTABLE={sys.executable}", *(f"-D{d}" for d in defines)]
    ninja = shutil.which("ninja")
    if ninja:
        # by full path: its directory may be among those hidden below
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    if hide_nvcc:
        hidden = _nvcc_dirs()
        if any(d in ("/usr/bin", "/bin") for d in hidden):
            pytest.skip("nvcc is installed in /usr/bin, which cannot be hidden from CMake")
        env["PATH"] = os.pathsep.join(
            d for d in env.get("PATH", "").split(os.pathsep)
            if os.path.realpath(d) not in hidden and d not in hidden)
        # CMake also searches its standard prefixes (e.g. /usr/local/bin) for nvcc, whatever PATH
        # says; a toolchain file reaches check_language's sub-project too, a -D would not.
        toolchain = tmp_path / "hide-nvcc.cmake"
        toolchain.write_text('set(CMAKE_IGNORE_PATH "{}")\n'.format(";".join(hidden)))
        args.append(f"-DCMAKE_TOOLCHAIN_FILE={toolchain}")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    return proc.returncode, proc.stdout + proc.stderr, tmp_path / "build"


def _compiled_sources(build: Path) -> str:
    for name in ("build.ninja", "CMakeFiles/_C.dir/build.make"):
        if (build / name).exists():
            return (build / name).read_text()
    raise AssertionError(f"no build files in {build}")


def test_cuda_torch_without_nvcc_configures_cpu_only(tmp_path: Path) -> None:
    rc, out, build = _configure(tmp_path, "13.0", hide_nvcc=True)
    assert rc == 0, out
    assert out.count(SKIPPED_LINE) == 1, out
    assert re.search(r"CUDA kernels not built: torch 2\.13\.0 has CUDA 13\.0 but no CUDA compiler", out), out
    sources = _compiled_sources(build)
    assert "multinomial_cpu.cpp" in sources
    assert "csrc/cuda/" not in sources


def test_cuda_forced_on_without_nvcc_fails_clearly(tmp_path: Path) -> None:
    rc, out, _ = _configure(tmp_path, "13.0", hide_nvcc=True, defines=("SPLISOSM_WITH_CUDA=ON",))
    assert rc != 0
    assert "SPLISOSM_WITH_CUDA=ON, but no CUDA compiler (nvcc) was found" in out, out


def test_cuda_forced_on_with_cpu_torch_fails_clearly(tmp_path: Path) -> None:
    rc, out, _ = _configure(tmp_path, None, hide_nvcc=True, defines=("SPLISOSM_WITH_CUDA=ON",))
    assert rc != 0
    assert "SPLISOSM_WITH_CUDA=ON, but torch 2.13.0 was built without CUDA" in out, out


def test_cpu_torch_configures_without_looking_for_cuda(tmp_path: Path) -> None:
    rc, out, build = _configure(tmp_path, None, hide_nvcc=True)
    assert rc == 0, out
    assert SKIPPED_LINE not in out and "Looking for a CUDA compiler" not in out, out
    assert "csrc/cuda/" not in _compiled_sources(build)


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", text)
    assert match, text
    return match.group(1)


def test_cuda_forced_off_skips_the_kernels_without_looking(tmp_path: Path) -> None:
    rc, out, build = _configure(tmp_path, _nvcc_version(), hide_nvcc=False,
                                defines=("SPLISOSM_WITH_CUDA=OFF",))
    assert rc == 0, out
    assert SKIPPED_LINE not in out and "Looking for a CUDA compiler" not in out, out
    assert "csrc/cuda/" not in _compiled_sources(build)


def test_cuda_torch_with_nvcc_builds_the_cuda_kernels_for_its_major_only(tmp_path: Path) -> None:
    version = _nvcc_version()
    rc, out, build = _configure(tmp_path, version, hide_nvcc=False)
    assert rc == 0, out
    assert SKIPPED_LINE not in out, out
    sources = _compiled_sources(build)
    assert "csrc/cuda/cuda_binding.cpp" in sources and "csrc/cuda/laplace.cu" in sources

    # Same build directory, so the CUDA compiler is not detected again: only torch changed.
    other = str(int(version.split(".")[0]) - 1)
    rc, out, build = _configure(tmp_path, f"{other}.8", hide_nvcc=False)
    assert rc == 0, out
    assert out.count(SKIPPED_LINE) == 1 and f"not CUDA {other}.x" in out, out
    assert "csrc/cuda/" not in _compiled_sources(build)
