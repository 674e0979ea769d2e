"""Check built Bi-WKV variants against the kernel hub's rules.

    python cuda/check_hub_rules.py                       # every variant under cuda/build/
    python cuda/check_hub_rules.py cuda/build/<variant>  # the given ones

Per variant folder:
* layout: `metadata.json`, the flattened kernel package (`__init__.py`; compiled variants also `_ops.py` and one
  `_bi_wkv_<hash>.abi3.so`, noarch variants `torch-<backend>` no shared object) and the compatibility package
  `bi_wkv/__init__.py`;
* `metadata.json` parses with `kernels`, names the files layout and carries a digest that matches the files;
* every shared object: no OpenMP runtime among the libraries it needs (torch brings its own; a second one in the
  process breaks thread pools), and no glibc symbol version newer than 2.28 (manylinux_2_28). Read with readelf.

Prints one line per variant and every violation; exits 1 when there is any.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
PY_NAME = "bi_wkv"
MAX_GLIBC = (2, 28)
OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def _readelf(*args: str) -> str:
    readelf = shutil.which("readelf")
    if readelf is None:
        raise SystemExit("check_hub_rules.py: readelf (binutils) is needed to check the shared objects")
    return subprocess.run([readelf, "--wide", *args], check=True, capture_output=True, text=True).stdout


def needed_libraries(so: Path) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _readelf("--dynamic", str(so)))


def glibc_symbols(so: Path) -> dict[str, tuple[int, ...]]:
    """Undefined dynamic symbols bound to a GLIBC_x.y version: name -> version."""
    symbols = {}
    for line in _readelf("--dyn-syms", str(so)).splitlines():
        match = re.search(r"\bUND\s+(\S+?)@GLIBC_([0-9.]+)", line)
        if match:
            symbols[match.group(1)] = tuple(int(part) for part in match.group(2).split("."))
    return symbols


def check_shared_object(so: Path) -> list[str]:
    problems = []
    for library in needed_libraries(so):
        if library.startswith(OPENMP_RUNTIMES):
            problems.append(f"{so.name} links the OpenMP runtime {library} (torch provides the one to use)")
    for name, version in sorted(glibc_symbols(so).items()):
        if version > MAX_GLIBC:
            problems.append(
                f"{so.name} needs {name}@GLIBC_{'.'.join(map(str, version))}, newer than manylinux_2_28's glibc 2.28"
            )
    return problems


def check_variant(variant: Path) -> list[str]:
    from kernels import Metadata

    problems = []
    if not (variant / "metadata.json").is_file():
        return [f"no metadata.json in {variant}"]
    try:
        metadata = Metadata.read_from_file(variant / "metadata.json")
    except ValueError as error:
        return [f"metadata.json does not parse with kernels: {error}"]
    raw = json.loads((variant / "metadata.json").read_text())
    if raw.get("build-layout") != "files":
        problems.append('metadata.json: "build-layout" is not "files"')
    if not (variant / "__init__.py").is_file():
        problems.append("no top-level __init__.py (the flattened layout)")
    if not (variant / PY_NAME / "__init__.py").is_file():
        problems.append(f"no compatibility package {PY_NAME}/__init__.py")
    shared_objects = sorted(variant.glob("*.so"))
    # noarch variants (torch-<backend>, e.g. the Triton ones) are Python only; the others are compiled
    if re.fullmatch(r"torch-[a-z]+", variant.name):
        if shared_objects:
            problems.append(f"a noarch variant holds shared objects: {[p.name for p in shared_objects]}")
    else:
        if len(shared_objects) != 1 or shared_objects[0].name != f"{metadata.id}.abi3.so":
            problems.append(f"expected one {metadata.id}.abi3.so, found {[p.name for p in shared_objects]}")
        if not (variant / "_ops.py").is_file():
            problems.append("no _ops.py")
    for nested in sorted(variant.rglob("*.so")):
        if nested.parent != variant:
            problems.append(f"shared object outside the variant's top level: {nested.relative_to(variant)}")

    digest = raw.get("digest")
    if metadata.digest is None or digest is None:
        problems.append("metadata.json records no digest")
    else:
        sys.path.insert(0, str(KERNEL_DIR))
        from build import variant_digest

        actual = variant_digest(variant)
        if digest != actual:
            differing = sorted(set(digest["files"].items()) ^ set(actual["files"].items()))
            problems.append(f"the digest does not match the files: {sorted({name for name, _ in differing})}")
    for so in sorted(variant.rglob("*.so")):
        problems += check_shared_object(so)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", type=Path)
    args = parser.parse_args()
    variants = args.variants or sorted(p for p in (KERNEL_DIR / "build").glob("*") if not p.name.startswith("."))
    if not variants:
        sys.exit("check_hub_rules.py: no variants under cuda/build/ (run `make kernels`)")
    failed = False
    for variant in variants:
        problems = check_variant(variant)
        print(f"{variant.name}: {'ok' if not problems else f'{len(problems)} violation(s)'}")
        for problem in problems:
            print(f"  - {problem}")
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
