"""The prebuilt Bi-WKV kernel, loaded from the kernel hub with `kernels.get_kernel` and cached per device type.

The kernel (sources in `cuda/` of the repository) is a kernel-hub repository with CPU and CUDA build variants.
`kernels` picks the variant that matches the installed torch, C++ ABI, backend and platform; the environment
variable `LOCAL_KERNELS=<repo-id>=<path>` (a `kernels` feature) points a repo id at a local folder holding
`build/<variant>/` (e.g. the output of `make kernels`), which is how tests, benchmarks and development use it
without the Hub (the Makefile sets it).

Which implementation an op uses is chosen by its `backend` argument (`BACKENDS`); the models pass the value set
with `RWKVCLIPPreTrainedModel.set_kernel_backend`, whose default is `default_backend()`.

Environment:
    RWKV_CLIP_KERNEL_BACKEND: the default backend of newly built models ("auto" when unset); read when a
        model is built, never during a forward.
    RWKV_CLIP_BI_WKV_KERNEL_REPO: the kernel repo id (default `DEFAULT_KERNEL_REPO`).
    RWKV_CLIP_BI_WKV_TRUST_REMOTE_CODE=1: allow downloading the kernel from a publisher that the Hub does not
        list as a trusted kernel publisher (`kernels` refuses those otherwise). Local overrides and, in offline
        mode, already cached kernels need no trust flag.
"""

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

DEFAULT_KERNEL_REPO = "rwkv-clip-hf/bi-wkv"
KERNEL_VERSION = 1
REPO_ENV = "RWKV_CLIP_BI_WKV_KERNEL_REPO"
TRUST_ENV = "RWKV_CLIP_BI_WKV_TRUST_REMOTE_CODE"
# "auto": the prebuilt kernel when it loads for the tensors' device, else (on a GPU) the Triton kernels when triton
# runs there, else the PyTorch path; "kernel": the prebuilt kernel or KernelUnavailableError; "torch": the PyTorch
# path, never asking for a kernel; "triton": the Triton kernels (ops/bi_wkv/triton_op.py).
BACKENDS = ("auto", "kernel", "torch", "triton")
BACKEND_ENV = "RWKV_CLIP_KERNEL_BACKEND"
_LEGACY_BACKEND_ENV = "RWKV_CLIP_BI_WKV_BACKEND"  # its earlier name, still read
# device types the kernel is built for
_DEVICE_TYPES = ("cpu", "cuda")


def check_backend(backend: str, name: str = "backend") -> str:
    """`backend` if it is one of `BACKENDS`, else a ValueError naming `name`."""
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {backend!r}")
    return backend


def default_backend() -> str:
    """The backend new models start with: $RWKV_CLIP_KERNEL_BACKEND, else "auto"."""
    for variable in (BACKEND_ENV, _LEGACY_BACKEND_ENV):
        value = os.environ.get(variable, "").strip()
        if value:
            return check_backend(value, f"${variable}")
    return "auto"


class KernelUnavailableError(RuntimeError):
    """The prebuilt Bi-WKV kernel cannot be used for the requested device."""


# (repo id, device type, LOCAL_KERNELS) -> loaded kernel module, or the exception that prevented loading
_loaded: dict[tuple[str, str, str], object] = {}
_lock = threading.Lock()


def kernel_repo_id(repo_id: str | None = None) -> str:
    """The kernel repo id: `repo_id` if given, else $RWKV_CLIP_BI_WKV_KERNEL_REPO, else `DEFAULT_KERNEL_REPO`."""
    return repo_id or os.environ.get(REPO_ENV) or DEFAULT_KERNEL_REPO


def _trust_remote_code() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _get_kernel(repo_id: str, device_type: str):
    import kernels

    trust = _trust_remote_code()
    if device_type == "cpu":
        try:
            return kernels.get_kernel(repo_id, version=KERNEL_VERSION, backend="cpu", trust_remote_code=trust)
        except Exception:
            if torch.version.cuda is None:
                raise
            # a CUDA build also registers the CPU implementation
    return kernels.get_kernel(repo_id, version=KERNEL_VERSION, trust_remote_code=trust)


def _load(repo_id: str, device_type: str):
    if device_type not in _DEVICE_TYPES:
        raise KernelUnavailableError(f"the Bi-WKV kernel has no {device_type} implementation (only cpu and cuda)")
    module = _get_kernel(repo_id, device_type)
    # one tiny call proves that the loaded build runs on this device type (a CPU-only build raises for CUDA)
    probe = torch.zeros(1, 1, 1, 16, device=device_type)
    try:
        with torch.no_grad():
            module.bi_wkv(probe, probe, probe, probe, probe[0, 0])
    except Exception as error:
        raise KernelUnavailableError(
            f"the loaded build of {repo_id} does not run on {device_type}: {type(error).__name__}: {error}"
        ) from error
    return module


def load_kernel(device_type: str, repo_id: str | None = None):
    """The kernel module for tensors on `device_type` ("cpu", "cuda"), loaded once per repo and device type.

    Raises `KernelUnavailableError` (with the reason) when it cannot be loaded; the failure is cached too, so
    the Hub is asked at most once per process.
    """
    repo_id = kernel_repo_id(repo_id)
    key = (repo_id, device_type, os.environ.get("LOCAL_KERNELS", ""))
    with _lock:
        if key not in _loaded:
            try:
                _loaded[key] = _load(repo_id, device_type)
            except Exception as error:  # missing, incompatible or broken builds all mean: no kernel
                _loaded[key] = error
        result = _loaded[key]
    if isinstance(result, Exception):
        raise KernelUnavailableError(
            f"Bi-WKV kernel {repo_id!r} (version {KERNEL_VERSION}) is unavailable for {device_type} tensors: "
            f"{type(result).__name__}: {result}. Build it with `make kernels` and point LOCAL_KERNELS="
            f"{repo_id}=<path to cuda/> at it, or publish the build variants to the Hub "
            f"(README, 'Bi-WKV kernel')."
        ) from result
    return result


_reported: set[tuple] = set()


@torch.compiler.assume_constant_result
def resolve_kernel(device_type: str, backend: str, repo_id: str | None = None) -> str:
    """Which kernel `backend` ("auto", "kernel", "torch") uses for `device_type`: the key of the loaded kernel
    module in the cache, or "" for the PyTorch path. Logs once per repo and device why "auto" falls back.

    A constant for torch.compile, which calls it while tracing, so that loading never breaks the graph.
    """
    check_backend(backend)
    if backend == "torch":
        return ""
    try:
        load_kernel(device_type, repo_id)
    except KernelUnavailableError as error:
        if backend == "kernel":
            raise
        reason = (kernel_repo_id(repo_id), device_type)
        if reason not in _reported:
            _reported.add(reason)
            # on CPU the PyTorch path is the expected default of an installed package; on GPUs it costs more
            log = logger.warning if device_type == "cuda" else logger.info
            fallback = (
                "the PyTorch chunked path"
                if device_type == "cpu"
                else "the Triton kernels or the PyTorch chunked path"
            )
            log("%s Using %s instead.", error, fallback)
        return ""
    return "\x00".join((kernel_repo_id(repo_id), device_type, os.environ.get("LOCAL_KERNELS", "")))


def kernel_module(key: str):
    """The module cached under a key returned by `resolve_kernel`."""
    return _loaded[tuple(key.split("\x00"))]


def clear_cache() -> None:
    """Forget loaded kernels and failures (tests; a new build in the same process needs a new namespace anyway)."""
    with _lock:
        _loaded.clear()
        _reported.clear()
