"""Build the Bi-WKV kernel variants this machine can build into the kernel-hub layout.

    python cuda/build.py                  # CPU, CUDA (when torch has CUDA) and the Triton variants
    python cuda/build.py --backend cpu triton  # what `make kernels` and CI build
    python cuda/build.py --backend cuda   # only the CUDA variant (needs a CUDA build of torch and nvcc)
    python cuda/build.py --backend triton # only the Triton variants torch-cuda, torch-rocm, torch-xpu (Python)
    python cuda/build.py --cuda-compile-only  # compile the CUDA sources to an object with nvcc, no torch CUDA

Each variant lands in `cuda/build/<variant>/` (e.g. `torch213-cxx11-cpu-x86_64-linux`) in the flattened
kernel-hub layout that `kernels.get_kernel` / `kernels.get_local_kernel` resolve: the kernel package itself
(`__init__.py`, a generated `_ops.py` and the compiled `_bi_wkv_<hash>.abi3.so`), the compatibility package
`bi_wkv/` for `kernels` versions that import `build/<variant>/bi_wkv/`, and `metadata.json` with the sha256
digest of every file (`kernels` verifies it). The op namespace carries a hash of the sources and build flags, so
different builds (CPU and CUDA) can be loaded into one process. Compilation uses torch.utils.cpp_extension
(ninja); set MAX_JOBS to bound parallel compiles.

The compiled variants follow the kernel hub's binary rules (checked by `check_hub_rules.py`, part of
`make test`): no OpenMP runtime of their own (`at::parallel_for`'s OpenMP calls bind to the one torch loads;
`omp simd` needs none), and no glibc symbol newer than 2.28 (manylinux_2_28): `compat/manylinux_2_28.h` pins
the versioned math symbols and `compat/sys/single_threaded.h` keeps libstdc++'s inline atomics from importing
`__libc_single_threaded` (glibc 2.32).
"""

import argparse
import base64
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


KERNEL_DIR = Path(__file__).resolve().parent
COMPAT_DIR = KERNEL_DIR / "compat"
# -fopenmp compiles at::parallel_for's `omp parallel` and the `omp simd` loops, but nothing links an OpenMP
# runtime: the GOMP_* / omp_* calls bind at load time to the libgomp that torch loads globally
# (libtorch_global_deps), the runtime torch's own parallel_for uses
CPU_FLAGS = ["-O3", "-fopenmp", "-fopenmp-simd", "-Wall", "-Wno-unknown-pragmas"]
# manylinux_2_28: the compat headers come first (see the module docstring)
COMPAT_FLAGS = [f"-I{COMPAT_DIR}", "-include", str(COMPAT_DIR / "manylinux_2_28.h")]
CUDA_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DBI_WKV_WITH_CUDA"]


def read_config() -> dict:
    with open(KERNEL_DIR / "build.toml", "rb") as f:
        return tomllib.load(f)


def sources_for(config: dict, backend: str) -> list[Path]:
    files = [KERNEL_DIR / s for s in config["torch"]["src"]]
    for kernel in config["kernel"].values():
        # the CUDA variant also carries the CPU implementation: CPU tensors work with either build
        if kernel["backend"] == backend or (backend == "cuda" and kernel["backend"] == "cpu"):
            files += [KERNEL_DIR / s for s in kernel["src"]]
    return list(dict.fromkeys(files))


def cuda_capabilities(config: dict) -> list[str]:
    for kernel in config["kernel"].values():
        if kernel["backend"] == "cuda":
            return kernel.get("cuda-capabilities", [])
    return []


def variant_name(backend: str) -> str:
    import torch

    version = torch.__version__.split("+")[0].split(".")
    framework = f"torch{version[0]}{version[1]}"
    if platform.system() == "Linux":
        framework += "-cxx11" if torch.compiled_with_cxx11_abi() else "-cxx98"
    if backend == "cuda":
        major, minor = torch.version.cuda.split(".")[:2]
        backend = f"cu{major}{minor}"
    machine = platform.machine().replace("AMD64", "x86_64").replace("arm64", "aarch64")
    return f"{framework}-{backend}-{machine}-{platform.system().lower()}"


