"""Launch options per kernel (``momkit.kernels._common.LAUNCH``, and ``MOMKIT_LAUNCH`` for every process that
imports the kernels, sweep workers included), parsed with one clear error for a bad item or option. (Results
under other block sizes: ``test_chunk_kernels.py``.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from momkit.kernels import _common


def test_a_bad_environment_variable_is_one_line_from_the_command_line(tmp_path):
    """``momkit train`` on the kernel path with a misspelt kernel name in MOMKIT_LAUNCH: exit 2 and one line naming
    the variable and the item, no traceback."""
    env = {**os.environ, "MOMKIT_LAUNCH": "gl.fwd_oo:BV=64", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "momkit", "train", "mqar_tiny", "run.device=cpu", "model.mom.impl=triton",
           "optim.max_steps=1", f"run.dir={tmp_path / 'run'}", "--no-progress"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        "momkit: error: environment variable MOMKIT_LAUNCH item 'gl.fwd_oo:BV=64' is invalid"), out.stderr
    assert "Traceback" not in out.stderr


def test_the_environment_variable_sets_launch_options_in_a_new_process():
    env = {**os.environ, "MOMKIT_LAUNCH": "gl.fwd_o:BV=64, gl.bwd_dv:BK=32 gl.bwd_dv:num_warps=8"}
    out = subprocess.run([sys.executable, "-c", "from momkit.kernels import _common; print(_common.LAUNCH)"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'gl.fwd_o': {'BV': 64}, 'gl.bwd_dv': {'BK': 32, 'num_warps': 8}}"


@pytest.mark.parametrize(("item", "why"), [
    ("gl.fwd_x:BV=64", "expected kernel:option=value with kernel one of conv.bwd, conv.fwd, delta.bwd_dh"),
    ("gl.fwd_o", "expected kernel:option=value with kernel one of"),
    ("gl.fwd_o:BQ=64", "kernel gl.fwd_o takes BK, BV, num_stages, num_warps"),
    ("gl.bwd_dqk:BV=64", "kernel gl.bwd_dqk takes num_stages, num_warps"),
    ("gl.fwd_o:BV", "the value must be a positive integer"),
    ("gl.fwd_o:BV=0", "the value must be a positive integer"),
    ("gl.fwd_o:BV=sixty", "the value must be a positive integer")])
def test_a_bad_item_is_one_clear_error(item, why):
    with pytest.raises(ValueError) as e:
        _common.parse_launch([item], "environment variable MOMKIT_LAUNCH")
    assert str(e.value).startswith(f"environment variable MOMKIT_LAUNCH item {item!r} is invalid: {why}")


def test_the_options_read_from_the_source_are_those_each_launcher_takes():
    """The static list (what a bad item's error names) against the launchers: gl.fwd_o and gl.bwd_dv pass their
    key and value blocks; the norms pass nothing of their own."""
    options = _common.launch_options()
    assert options["gl.fwd_o"] == options["gl.bwd_dv"] == ("BK", "BV", "num_stages", "num_warps")
    assert options["norm.rms_fwd"] == ("num_stages", "num_warps")
    assert options["conv.fwd"] == ("BC", "BN", "num_stages", "num_warps")


def test_an_option_the_launcher_does_not_take_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(_common.LAUNCH, "gl.bwd_dqk", {"BV": 64})
    with pytest.raises(ValueError, match=r"launch option BV=64 for kernel gl.bwd_dqk \(LAUNCH or MOMKIT_LAUNCH\) is "
                                         r"invalid: its launcher takes num_warps, num_stages$"):
        _common.launch("gl.bwd_dqk")
    assert _common.launch("gl.fwd_o", BV=32, BK=64) == {"BV": 32, "BK": 64}


def test_mixed_blocks_take_two_warps_on_hopper_only(monkeypatch):
    """Where a launcher reports the Hopper miscompilation (``mixed_block_warps``): two warps on a Hopper GPU in
    place of the launcher's own, nothing elsewhere, and warps set through the launch options win."""
    import torch

    cuda = torch.device("cuda")
    opts = {"BK": 64, "BV": 32, "num_warps": 4}
    monkeypatch.setattr(_common, "is_interpreting", lambda: False)
    monkeypatch.setattr(_common, "_is_hopper", lambda device: device.type == "cuda")
    monkeypatch.setattr(_common, "LAUNCH", {})
    assert _common.mixed_block_warps("gl.fwd_o", opts, cuda, True) == {**opts, "num_warps": 2}
    assert _common.mixed_block_warps("gl.fwd_o", opts, cuda, False) == opts
    assert _common.mixed_block_warps("gl.fwd_o", opts, torch.device("cpu"), True) == opts
    monkeypatch.setattr(_common, "LAUNCH", {"gl.fwd_o": {"num_warps": 8}})
    assert _common.mixed_block_warps("gl.fwd_o", {**opts, "num_warps": 8}, cuda, True)["num_warps"] == 8
    assert _common.mixed_block_warps("gl.bwd_dv", opts, cuda, True)["num_warps"] == 2
    monkeypatch.setattr(_common, "_is_hopper", lambda device: False)
    assert _common.mixed_block_warps("gl.bwd_dv", opts, cuda, True) == opts


def test_titans_refuses_the_widths_miscompiled_on_hopper(monkeypatch):
    """The titans chunk path refuses key widths above 32 with value widths of 32 or less on a Hopper GPU under
    Triton before 3.7.1 (wrong outputs on an H100 with Triton 3.6), with one error naming the widths; other
    widths, devices and versions run."""
    import momkit.kernels.titans.chunk as titans
    import torch

    cuda = torch.device("cuda")
    monkeypatch.setattr(titans, "is_interpreting", lambda: False)
    monkeypatch.setattr(titans, "_is_hopper", lambda device: device.type == "cuda")
    monkeypatch.setattr(titans.triton, "__version__", "3.6.0")
    wrong = {(K, V) for K in (16, 32, 33, 64, 128, 256) for V in (16, 32, 33, 64, 128)
             if titans.miscompiled_widths(K, V, cuda)}
    assert wrong == {(K, V) for K in (33, 64, 128, 256) for V in (16, 32)}
    assert not titans.miscompiled_widths(64, 32, torch.device("cpu"))
    for version, refused in (("3.7.0", True), ("3.7.1", False), ("3.8.0+git1234", False), ("3.4", True)):
        monkeypatch.setattr(titans.triton, "__version__", version)
        assert titans.miscompiled_widths(64, 32, cuda) is refused, version
    monkeypatch.setattr(titans.triton, "__version__", "3.6.0")
    monkeypatch.setattr(titans, "miscompiled_widths", lambda K, V, device: (K, V) == (64, 32))
    q = torch.zeros(1, 4, 1, 64)
    v = torch.zeros(1, 4, 1, 32)
    gate = torch.zeros(1, 4, 1)
    with pytest.raises(ValueError, match="K=64 with value width V=32.*impl='chunked'"):
        titans.chunk_titans(q, q, v, gate, gate, gate, scale=1.0, mini_batch=16, initial_state=None,
                            output_final_state=False, cu_seqlens=None)
