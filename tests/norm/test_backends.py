"""The kernel-backend table (abnexp.norm.backends): ABNEXP_KERNELS, auto's order, fallbacks.

The backends' own numerics are tested per backend (test_kernels.py: native; test_triton_backend.py:
Triton under its interpreter); here, which backend serves a tensor and what the user is told.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

from abnexp.norm import InPlaceABN, backends


@pytest.fixture
def table(monkeypatch):
    """A private table: fake probes and cache, so no build or Triton import happens."""
    probes = {}
    fake = {name: backends.Backend(b.summary, lambda dt, n=name: probes.get((n, dt)), b.namespace, b.build)
            for name, b in backends.BACKENDS.items()}
    monkeypatch.setattr(backends, "BACKENDS", fake)
    monkeypatch.setattr(backends, "_CHOSEN", {})
    monkeypatch.setattr(backends, "_WARNED", set())
    return probes


@pytest.mark.parametrize("env, expected", [({}, "auto"), ({"ABNEXP_KERNELS": "Triton"}, "triton"),
                                           ({"ABNEXP_KERNELS": "native", "ABNEXP_NATIVE": "0"}, "torch")])
def test_request_from_environment(env, expected, monkeypatch):
    for key in ("ABNEXP_KERNELS", "ABNEXP_NATIVE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert backends.requested_from_env() == expected


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("ABNEXP_KERNELS", "cudnn")
    with pytest.raises(backends.KernelBackendError, match="'cudnn'.*valid: auto, native, triton, torch"):
        backends.requested_from_env()


def test_auto_order_per_device(table):
    assert backends.choose("cpu", "auto") == "native"
    assert backends.choose("cuda", "auto") == "triton"
    assert backends.choose("mps", "auto") == "torch"


def test_gpu_falls_back_in_order_and_says_why(table, caplog):
    table[("triton", "cuda")] = "triton is not installed"
    with caplog.at_level(logging.INFO, logger="abnexp.norm.backends"):
        assert backends.choose("cuda", "auto") == "native"
    assert "cuda tensors use the native module" in caplog.text and "triton is not installed" in caplog.text


def test_gpu_reference_path_warns_once(table):
    table[("triton", "cuda")] = "triton is not installed"
    table[("native", "cuda")] = "built without CUDA kernels"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.choose("cuda", "auto") == "torch"
        backends._CHOSEN.clear()
        assert backends.choose("cuda", "auto") == "torch"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "reference path" in messages[0] and "triton is not installed" in messages[0]
    assert "built without CUDA kernels" in messages[0]


def test_named_backend_raises_instead_of_falling_back(table):
    table[("triton", "cpu")] = "CPU tensors need TRITON_INTERPRET=1"
    with pytest.raises(backends.KernelBackendError, match="ABNEXP_KERNELS=triton cannot run cpu tensors: "
                                                          "CPU tensors need TRITON_INTERPRET=1"):
        backends.choose("cpu", "triton")


def test_torch_backend_keeps_layers_off_the_kernels(table, monkeypatch):
    monkeypatch.setattr(backends, "REQUESTED", "torch")
    monkeypatch.setattr(backends, "ops", lambda x: pytest.fail("a kernel backend was called"))
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    InPlaceABN(4)(x.clone()).sum().backward()
    assert x.grad is not None


@pytest.mark.slow  # a subprocess imports torch
def test_named_triton_without_interpreter_fails_with_reason():
    """ABNEXP_KERNELS=triton on a CPU tensor (no TRITON_INTERPRET) raises a one-line error, no fallback."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ABNEXP_KERNELS"] = "triton"
    script = ("import torch\nfrom abnexp.norm import InPlaceABN\n"
              "InPlaceABN(3)(torch.randn(2, 3, 4, 4))\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ABNEXP_KERNELS=triton cannot run cpu tensors" in done.stderr