def build_hash(files: list[Path], variant: str, flags: list[str]) -> str:
    digest = hashlib.sha256(variant.encode())
    digest.update(" ".join(flags).encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for path in [KERNEL_DIR / "torch-ext" / "bi_wkv" / "__init__.py", *sorted(COMPAT_DIR.rglob("*.h"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


OPS_PY = '''import torch

from . import {name}

ops = torch.ops.{name}


def add_op_namespace_prefix(op_name: str) -> str:
    """Prefix op by namespace."""
    return f"{name}::{{op_name}}"
'''

COMPAT_INIT_PY = '''"""Compatibility with `kernels` versions that import `build/<variant>/{py_name}/`: the kernel is
the flattened package one level up (`build/<variant>/__init__.py`), loaded here and re-exported."""

import importlib.util
import sys
from pathlib import Path


_variant = Path(__file__).resolve().parent.parent
# a top-level name, so that its relative imports need no parent package in sys.modules
_spec = importlib.util.spec_from_file_location(
    __name__.replace(".", "_") + "_flat", _variant / "__init__.py", submodule_search_locations=[str(_variant)]
)
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module
_spec.loader.exec_module(_module)
globals().update({{name: getattr(_module, name) for name in _module.__all__}})
__all__ = list(_module.__all__)
'''


def write_package(target: Path, py_name: str, init_py: Path, files: dict[str, Path | str]) -> None:
    """The flattened variant folder: `__init__.py` and `files` (name -> source path or text), the compatibility
    package `py_name/`, nothing else (the digest of `metadata.json` covers every file)."""
    if target.exists():
        shutil.rmtree(target)
    (target / py_name).mkdir(parents=True)
    shutil.copy2(init_py, target / "__init__.py")
    for name, source in files.items():
        if isinstance(source, Path):
            shutil.copy2(source, target / name)
        else:
            (target / name).write_text(source)
    (target / py_name / "__init__.py").write_text(COMPAT_INIT_PY.format(py_name=py_name))


def variant_digest(target: Path) -> dict:
    """The digest `kernels` checks when it loads a variant: the sha256 (base64) of every file under `target`
    but `metadata.json` and `__pycache__/`, by path relative to `target`."""
    files = {}
    for path in sorted(target.rglob("*")):
        relative = path.relative_to(target).as_posix()
        if path.is_file() and relative != "metadata.json" and "__pycache__" not in path.parts:
            files[relative] = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
    return {"algorithm": "sha256", "files": files}


def write_metadata(target: Path, metadata: dict) -> None:
    """`metadata.json`, with the layout and the digest of the variant's files."""
    metadata = {**metadata, "build-layout": "files", "digest": variant_digest(target)}
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")


def variant_metadata(config: dict, name: str, backend: str, capabilities: list[str] = ()) -> dict:
    backend_info = {"type": backend}
    if capabilities:
        backend_info["archs"] = list(capabilities)
    return {
        "name": config["general"]["name"],
        "id": name,
        "version": config["general"]["version"],
        "license": config["general"]["license"],
        "python-depends": [],
        "backend": backend_info,
    }


def build_variant(config: dict, backend: str, out_root: Path, verbose: bool) -> Path:
    from torch.utils import cpp_extension

    variant = variant_name(backend)
    files = sources_for(config, backend)
    capabilities = cuda_capabilities(config) if backend == "cuda" else []
    flags = CPU_FLAGS + (CUDA_FLAGS + capabilities if backend == "cuda" else [])
    name = f"_bi_wkv_{build_hash(files, variant, flags)}"
    py_name = config["general"]["name"].replace("-", "_")
    target = out_root / variant
    obj_dir = out_root / ".obj" / variant
    obj_dir.mkdir(parents=True, exist_ok=True)
    if (target / f"{name}.abi3.so").exists():
        # the library is current (its name hashes the sources and flags): only the package files are rewritten
        library = shutil.copy2(target / f"{name}.abi3.so", obj_dir / f"{name}.abi3.so")
        status = f"up to date ({name})"
    else:
        started = time.time()
        env_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if backend == "cuda" and not env_arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(capabilities)
        library = cpp_extension.load(
            name=name,
            sources=[str(f) for f in files if f.suffix in (".cpp", ".cu")],
            extra_cflags=COMPAT_FLAGS + CPU_FLAGS + (["-DBI_WKV_WITH_CUDA"] if backend == "cuda" else []),
            extra_cuda_cflags=CUDA_FLAGS,
            build_directory=str(obj_dir),
            with_cuda=backend == "cuda",
            is_python_module=False,
            verbose=verbose,
        )
        if env_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        status = f"built {name} in {time.time() - started:.0f} s"

    write_package(
        target,
        py_name,
        KERNEL_DIR / "torch-ext" / py_name / "__init__.py",
        {f"{name}.abi3.so": Path(library), "_ops.py": OPS_PY.format(name=name)},
    )
    write_metadata(target, variant_metadata(config, name, backend, capabilities))
    print(f"{variant}: {status}")
    return target


TRITON_SOURCES = KERNEL_DIR.parent / "src" / "rwkv_clip_hf" / "ops" / "bi_wkv"
# the GPU backends triton serves: one noarch variant each (kernels no longer parses a "universal" backend)
TRITON_BACKENDS = ("cuda", "rocm", "xpu")


def build_triton_variants(config: dict, out_root: Path) -> list[Path]:
    """The Triton Bi-WKV (the package's `ops/bi_wkv/triton_op.py` and `triton_kernels.py`) as the noarch variants
    `torch-cuda`, `torch-rocm` and `torch-xpu`: Python only, so they are always rebuilt (instantly). `kernels`
    prefers a compiled variant that matches the machine and takes these otherwise. The ops get a namespace of
    their own, `_bi_wkv_triton_<hash>`, so that the package's copy and a loaded kernel can live in one process."""
    py_name = config["general"]["name"].replace("-", "_")
    sources = {name: (TRITON_SOURCES / name).read_text() for name in ("triton_op.py", "triton_kernels.py")}
    init_py = KERNEL_DIR / "torch-ext" / "triton" / "__init__.py"
    digest = hashlib.sha256(init_py.read_bytes())
    for name, text in sources.items():
        digest.update(name.encode() + text.encode())
    name = f"_bi_wkv_triton_{digest.hexdigest()[:10]}"
    namespace_line = 'OP_NAMESPACE = "rwkv_clip_hf"\n'
    if sources["triton_op.py"].count(namespace_line) != 1:
        sys.exit(f"build.py: {TRITON_SOURCES / 'triton_op.py'} must set {namespace_line.strip()} exactly once")
    sources["triton_op.py"] = sources["triton_op.py"].replace(namespace_line, f'OP_NAMESPACE = "{name}"\n')
    targets = []
    for backend in TRITON_BACKENDS:
        target = out_root / f"torch-{backend}"
        write_package(target, py_name, init_py, sources)
        write_metadata(target, variant_metadata(config, name, backend))
        targets.append(target)
    print(f"{', '.join(t.name for t in targets)}: Triton variants {name}")
    return targets


def cuda_compile_only(config: dict, out_root: Path) -> None:
    """Compile the CUDA translation units to objects with nvcc: a check that works without a CUDA torch."""
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    gencode = []
    for cap in cuda_capabilities(config):
        num = cap.removesuffix("+PTX").replace(".", "")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if cap.endswith("+PTX"):  # also embed PTX, JIT-compiled on newer GPUs
            gencode += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(__import__('torch').compiled_with_cxx11_abi())}"
    obj_dir = out_root / ".obj" / "cuda-compile-only"
    obj_dir.mkdir(parents=True, exist_ok=True)
    # a CPU build of torch ships the c10/cuda headers without this generated one; its CUDA builds define it so
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / generated).exists() for p in cpp_extension.include_paths()):
        stub = obj_dir / "stub-include" / generated
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{obj_dir / 'stub-include'}")
    for source in sources_for(config, "cuda"):
        if source.suffix != ".cu":
            continue
        started = time.time()
        command = [nvcc, "-c", str(source), "-o", str(obj_dir / (source.stem + ".o")), "-Xcompiler", "-fPIC", abi]
        command += CUDA_FLAGS + ["-std=c++20"] + includes + gencode + ["-DTORCH_EXTENSION_NAME=_bi_wkv_check"]
        subprocess.run(command, check=True)
        print(f"{source.name}: compiled for {', '.join(cuda_capabilities(config))} in {time.time() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backend",
        choices=["auto", "cpu", "cuda", "triton"],
        nargs="+",
        default=["auto"],
        help="auto: cpu, cuda when torch has CUDA, and triton (the Python/Triton noarch variants)",
    )
    parser.add_argument("--out", type=Path, default=KERNEL_DIR / "build", help="the build/ folder of the kernel repo")
    parser.add_argument("--cuda-compile-only", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    config = read_config()

    if args.cuda_compile_only:
        cuda_compile_only(config, args.out)
        return

    import torch

    backends = []
    for backend in args.backend:
        auto = ["cpu"] + (["cuda"] if torch.version.cuda else []) + ["triton"]
        backends += [b for b in (auto if backend == "auto" else [backend]) if b not in backends]
    if "cuda" in backends and torch.version.cuda is None:
        sys.exit("build.py: the CUDA variant needs a CUDA build of torch (--cuda-compile-only checks the sources)")
    for backend in backends:
        if backend == "triton":
            build_triton_variants(config, args.out)
        else:
            build_variant(config, backend, args.out, args.verbose)


if __name__ == "__main__":
    main()
