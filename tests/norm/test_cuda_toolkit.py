"""Finding the CUDA toolkit and failing loudly (abnexp.norm.cuda_toolkit, abnexp.norm.native.build).

Fake toolkits are shell scripts in temporary folders that answer nvcc's queries (``--version``,
``--list-gpu-arch``, ``--dryrun``'s ``_HERE_`` line) as a real nvcc does; the builds themselves
are replaced by a recorder, so nothing compiles here.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from abnexp.norm import cuda_toolkit, native


def fake_toolkit(root: Path, release: str = "13.0", archs=("75", "80", "90", "100")) -> Path:
    """``root/cuda-<release>/bin/nvcc``, a script answering like nvcc; returns the toolkit folder."""
    home = root / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n"
                    'case "$*" in\n'
                    f'  *--dryrun*) echo "#$ _HERE_={home / "bin"}";;\n'
                    f'  *--list-gpu-arch*) echo "{" ".join("compute_" + a for a in archs)}";;\n'
                    f'  *--version*) echo "Cuda compilation tools, release {release}, V{release}.88";;\n'
                    "  *) exit 1;;\n"
                    "esac\n")
    nvcc.chmod(0o755)
    return home


def put_on_path(monkeypatch, folder: Path) -> None:
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")


def wrapper(root: Path, target: Path) -> Path:
    """``root/wrap/nvcc``: ``exec <target> "$@"``, as /usr/local/bin/nvcc on some machines."""
    folder = root / "wrap"
    folder.mkdir()
    (folder / "nvcc").write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    (folder / "nvcc").chmod(0o755)
    return folder


def test_wrapper_script_on_path_is_followed_to_its_toolkit(tmp_path, monkeypatch):
    home = fake_toolkit(tmp_path)
    put_on_path(monkeypatch, wrapper(tmp_path, home / "bin" / "nvcc"))
    assert cuda_toolkit.cuda_home() == str(home)  # torch's guess would be tmp_path (the wrapper's parent)
    assert cuda_toolkit.nvcc() == str(home / "bin" / "nvcc")


@pytest.mark.skipif(not Path("/bin/true").is_file(), reason="needs an ELF binary to stand for nvcc (/bin/true)")
def test_symlink_on_path_is_followed_to_the_binary(tmp_path, monkeypatch):
    home = tmp_path / "opt" / "cuda-12.8"
    (home / "bin").mkdir(parents=True)
    shutil.copy("/bin/true", home / "bin" / "nvcc")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(home / "bin" / "nvcc")
    put_on_path(monkeypatch, tmp_path / "links")
    assert cuda_toolkit.cuda_home() == str(home)


def test_cuda_home_comes_first(tmp_path, monkeypatch):
    path_home, env_home = fake_toolkit(tmp_path / "a"), fake_toolkit(tmp_path / "b", "12.8")
    put_on_path(monkeypatch, path_home / "bin")
    monkeypatch.setenv("CUDA_HOME", str(env_home))
    assert cuda_toolkit.nvcc() == str(env_home / "bin" / "nvcc")


@pytest.mark.parametrize("toolkit, torch_cuda, bad", [("12.4", "13.0", True), ("13.1", "13.0", False),
                                                      ("13.0", "12.8", True)])
def test_major_version_mismatch_is_a_problem_with_its_fix(tmp_path, monkeypatch, toolkit, torch_cuda, bad):
    put_on_path(monkeypatch, fake_toolkit(tmp_path, toolkit) / "bin")
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    problem = cuda_toolkit.problem()
    if not bad:
        assert problem is None
        return
    assert f"CUDA {toolkit}" in problem and f"built with CUDA {torch_cuda}" in problem
    assert "CUDA_HOME" in problem and "ABNEXP_KERNELS=triton" in problem


def test_architectures_the_toolkit_dropped_are_left_out_with_a_warning(tmp_path, monkeypatch):
    put_on_path(monkeypatch, fake_toolkit(tmp_path, archs=("75", "80", "90", "100")) / "bin")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0 8.0 9.0a 10.0+PTX")
    monkeypatch.setattr(cuda_toolkit, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match=r"cannot compile for 7\.0 \(it compiles 7\.5 to 10\.0\)"):
        assert cuda_toolkit.cuda_archs() == ("8.0", "9.0a", "10.0+PTX")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "6.0;7.0")
    with pytest.warns(RuntimeWarning):
        assert "compiles none of the architectures 6.0, 7.0" in cuda_toolkit.problem()


def test_torch_without_cuda_is_a_problem(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "Triton" in cuda_toolkit.problem()


@pytest.fixture
def recorded_builds(monkeypatch):
    """native.build with a visible GPU; each compile is recorded (its ``cuda`` flag) instead of run."""
    calls = []

    def load(cuda, verbose):
        calls.append(cuda)
        if cuda and load.fail:
            raise native.KernelBuildError("building the native kernels (x) failed: nvcc error")
        return native.BuildInfo("x", "x.so", cuda, (), (), 0.0)

    load.fail = False
    monkeypatch.setattr(native, "_BUILT", None)
    monkeypatch.setattr(native, "_load", load)
    monkeypatch.setattr(native, "_register_fakes", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls, load


def test_gpu_without_a_usable_toolkit_warns_and_builds_the_cpu_kernels(recorded_builds, monkeypatch):
    calls, _ = recorded_builds
    monkeypatch.setattr(cuda_toolkit, "problem", lambda: "nvcc at /x is CUDA 12.4 but torch ... CUDA 13.0")
    with pytest.warns(RuntimeWarning, match=r"GPU is visible but the native CUDA kernels were not built: nvcc at /x "
                                            r"is CUDA 12\.4.*abnexp kernels build --cuda"):
        info = native.build()
    assert calls == [False] and not info.cuda


def test_gpu_with_a_failing_cuda_compile_warns_and_builds_the_cpu_kernels(recorded_builds, monkeypatch):
    calls, load = recorded_builds
    load.fail = True
    monkeypatch.setattr(cuda_toolkit, "problem", lambda: None)
    with pytest.warns(RuntimeWarning, match=r"compiling them failed \(building the native kernels \(x\) failed: nvcc"):
        info = native.build()
    assert calls == [True, False] and not info.cuda


def test_cuda_asked_for_by_name_raises_the_problem(monkeypatch):
    monkeypatch.setattr(native, "_BUILT", None)
    monkeypatch.setattr(cuda_toolkit, "problem", lambda: "no CUDA toolkit: the nvcc on PATH is a wrapper")
    with pytest.raises(native.KernelBuildError, match="no CUDA toolkit: the nvcc on PATH is a wrapper"):
        native.build(cuda=True)
