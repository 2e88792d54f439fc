"""llama.cpp: its C++ ``llama-server``, built once from the source vendored in the
``llama-cpp-python`` sdist, serving the bundled GGUF; or, where that build cannot work,
``llama-cpp-python[server]`` (whose Python server serializes requests).

The build downloads the sdist with pip (a package registry; no weights), configures with the
flags in GUIDE §5, builds only the ``llama-server`` target, and keeps ``bin/`` (the server and its
shared libraries, linked with ``$ORIGIN`` run paths so they survive the rename) plus ``BUILD.json``
under ``cache_dir()/llamacpp/<version>/``. It all happens in a hidden staging directory that is
renamed into place at the end, so a killed build leaves nothing that looks complete.

Leaves out: GPU back-ends (CUDA/Metal flags), the web UI, speculative decoding, GGUF downloads.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from engines_compare.launchers.common import LauncherError, atomic_dir, run_logged

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# GUIDE §5, exactly: without the two UI flags the build tries to download the web UI.
CMAKE_FLAGS = ("-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")
# Ours: relative run paths, so bin/ still finds libllama.so & co. after the staging dir is renamed.
RPATH_FLAGS = ("-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",)
NICE = ("nice", "-n", "10")
BUILD_COMMAND = "python -m engines_compare launch llamacpp --build"
GGUF_DTYPE = "Q4_K_M"  # the bundled GGUF's quantization (a custom .gguf may differ)
FALLBACK_NOTES = "serializes requests (llama-cpp-python's Python server, not llama-server)"


@dataclasses.dataclass(frozen=True, slots=True)
class ServeOptions:
    threads: int = 2
    ctx: int = 8192
    parallel: int = 16


def install_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    from shared.models import cache_dir

    return cache_dir() / "llamacpp" / version


def server_binary(root: Path) -> Path:
    return root / "bin" / "llama-server"


def fallback_venv(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    from shared.models import cache_dir

    return cache_dir() / "llamacpp" / f"python-venv-{version}"


def fallback_marker(venv: Path) -> Path:
    return venv / "stepserve-installed.json"


# ---- pure command builders -------------------------------------------------------------------

def download_command(python: str, version: str, dest: Path) -> list[str]:
    return [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={version}", "-d", str(dest)]


def configure_command(src: Path, build: Path) -> list[str]:
    return [*NICE, "cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS, *RPATH_FLAGS]


def compile_command(build: Path, jobs: int = 2) -> list[str]:
    return [*NICE, "cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"]


def server_command(binary: Path, gguf: Path, port: int, alias: str, opts: ServeOptions) -> list[str]:
    """GUIDE §5's command, plus ``--alias`` so /v1/models and responses name the served model."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-c", str(opts.ctx), "-np", str(opts.parallel), "-t", str(opts.threads), "--metrics",
            "--alias", alias]


def fallback_command(python: Path, gguf: Path, port: int, alias: str, opts: ServeOptions) -> list[str]:
    """llama-cpp-python's server; without ``--interrupt_requests False`` a new request cuts off
    running streams. It has no parallel slots: ``opts.parallel`` does not apply."""
    return [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(opts.ctx),
            "--n_threads", str(opts.threads), "--interrupt_requests", "False"]


# ---- state -----------------------------------------------------------------------------------

def is_built(root: Path) -> bool:
    return server_binary(root).is_file() and (root / "BUILD.json").is_file()


def fallback_installed(venv: Path) -> bool:
    return fallback_marker(venv).is_file()


def version_string(binary: Path) -> str:
    """``llama-server --version`` squeezed to one line, e.g. ``version: 1 (0c1e570) built with ...``."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    keep = [ln for ln in lines if ln.startswith(("version", "built with"))] or lines[-2:]
    return "llama.cpp " + " ".join(keep)


# ---- the one-time setup ----------------------------------------------------------------------

def build(version: str = LLAMA_CPP_PYTHON_VERSION, sdist: Path | None = None, jobs: int = 2,
          log_path: Path | None = None) -> Path:
    """Download the sdist (unless given), build llama-server, and move it into place atomically."""
    final = install_dir(version)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LauncherError(f"building llama-server needs {tool!r} on PATH")
    log_path = log_path or final.parent / f"build-{version}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        if sdist is None:
            run_logged(download_command(sys.executable, version, tmp), log_path)
            sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        src = _extract(sdist, tmp / "src")
        run_logged(configure_command(src / "vendor" / "llama.cpp", tmp / "build"), log_path)
        run_logged(compile_command(tmp / "build", jobs), log_path)
        _keep_only_bin(tmp)
        info = {"llama_cpp_python": version, "commit": _vendored_commit(src),
                "cmake_flags": [*CMAKE_FLAGS, *RPATH_FLAGS], "sdist": sdist.name}
        shutil.rmtree(tmp / "src")
        info["version"] = version_string(server_binary(tmp))
        (tmp / "BUILD.json").write_text(json.dumps(info, indent=2) + "\n")
    return final


def _extract(sdist: Path, dest: Path) -> Path:
    """Unpack the whole sdist: its .git/modules lets llama.cpp's build-info find the commit."""
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (root,) = [p for p in dest.iterdir() if p.is_dir()]
    return root


def _vendored_commit(src: Path) -> str:
    head = src / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    return head.read_text().strip() if head.is_file() else "unknown"


def _keep_only_bin(tmp: Path) -> None:
    """Keep llama-server and the shared libraries it loads; drop objects, sdist and sources."""
    built = tmp / "build" / "bin"
    (tmp / "bin").mkdir()
    for f in built.iterdir():
        if f.name == "llama-server" or ".so" in f.name:
            shutil.copy2(f, tmp / "bin" / f.name, follow_symlinks=False)
    shutil.rmtree(tmp / "build")
    for f in tmp.glob("*.tar.gz"):
        f.unlink()


def install_fallback(version: str = LLAMA_CPP_PYTHON_VERSION, log_path: Path | None = None) -> Path:
    """``pip install llama-cpp-python[server]`` into its own venv (compiles: 12–20 minutes)."""
    venv = fallback_venv(version)
    log_path = log_path or venv.parent / f"python-install-{version}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(venv, ignore_errors=True)  # a venv cannot be renamed: the marker says "complete"
    run_logged([sys.executable, "-m", "venv", str(venv)], log_path)
    run_logged([*NICE, str(venv / "bin" / "python"), "-m", "pip", "install",
                f"llama-cpp-python[server]=={version}"], log_path)
    fallback_marker(venv).write_text(json.dumps({"llama_cpp_python": version}) + "\n")
    return venv


def setup(version: str = LLAMA_CPP_PYTHON_VERSION, sdist: Path | None = None) -> str:
    """The ``--build`` step: llama-server if it builds here, else the Python fallback."""
    try:
        root = build(version, sdist)
        return f"built {server_binary(root)}: {json.loads((root / 'BUILD.json').read_text())['version']}"
    except LauncherError as e:
        print(f"llama-server build failed, installing llama-cpp-python[server] instead:\n{e}",
              file=sys.stderr)
    venv = install_fallback(version)
    return f"installed llama-cpp-python[server] {version} in {venv} ({FALLBACK_NOTES})"
