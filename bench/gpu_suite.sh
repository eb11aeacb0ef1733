#!/usr/bin/env bash
# The GPU suite in one command, for a machine with one NVIDIA GPU whose Python already has torch
# and triton but which cannot download anything (see docs/benchmarks.md, "GPU suite").
#
#   bench/gpu_suite.sh --prepare-wheels DIR [--python-version X.Y] [--glibc 2.NN]
#       where a package index is reachable: puts wheels of every dependency of the project but
#       torch and triton (and of its build) in DIR, for that CPython (default: this python3's)
#       on Linux x86_64 with that glibc or newer (default 2.28, as torch's own wheels need).
#       Copy DIR along.
#   bench/gpu_suite.sh [--wheels DIR] [--venv DIR] [SUITE FLAGS]
#       on the GPU machine, from the repository root of a copy of the tree: makes a venv that
#       sees the machine's torch and triton (--system-site-packages), installs the project into
#       it from DIR only (pip --no-index), then runs `python -m fastserve.bench.gpu_suite SUITE FLAGS`
#       (--out DIR, default $OUT or out/gpu-suite; `python -m fastserve.bench.gpu_suite --help` lists them).
#   bench/gpu_suite.sh --prepare-vllm-wheels DIR [--vllm-version X.Y.Z] [--python-version X.Y]
#       where a package index is reachable: puts vLLM's CUDA wheel and every dependency of it
#       (its own torch included, several GB) in DIR, for the FastServe-vs-vLLM part. Copy DIR along.
#   bench/gpu_suite.sh [--vllm-wheels DIR] --parts vs-vllm [SUITE FLAGS]
#       FastServe and vLLM on the GPU in one command. vLLM comes from FASTSERVE_VLLM_PYTHON, else
#       the machine's python if it imports vllm, else a venv (--vllm-venv, default .venv-vllm)
#       built from DIR alone; without any of them the part is skipped, saying so.
#
# Environment: FASTSERVE_WHEELS (--wheels), FASTSERVE_GPU_VENV (--venv, default .venv-gpu),
# FASTSERVE_VLLM_WHEELS (--vllm-wheels), FASTSERVE_VLLM_VENV (--vllm-venv), FASTSERVE_VLLM_PYTHON,
# FASTSERVE_WHEELS_PYTHON (--python-version), FASTSERVE_WHEELS_GLIBC (--glibc),
# PYTHON (the interpreter with torch, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
wheels="${FASTSERVE_WHEELS:-}"
venv="${FASTSERVE_GPU_VENV:-.venv-gpu}"
python_version="${FASTSERVE_WHEELS_PYTHON:-}"
glibc="${FASTSERVE_WHEELS_GLIBC:-2.28}"
prepare=""
prepare_vllm=""
vllm_version="${FASTSERVE_VLLM_VERSION:-}"
vllm_wheels="${FASTSERVE_VLLM_WHEELS:-}"
vllm_venv="${FASTSERVE_VLLM_VENV:-.venv-vllm}"
suite_flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare-wheels) prepare="$2"; shift 2 ;;
    --prepare-vllm-wheels) prepare_vllm="$2"; shift 2 ;;
    --vllm-version) vllm_version="$2"; shift 2 ;;
    --vllm-wheels) vllm_wheels="$2"; shift 2 ;;
    --vllm-venv) vllm_venv="$2"; shift 2 ;;
    --python-version) python_version="$2"; shift 2 ;;
    --glibc) glibc="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) suite_flags+=("$1"); shift ;;
  esac
done

if [ -n "$prepare_vllm" ]; then
  python_version="${python_version:-$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
  mkdir -p "$prepare_vllm"
  echo "downloading vllm${vllm_version:+==$vllm_version} (CUDA) and its dependencies for CPython $python_version into $prepare_vllm:" >&2
  "$python" -m pip download --dest "$prepare_vllm" --only-binary=:all: --implementation cp \
    --python-version "$python_version" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any "vllm${vllm_version:+==$vllm_version}"
  echo "done: copy $prepare_vllm to the GPU machine and run bench/gpu_suite.sh --vllm-wheels DIR --parts vs-vllm" >&2
  exit 0
fi

if [ -n "$prepare" ]; then
  python_version="${python_version:-$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
  # pip takes the platform tags literally: list every manylinux tag that glibc runs
  platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
  for minor in $(seq "${glibc#2.}" -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
  mkdir -p "$prepare"
  "$python" -m fastserve.bench.gpu_wheels > "$prepare/requirements.txt"
  echo "downloading wheels for CPython $python_version, Linux x86_64, glibc >= $glibc into $prepare:" >&2
  "$python" -m pip download --dest "$prepare" --only-binary=:all: --implementation cp \
    --python-version "$python_version" "${platforms[@]}" -r "$prepare/requirements.txt"
  echo "done: copy $prepare to the GPU machine and run bench/gpu_suite.sh --wheels DIR there" >&2
  exit 0
fi

started=$(date +%s)
stamp="$venv/.installed-$(cat pyproject.toml bench/gpu_suite.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  if [ -z "$wheels" ]; then
    echo "no wheels folder: pass --wheels DIR or set FASTSERVE_WHEELS (made by --prepare-wheels DIR)" >&2
    exit 2
  fi
  echo "setting up $venv from $wheels (the machine's torch and triton are used as they are)..." >&2
  "$python" -m venv --system-site-packages "$venv"
  # --system-site-packages shows the base interpreter's packages; when $python is itself a venv
  # (or conda env) holding torch, a .pth file shows its site-packages too
  "$python" -c 'import site; print("\n".join(site.getsitepackages()))' \
    > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/machine-site.pth"
  # no byte-compiling of every installed file: it doubles the install time; imports compile what they use
  "$venv/bin/python" -m pip install -q --no-compile --no-index --find-links "$wheels" -e .
  touch "$stamp"
fi
# vLLM for the vs-vllm part: named, the machine's own, or a venv of its own from the vLLM wheels
if [ -z "${FASTSERVE_VLLM_PYTHON:-}" ]; then
  if "$python" -c 'import vllm' 2>/dev/null; then
    export FASTSERVE_VLLM_PYTHON="$(command -v "$python")"
  elif [ -x "$vllm_venv/bin/python" ] && "$vllm_venv/bin/python" -c 'import vllm' 2>/dev/null; then
    export FASTSERVE_VLLM_PYTHON="$(realpath "$vllm_venv")/bin/python"
  elif [ -n "$vllm_wheels" ]; then
    echo "setting up $vllm_venv with vLLM from $vllm_wheels..." >&2
    "$python" -m venv "$vllm_venv"
    "$vllm_venv/bin/python" -m pip install -q --no-compile --no-index --find-links "$vllm_wheels" vllm
    export FASTSERVE_VLLM_PYTHON="$(realpath "$vllm_venv")/bin/python"
  fi
fi
code=0
"$venv/bin/python" -m fastserve.bench.gpu_suite ${suite_flags[@]+"${suite_flags[@]}"} || code=$?
echo "bench/gpu_suite.sh: $(($(date +%s) - started)) s in all, exit status $code" >&2
exit "$code"
