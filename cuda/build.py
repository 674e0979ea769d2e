"""Build the Bi-WKV kernel variants this machine can build into the kernel-hub layout.

    python cuda/build.py                  # CPU variant (always) and CUDA variant (when torch has CUDA)
    python cuda/build.py --backend cpu    # only the CPU variant (what `make kernels` and CI build)
    python cuda/build.py --backend cuda   # only the CUDA variant (needs a CUDA build of torch and nvcc)
    python cuda/build.py --cuda-compile-only  # compile the CUDA sources to an object with nvcc, no torch CUDA

Each variant lands in `cuda/build/<variant>/` (e.g. `torch213-cxx11-cpu-x86_64-linux`) with `metadata.json`
and the Python package `bi_wkv/` (`__init__.py`, a generated `_ops.py` and the compiled `_bi_wkv_<hash>.abi3.so`),
which is what `kernels.get_kernel` / `kernels.get_local_kernel` resolve. The op namespace carries a hash of
the sources and build flags, so different builds (CPU and CUDA) can be loaded into one process.
Compilation uses torch.utils.cpp_extension (ninja); set MAX_JOBS to bound parallel compiles.
"""

import argparse
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
CPU_FLAGS = ["-O3", "-fopenmp", "-fopenmp-simd", "-Wall", "-Wno-unknown-pragmas"]
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
    digest.update((KERNEL_DIR / "torch-ext" / "bi_wkv" / "__init__.py").read_bytes())
    return digest.hexdigest()[:10]


OPS_PY = '''import torch

from . import {name}

ops = torch.ops.{name}


def add_op_namespace_prefix(op_name: str) -> str:
    """Prefix op by namespace."""
    return f"{name}::{{op_name}}"
'''


def build_variant(config: dict, backend: str, out_root: Path, verbose: bool) -> Path:
    from torch.utils import cpp_extension

    variant = variant_name(backend)
    files = sources_for(config, backend)
    capabilities = cuda_capabilities(config) if backend == "cuda" else []
    flags = CPU_FLAGS + (CUDA_FLAGS + capabilities if backend == "cuda" else [])
    name = f"_bi_wkv_{build_hash(files, variant, flags)}"
    py_name = config["general"]["name"].replace("-", "_")
    target = out_root / variant
    package = target / py_name
    if (package / f"{name}.abi3.so").exists() and (target / "metadata.json").exists():
        print(f"{variant}: up to date ({name})")
        return target

    started = time.time()
    obj_dir = out_root / ".obj" / variant
    obj_dir.mkdir(parents=True, exist_ok=True)
    env_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if backend == "cuda" and not env_arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(capabilities)
    library = cpp_extension.load(
        name=name,
        sources=[str(f) for f in files if f.suffix in (".cpp", ".cu")],
        extra_cflags=CPU_FLAGS + (["-DBI_WKV_WITH_CUDA"] if backend == "cuda" else []),
        extra_cuda_cflags=CUDA_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(obj_dir),
        with_cuda=backend == "cuda",
        is_python_module=False,
        verbose=verbose,
    )
    if env_arch is None:
        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)

    if target.exists():
        shutil.rmtree(target)
    package.mkdir(parents=True)
    shutil.copy2(library, package / f"{name}.abi3.so")
    shutil.copy2(KERNEL_DIR / "torch-ext" / py_name / "__init__.py", package / "__init__.py")
    (package / "_ops.py").write_text(OPS_PY.format(name=name))
    backend_info = {"type": backend}
    if capabilities:
        backend_info["archs"] = capabilities
    metadata = {
        "name": config["general"]["name"],
        "id": name,
        "version": config["general"]["version"],
        "license": config["general"]["license"],
        "python-depends": [],
        "backend": backend_info,
    }
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"{variant}: built {name} in {time.time() - started:.0f} s")
    return target


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
    parser.add_argument("--backend", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=KERNEL_DIR / "build", help="the build/ folder of the kernel repo")
    parser.add_argument("--cuda-compile-only", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    config = read_config()

    if args.cuda_compile_only:
        cuda_compile_only(config, args.out)
        return

    import torch

    backends = [args.backend] if args.backend != "auto" else ["cpu"] + (["cuda"] if torch.version.cuda else [])
    if "cuda" in backends and torch.version.cuda is None:
        sys.exit("build.py: the CUDA variant needs a CUDA build of torch (--cuda-compile-only checks the sources)")
    for backend in backends:
        build_variant(config, backend, args.out, args.verbose)


if __name__ == "__main__":
    main()
