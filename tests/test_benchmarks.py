"""The benchmark and device-diagnostic command lines answer bad arguments with one error that names the
option, the value and what is allowed (they run on a rented GPU: a typo should cost no device time)."""

from __future__ import annotations

import pytest

from benchmarks import gpu_debug, kernels


def _error(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_kernels_benchmark_names_unknown_rules_and_peers(capsys):
    err = _error(kernels.parse_args, ["--out", "x.json", "--rules", "gla,nope"], capsys)
    assert "--rules 'gla,nope': unknown nope" in err and "allowed: linear_attn" in err
    err = _error(kernels.parse_args, ["--out", "x.json", "--peers", "titans"], capsys)
    assert "--peers 'titans': unknown titans" in err and "gated_deltanet" in err
    err = _error(kernels.parse_args, ["--out", "x.json", "--rules", ","], capsys)
    assert "--rules ',': no names" in err


def test_kernels_benchmark_accepts_lists():
    args = kernels.parse_args(["--out", "x.json", "--rules", "gated_deltanet,titans", "--peers", "gated_deltanet"])
    assert args.rules == ["gated_deltanet", "titans"] and args.peers == ["gated_deltanet"]


def test_launch_keys_are_the_launchers_names():
    keys = gpu_debug.launch_keys()
    assert {"gl.fwd_h", "delta.wy_bwd", "titans.prep", "titans.coef_bwd"} <= set(keys)
    assert all(k.split(".")[0] in ("gl", "delta", "titans") for k in keys)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--tune", "mamba2"], "--tune 'mamba2': expected rule:kernel"),
    (["--tune", "mamba2:gl.nope"], "--tune 'mamba2:gl.nope': expected rule:kernel"),
    (["--tune", "nope:gl.fwd_h"], "--tune 'nope:gl.fwd_h': expected rule:kernel"),
    (["--launch", "delta.wy_bwd:warps=2"], "--launch 'delta.wy_bwd:warps=2': expected kernel:option=value"),
    (["--launch", "delta.wy_bwd:num_warps=x"], "--launch 'delta.wy_bwd:num_warps=x'"),
    (["--launch", "gl.fwd_o:BX=128"], "option num_warps, num_stages, BK (gla prep and intra) or BV"),
    (["--profile", "gla,nope"], "--profile 'gla,nope': unknown nope"),
    (["--resources", "titan"], "--resources 'titan': unknown titan"),
    (["--shape", "70x32"], "--shape '70x32': expected three positive integers"),
])
def test_gpu_debug_names_bad_arguments(argv, expected, capsys):
    assert expected in _error(gpu_debug.parse_args, argv, capsys)


def test_gpu_debug_parses_items():
    args = gpu_debug.parse_args(["--tune", "mamba2:gl.fwd_h,titans:titans.prep", "--launch",
                                 "delta.wy_bwd:num_warps=2", "delta.wy_bwd:num_stages=1", "gl.gla_prep:BK=32",
                                 "gl.fwd_o:BV=128", "--shape", "65x100x64"])
    assert args.tune == [("mamba2", "gl.fwd_h"), ("titans", "titans.prep")]
    assert args.launch == {"delta.wy_bwd": {"num_warps": 2, "num_stages": 1}, "gl.gla_prep": {"BK": 32},
                           "gl.fwd_o": {"BV": 128}}
    assert args.shape == (65, 100, 64)
