#!/usr/bin/env bash
# Build and import splisosm next to a real CUDA build of torch on a machine whose CUDA toolkit is
# out of sight, in a throw-away virtualenv: the case where torch's own CMake package used to stop
# the build. Checks that
#   - an isolated `pip install .` stops early and tells the user to use --no-build-isolation;
#   - `pip install --no-build-isolation .` builds the CPU kernels, saying once that the CUDA
#     kernels are not built;
#   - the ops run on CPU, and SplisosmGLMM(device='cuda') raises the error naming what is missing;
#   - with WITH_NVCC=1 and an nvcc of torch's CUDA major release, the same venv also builds the
#     CUDA kernels (a wheel is built and imported; no GPU is needed for that).
#
# Needs network access to a package index serving the CUDA torch wheel (PyPI does, for Linux
# x86_64): about 3 GB to download and 5 GB on disk, removed afterwards. Measured on a busy 2-core
# machine: 6 minutes (2 to download at ~100 MB/s, 3 to build); WITH_NVCC=1 adds 4.5 more.
#
# Usage: tools/check-cuda-torch-build.sh
#   TORCH_SPEC     torch requirement to install (default: the README's torch==2.13.0)
#   TORCH_INDEX    index serving it (default: https://pypi.org/simple)
#   WITH_NVCC=1    also build the CUDA kernels with the nvcc on PATH
#   PYTHON         interpreter for the virtualenv (default: python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
torch_index="${TORCH_INDEX:-https://pypi.org/simple}"
python="${PYTHON:-python3}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="$work/venv"
py="$venv/bin/python"
step() { echo "== [${SECONDS}s] $*"; }
fail() { echo "check-cuda-torch-build: FAILED: $*" >&2; exit 1; }

step "virtualenv in $work"
"$python" -m venv "$venv"

# Only the torch install ignores the pip configuration: a site-wide find-links directory or
# constraint can hold a CPU-only wheel of the same version, which would defeat the check.
step "install $torch_spec from $torch_index"
env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_NO_INDEX \
  PIP_CONFIG_FILE=/dev/null "$py" -m pip install -q --index-url "$torch_index" "$torch_spec"
torch_cuda="$("$py" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"
[ -n "$torch_cuda" ] || fail "$torch_spec from $torch_index is not a CUDA build of torch"
step "torch $("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null) (CUDA $torch_cuda)"

step "build tools (as README.md's install command)"
"$py" -m pip install -q cmeel-eigen scikit-build-core cmake ninja

# Hide every nvcc CMake could find. PATH alone is not enough: CMake also searches its standard
# prefixes (/usr/local/bin, ...), and a toolchain file is what reaches check_language's
# sub-project (a -D define would not).
IFS=: read -r -a path_dirs <<<"$PATH"
hidden=()
for d in "${path_dirs[@]}" /usr/local/bin /opt/cuda/bin /usr/local/cuda*/bin ${CUDA_PATH:+"$CUDA_PATH/bin"}; do
  if [ -x "$d/nvcc" ]; then
    for name in "$d" "$(cd "$d" && pwd -P)"; do
      case " ${hidden[*]-} " in *" $name "*) ;; *) hidden+=("$name") ;; esac
    done
  fi
done
for d in "${hidden[@]}"; do
  case "$d" in /usr/bin | /bin) fail "nvcc is in $d, which cannot be hidden from CMake" ;; esac
done
no_nvcc_path="$venv/bin"
for d in "${path_dirs[@]}"; do
  case " ${hidden[*]-} " in *" $d "* | *" $(cd "$d" 2>/dev/null && pwd -P) "*) ;; *) no_nvcc_path+=":$d" ;; esac
done
toolchain="$work/hide-nvcc.cmake"
(IFS=';'; echo "set(CMAKE_IGNORE_PATH \"${hidden[*]-}\")") >"$toolchain"
no_nvcc=(env -u CUDACXX -u CUDA_PATH -u CUDA_HOME PATH="$no_nvcc_path" CMAKE_TOOLCHAIN_FILE="$toolchain")
step "nvcc hidden from: ${hidden[*]:-(none found)}"

cd "$root"
step "isolated build (pip's default) must stop and say how to build"
if "${no_nvcc[@]}" "$py" -m pip install --no-deps . >"$work/isolated.log" 2>&1; then
  fail "an isolated build succeeded; it should stop and ask for --no-build-isolation"
fi
grep -q -- "--no-build-isolation" "$work/isolated.log" ||
  { cat "$work/isolated.log"; fail "pip's output lacks the --no-build-isolation hint"; }
grep -m1 "torch cannot be imported" "$work/isolated.log"

step "pip install --no-build-isolation . (CPU kernels only)"
"${no_nvcc[@]}" "$py" -m pip install -v --no-build-isolation . >"$work/build.log" 2>&1 ||
  { tail -n 60 "$work/build.log"; fail "the build against the CUDA torch failed"; }
n_lines="$(grep -c "splisosm: CUDA kernels not built" "$work/build.log" || true)"
[ "$n_lines" = 1 ] || { cat "$work/build.log"; fail "expected one 'CUDA kernels not built' line, got $n_lines"; }
grep -m1 "splisosm: CUDA kernels not built" "$work/build.log"

step "import, CPU ops, and the device='cuda' error"
(cd "$work" && "$py" - <<'EOF'
import torch

from splisosm import SplisosmGLMM, ops
from splisosm.ops import _native

assert torch.version.cuda is not None
assert ops.NATIVE_AVAILABLE and not _native.cuda_kernels_built()
eta, counts = torch.randn(3, 20, 2, dtype=torch.float64), torch.randint(0, 9, (3, 20, 3)).double()
for got, want in zip(ops.multinom_terms(eta, counts), ops.multinom_terms_reference(eta, counts)):
    torch.testing.assert_close(got, want)
assert ops.has_native_kernel("multinom_terms", torch.device("cpu"))
SplisosmGLMM(device="cpu")
try:
    SplisosmGLMM(device="cuda")
except RuntimeError as err:
    assert "built without its CUDA kernels" in str(err) and "nvcc" in str(err), err
    print("device='cuda' ->", err)
else:
    raise AssertionError("SplisosmGLMM(device='cuda') did not raise")
EOF
)

if [ "${WITH_NVCC:-0}" = 1 ]; then
  command -v nvcc >/dev/null || fail "WITH_NVCC=1 but nvcc is not on PATH"
  step "with $(nvcc --version | grep -o 'release [0-9.]*'): build a wheel with the CUDA kernels"
  PATH="$venv/bin:$PATH" "$py" -m pip wheel -v --no-build-isolation --no-deps -w "$work/wheel" . \
    >"$work/cuda-build.log" 2>&1 || { tail -n 60 "$work/cuda-build.log"; fail "the CUDA build failed"; }
  ! grep "splisosm: CUDA kernels not built" "$work/cuda-build.log" || fail "CUDA kernels were skipped"
  "$py" -m pip install -q --no-deps --force-reinstall "$work"/wheel/splisosm-*.whl
  (cd "$work" && "$py" -c '
from splisosm.ops import _native
assert _native.cuda_kernels_built(), "the wheel has no CUDA kernels"
print("the wheel registers CUDA kernels")
')
fi

step "check-cuda-torch-build: OK"
