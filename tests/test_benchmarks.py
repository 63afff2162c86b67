"""The benchmark and device-diagnostic command lines answer bad arguments with one error that names the
option, the value and what is allowed (they run on a rented GPU: a typo should cost no device time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import triton

from benchmarks import gpu_debug, gpu_tests, kernels


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
    assert args.head_dims == [128, 256]  # the main shapes: H8 K128 and the MoM layer's H4 K256
    assert kernels.parse_args(["--out", "x.json", "--head-dims", "256"]).head_dims == [256]


@pytest.mark.parametrize("dims", ["96", "128,x", ","])
def test_kernels_benchmark_names_bad_head_dims(dims, capsys):
    err = _error(kernels.parse_args, ["--out", "x.json", "--head-dims", dims], capsys)
    assert f"--head-dims {dims!r}" in err and "128 or 256" in err


def test_launch_keys_are_the_launchers_names():
    keys = gpu_debug.launch_keys()
    assert {"gl.fwd_h", "delta.wy_bwd", "titans.prep", "titans.coef_bwd"} <= set(keys)
    assert all(k.split(".")[0] in ("gl", "delta", "titans", "conv", "norm", "slots") for k in keys)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--tune", "mamba2"], "--tune 'mamba2': expected rule:kernel"),
    (["--tune", "mamba2:gl.nope"], "--tune 'mamba2:gl.nope': expected rule:kernel"),
    (["--tune", "nope:gl.fwd_h"], "--tune 'nope:gl.fwd_h': expected rule:kernel"),
    (["--launch", "delta.wy_bwd:warps=2"],
     "--launch item 'delta.wy_bwd:warps=2' is invalid: kernel delta.wy_bwd takes BK, BV, num_stages, num_warps"),
    (["--launch", "delta.wy_bwd:num_warps=x"],
     "--launch item 'delta.wy_bwd:num_warps=x' is invalid: the value must be a positive integer"),
    (["--launch", "gl.fwd_o:BX=128"], "kernel gl.fwd_o takes BK, BV, num_stages, num_warps"),
    (["--launch", "gl.fwd_x:BV=128"], "--launch item 'gl.fwd_x:BV=128' is invalid: expected kernel:option=value "
     "with kernel one of conv.bwd, conv.fwd,"),
    (["--profile", "gla,nope"], "--profile 'gla,nope': unknown nope"),
    (["--resources", "titan"], "--resources 'titan': unknown titan"),
    (["--shape", "70x32"], "--shape '70x32': expected three positive integers"),
    (["--resources", "gla", "--resources-shape", "4x2048x256"],
     "--resources-shape '4x2048x256': expected five positive integers B x T x H x K x V"),
    (["--profile", "gla", "--profile-shapes", "4x4096x8x128x128,4x0x4x256x256"],
     "--profile-shapes '4x4096x8x128x128,4x0x4x256x256': expected five positive integers B x T x H x K x V per shape"),
])
def test_gpu_debug_names_bad_arguments(argv, expected, capsys):
    assert expected in _error(gpu_debug.parse_args, argv, capsys)


def test_gpu_debug_parses_items():
    args = gpu_debug.parse_args(["--tune", "mamba2:gl.fwd_h,titans:titans.prep", "--launch",
                                 "delta.wy_bwd:num_warps=2", "delta.wy_bwd:num_stages=1", "gl.gla_prep:BK=32",
                                 "gl.fwd_o:BV=128", "--shape", "65x100x64",
                                 "--profile-shapes", "4x4096x8x128x128,4x4096x4x256x256"])
    assert args.tune == [("mamba2", "gl.fwd_h"), ("titans", "titans.prep")]
    assert args.launch == {"delta.wy_bwd": {"num_warps": 2, "num_stages": 1}, "gl.gla_prep": {"BK": 32},
                           "gl.fwd_o": {"BV": 128}}
    assert args.shape == (65, 100, 64)
    assert args.profile_shapes == [(4, 4096, 8, 128, 128), (4, 4096, 4, 256, 256)]


def test_resource_report_compiles_for_sm90_without_a_gpu():
    """Every kernel of a rule's forward and backward, compiled (not run) for Hopper on this machine, with its
    registers, spills, matrix instructions, barriers and shuffles read from ptxas and the SASS (in a process
    of its own: the kernel tests run Triton's interpreter, which compiles nothing)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_debug", "--resources", "linear_attn,conv",
                          "--resources-shape", "1x64x1x16x16"], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.splitlines()
    assert out[0].startswith(f"Triton {triton.__version__}, sm_90, B x T x H x K x V = 1 x 64 x 1 x 16 x 16")
    assert out[1].split()[-2:] == ["BAR", "SHFL"]
    rows = [ln.split() for ln in out[2:]]
    assert all(len(r) == 13 and r[5].isdigit() for r in rows)
    kernels = {name: {r[1] for r in rows if r[0] == name} for name in ("linear_attn", "conv", "conv-groups")}
    assert {"_fwd_h_kernel", "_fwd_o_kernel", "_bwd_dh_kernel"} <= kernels["linear_attn"]
    # at the layers' width 4 both convolutions' backward is the sequential kernel, one launch
    assert kernels["conv"] == kernels["conv-groups"] == {"_conv_fwd_kernel", "_conv_bwd_seq_kernel"}


# ---------------------------------------------------------------------------------------------- kernel_variants
def test_kernel_variants_build_applies_each_edit_once(tmp_path):
    from benchmarks import kernel_variants as kv

    root = tmp_path / "src"
    (root / "fam").mkdir(parents=True)
    (root / "fam" / "a.py").write_text("x = 1\ny = 2\ny = 2\n")
    out = kv.build("v1", [("fam/a.py", "x = 1", "x = 3")], tmp_path / "out", root=root)
    assert (out / "fam" / "a.py").read_text() == "x = 3\ny = 2\ny = 2\n"
    assert (root / "fam" / "a.py").read_text().startswith("x = 1")  # the source is untouched
    with pytest.raises(ValueError, match=r"variant v2: fam/a.py: 2 occurrences of 'y = 2' \(need exactly 1\)"):
        kv.build("v2", [("fam/a.py", "y = 2", "y = 0")], tmp_path / "out", root=root)
    with pytest.raises(ValueError, match="0 occurrences of 'z'"):
        kv.build("v3", [("fam/a.py", "z", "w")], tmp_path / "out", root=root)
    with pytest.raises(ValueError, match="variant v4: no file 'fam/b.py'"):
        kv.build("v4", [("fam/b.py", "x", "y")], tmp_path / "out", root=root)


def test_kernel_variants_default_root_is_the_kernels_package(tmp_path):
    from benchmarks import kernel_variants as kv

    out = kv.build("base", [("titans/chunk.py", "def _prep(", "def _prep(")], tmp_path)
    assert (out / "titans" / "chunk.py").is_file() and (out / "__init__.py").is_file()
    assert not list(out.rglob("__pycache__"))


def test_kernel_variants_command_line_names_bad_specs(tmp_path, capsys):
    from benchmarks import kernel_variants as kv

    err = _error(kv.parse_args, ["--spec", str(tmp_path / "none.py")], capsys)
    assert "--spec" in err and "no such file" in err
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    assert "defines no VARIANTS dict" in _error(kv.parse_args, ["--spec", str(empty)], capsys)
    bad = tmp_path / "bad.py"
    bad.write_text("VARIANTS = {'a': [('f.py', 'x')]}\n")
    assert "variant 'a' must be an identifier mapped to a list of (file, old, new)" in _error(
        kv.parse_args, ["--spec", str(bad)], capsys)
    good = tmp_path / "good.py"
    good.write_text("VARIANTS = {'base': [], 'nostore': [('titans/chunk.py', 'a', 'b')]}\n")
    assert "--only 'nope': unknown nope" in _error(kv.parse_args, ["--spec", str(good), "--only", "nope"], capsys)
    assert "--rules 'nope'" in _error(kv.parse_args, ["--spec", str(good), "--rules", "nope"], capsys)
    assert "--shape '4x2048x4'" in _error(kv.parse_args, ["--spec", str(good), "--shape", "4x2048x4"], capsys)
    assert "--shape '4xax4x1x1'" in _error(kv.parse_args, ["--spec", str(good), "--shape", "4xax4x1x1"], capsys)
    args = kv.parse_args(["--spec", str(good), "--only", "nostore", "--rules", "titans,gated_deltanet"])
    assert list(args.variants) == ["nostore"] and args.rules == ["titans", "gated_deltanet"]
    assert args.shape == (4, 4096, 8, 128, 128)
    assert kv.parse_args(["--spec", str(good), "--shape", "4x2048x4x256x256"]).shape == (4, 2048, 4, 256, 256)


def test_kernel_variants_take_other_kernel_trees(tmp_path, capsys):
    """``--tree NAME=DIR`` times another whole kernels/ tree (an earlier commit's) as one more variant, built from
    that tree; bad items name the option and what is wrong."""
    from benchmarks import kernel_variants as kv

    before = tmp_path / "before"
    (before / "fam").mkdir(parents=True)
    (before / "__init__.py").write_text("")
    (before / "fam" / "a.py").write_text("x = 0\n")
    good = tmp_path / "good.py"
    good.write_text("VARIANTS = {'base': []}\n")
    args = kv.parse_args(["--spec", str(good), "--tree", f"before={before}"])
    assert list(args.variants) == ["base", "before"] and args.roots == {"before": before}
    args = kv.parse_args(["--tree", f"before={before}", "--only", "before"])
    assert list(args.variants) == ["before"]
    out = kv.build("before", [], tmp_path / "out", args.roots["before"])
    assert (out / "fam" / "a.py").read_text() == "x = 0\n"
    assert "nothing to time" in _error(kv.parse_args, [], capsys)
    for item in (f"1x={before}", "before=", f"before={tmp_path / 'none'}", f"before={tmp_path}"):
        assert f"--tree {item!r}: expected NAME=DIR" in _error(kv.parse_args, ["--tree", item], capsys)
    assert "has a variant named 'base' already" in _error(
        kv.parse_args, ["--spec", str(good), "--tree", f"base={before}"], capsys)


def test_committed_variant_specs_apply_to_the_current_kernels(tmp_path):
    """Every edit of the spec files under benchmarks/variants still finds its text exactly once."""
    import runpy
    from pathlib import Path

    from benchmarks import kernel_variants as kv

    specs = sorted((Path(kv.__file__).parent / "variants").glob("*.py"))
    assert specs
    for spec in specs:
        for name, edits in runpy.run_path(str(spec))["VARIANTS"].items():
            kv.build(name, edits, tmp_path / spec.stem)


def test_inference_benchmark_runs_at_tiny_sizes_and_records_out_of_memory(tmp_path, monkeypatch):
    import json

    from benchmarks import inference

    real_prefill = inference.prefill

    def prefill(model, context, *args):  # the 32-token context "runs out of memory" for attention
        if context == 32 and model.cfg.mixer == "attention":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_prefill(model, context, *args)

    monkeypatch.setattr(inference, "prefill", prefill)
    out = tmp_path / "inf.json"
    result = inference.main(["--size", "tiny", "--models", "mom:gated_deltanet,attention", "--contexts", "16,32",
                             "--batches", "1,3", "--batch-contexts", "16", "--new-tokens", "5",
                             "--batch-new-tokens", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert {"device", "torch", "triton", "commit"} <= set(result["environment"])
    cells = {(c["model"], c["context"], c["batch"]): c for c in result["cells"]}
    models = ("mom:gated_deltanet", "attention")
    assert set(cells) == {(m, L, B) for m in models for L, B in ((16, 1), (16, 3), (32, 1))}
    skipped = cells[("attention", 32, 1)]
    assert skipped["status"] == "skipped" and skipped["reason"].startswith("out of memory: CUDA out of memory")
    for key, c in cells.items():
        if key == ("attention", 32, 1):
            continue
        assert c["status"] == "ok" and c["steps_done"] == c["steps"] == (5 if c["batch"] == 1 else 2)
        assert 0 < c["decode_ms_median"] <= c["decode_ms_p90"] and c["tokens_per_s"] > 0
        assert ("prefill_s" in c) == (c["batch"] == 1)
    # MoM's cache does not grow with the context; attention's does; a batch of 3 holds 3 copies
    mom, att = "mom:gated_deltanet", "attention"
    assert cells[(mom, 16, 1)]["cache_bytes"] == cells[(mom, 32, 1)]["cache_bytes"]
    assert cells[(mom, 16, 3)]["cache_bytes"] == 3 * cells[(mom, 16, 1)]["cache_bytes"]
    assert cells[(att, 16, 3)]["cache_bytes"] == 3 * cells[(att, 16, 1)]["cache_bytes"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--models", "mom:nope"], "--models 'mom:nope': unknown mom:nope; allowed: mom:deltanet"),
    (["--size", "huge"], "--size 'huge': allowed: full, small, tiny"),
    (["--contexts", "1k"], "--contexts '1k': expected comma-separated positive integers"),
    (["--batches", "0"], "--batches '0': expected comma-separated positive integers"),
    (["--new-tokens", "0"], "--new-tokens 0: must be >= 1"),
    (["--dtype", "fp8"], "--dtype 'fp8': allowed: auto, bfloat16"),
])
def test_inference_benchmark_names_bad_arguments(argv, expected, capsys):
    from benchmarks import inference

    assert expected in _error(inference.parse_args, ["--out", "x.json", *argv], capsys)


def test_layer_train_and_launch_benchmarks_name_bad_arguments(capsys):
    from benchmarks import gpu_layer, gpu_train, tune_launch

    err = _error(gpu_layer.parse_args, ["--out", "x.json", "--cases", "mom_b4_t2048_m4,huge"], capsys)
    assert "--cases 'mom_b4_t2048_m4,huge': unknown huge" in err and "single_b4_t2048" in err
    assert "--steps 0: must be >= 1" in _error(gpu_train.parse_args, ["--out", "x", "--steps", "0"], capsys)
    assert "--kernel-top -1: must be >= 0" in _error(gpu_train.parse_args, ["--out", "x", "--kernel-top", "-1"], capsys)
    err = _error(gpu_train.parse_args, ["--out", "x", "--config", "mqar_capacity", "--set", "model.mixer=both"], capsys)
    assert "--config mqar_capacity" in err and "model.mixer" in err and "both" in err
    args = gpu_train.parse_args(["--out", "x", "--config", "mqar_capacity", "--set", "model.mixer=single"])
    assert (args.config, args.set) == ("mqar_capacity", ["model.mixer=single"])
    err = _error(tune_launch.parse_args, ["--options", "BV=thirty"], capsys)
    assert "launch option 'BV=thirty' must look like name=int" in err
    assert "--shapes" in _error(tune_launch.parse_args, ["--shapes", "4x2048x4"], capsys)
    err = _error(tune_launch.parse_args, ["--kernels", "delta.nope"], capsys)
    assert "unknown delta.nope" in err and "delta.bwd_dh" in err and "conv.fwd" in err
    args = tune_launch.parse_args(["--kernels", "delta.bwd_dh,delta.fwd_h", "--options", "BV=32,num_warps=8"])
    assert args.options == [{"BV": 32, "num_warps": 8}] and args.shapes == [(4, 2048, 4, 256, 256)]
    assert "NxC or NxCxG" in _error(tune_launch.parse_args, ["--conv", "8192", "--kernels", "conv.bwd"], capsys)
    args = tune_launch.parse_args(["--conv", "8192x3072,24576x2048x5", "--kernels", "conv.bwd"])
    assert args.conv == [(8192, 3072), (24576, 2048, 5)]
    from benchmarks import concurrent_train

    assert "--workers '0,4'" in _error(concurrent_train.parse_args, ["--out", "x", "--workers", "0,4"], capsys)
    assert concurrent_train.parse_args(["--out", "x", "--workers", "2,8"]).counts == [2, 8]


def test_conv_cases_of_the_launch_benchmark_run_with_and_without_groups():
    """``tune_launch --conv``'s forward+backward, on the interpreter: one weight, and groups of rows."""
    from benchmarks.tune_launch import conv_fn

    for G in (1, 3):
        conv_fn(300, 40, G, torch.device("cpu"))()


@pytest.mark.parametrize("case", ["mom_b4_t2048_m8", "single_b4_t2048"])
def test_gpu_layer_builds_our_layer_of_every_kind(case):
    """The benchmark's own layer of each kind builds from its config (on CPU: the config checks run there too)."""
    from benchmarks import gpu_layer
    from momkit import MoMLayer, SingleMemoryLayer

    kind, _, _, M = gpu_layer.CASES[case]
    layer = gpu_layer.ours(kind, M, "cpu")
    assert isinstance(layer, MoMLayer if kind == "mom" else SingleMemoryLayer)
    assert layer.cfg.num_memories == M and layer.cfg.key_dim == gpu_layer.HEAD

def test_gpu_layer_sorts_kernels_into_the_layers_parts():
    """Kernel names as the profiler gives them (ours, fla's, PyTorch's and cuBLAS's) go to the part of the layer
    they serve, so that ours and fla's compare part by part."""
    from benchmarks.gpu_layer import kernel_part, parts_us

    expect = {
        "_bwd_dqkw_kernel": "rule", "_wy_fwd_kernel": "rule", "_fwd_o_kernel": "rule", "_chunk_dg_kernel": "rule",
        "_state_inner_kernel": "rule",
        "chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64": "rule", "recompute_w_u_fwd_kernel": "rule",
        "prepare_wy_repr_bwd_kernel": "rule", "chunk_gated_delta_rule_fwd_kkt_solve_kernel": "rule",
        "_conv_bwd_kernel": "conv", "_conv_dx_kernel": "conv", "causal_conv1d_fwd_kernel": "conv",
        "_rms_bwd_kernel": "norm", "_l2_fwd_kernel": "norm", "layer_norm_gated_bwd_kernel": "norm",
        "l2norm_fwd_kernel": "norm",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "matmul",
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x64_64x3_nt_align2>": "matmul",
        "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel": "matmul",
        "chunk_local_cumsum_scalar_kernel": "rule", "gdn_gate_chunk_cumsum_scalar_kernel": "other",
        "fused_beta_sigmoid_bwd_kernel": "other", "_slot_sum_kernel": "routing", "_combine_bwd_kernel": "routing",
        "void at::native::vectorized_gather_kernel<16, long>(char*, char*, long*, int, long)": "routing",
        "void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<": "routing",
        "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>": "routing",
        "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda": "other",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>": "other",
        "Memcpy DtoD (Device -> Device)": "other",
    }
    assert {name: kernel_part(name) for name in expect} == expect
    parts = parts_us([{"kernel": "_wy_fwd_kernel", "us": 10.0}, {"kernel": "_fwd_h_kernel", "us": 5.0},
                      {"kernel": "Memset (Device)", "us": 1.0}])
    assert parts == {"conv": 0.0, "norm": 0.0, "matmul": 0.0, "rule": 15.0, "routing": 0.0, "other": 1.0}


def test_gpu_layer_reports_a_run_cut_short_from_its_partial_file(tmp_path, capsys):
    """A run stopped by a time limit leaves ``OUT.partial`` with the cases it finished; ``--report`` prints them
    with their ratios and the MoM layer's cost over the single layer's, and writes the summarised file."""
    from benchmarks import gpu_layer

    def row(case, layer, B, **times):
        return {"case": case, "layer": layer, "B": B, "T": 2048} | times
    part = {"environment": {"device": "dev", "torch": "t", "triton": "tr", "fla": "0.6.0", "commit": "abc"},
            "rows": [row("mom_b4_t2048_m4", "mom", 4, ours_fwd_bwd_gpu_us=600.0, fla_fwd_bwd_gpu_us=900.0,
                         ours_fwd_bwd_ms=2.0, fla_fwd_bwd_ms=3.0, ours_fwd_bwd_peak_mib=100.0,
                         fla_fwd_bwd_peak_mib=150.0),
                     row("single_b4_t2048", "single", 4, ours_fwd_bwd_gpu_us=200.0)],
            "breakdown_fwd_bwd": {"mom_b4_t2048_m4": [{"kernel": "_fwd_h_kernel", "launches": 2, "us": 400.0},
                                                      {"kernel": "_conv_bwd_kernel", "launches": 1, "us": 200.0}]},
            "fla_breakdown_fwd_bwd": {}}
    src = tmp_path / "r.json.partial"
    src.write_text(json.dumps(part))
    gpu_layer.main(["--report", str(src), "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "commit abc" in out and "_fwd_h_kernel" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("mom_b4_t2048_m4   fwd_bwd"))
    assert line.split()[2:] == ["2.00", "3.00", "0.60", "0.90", "1.50", "1.50", "100", "150"]
    rows = {r["case"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert rows["mom_b4_t2048_m4"]["mom_over_single_fwd_bwd_gpu"] == 3.0
    assert rows["mom_b4_t2048_m4"]["ours_fwd_bwd_parts_us"]["rule"] == 400.0
    with pytest.raises(SystemExit, match="--report .*nope.json: not a gpu_layer results file"):
        gpu_layer.main(["--report", str(tmp_path / "nope.json")])
    assert "--out is required" in _error(gpu_layer.parse_args, [], capsys)



def test_triton_cache_keeps_autotuning_results_and_our_kernels(tmp_path, capsys):
    import tarfile

    from benchmarks import triton_cache

    cache = tmp_path / ".tcache"
    for name, files in {"a": ["chunk_fwd.autotune.json"], "b": ["_fwd_h_kernel.cubin", "_fwd_h_kernel.json"],
                        "c": ["chunk_gated_delta_rule_fwd_kernel_h.cubin"]}.items():
        (cache / name).mkdir(parents=True)
        for f in files:
            (cache / name / f).write_text("x")
    out = tmp_path / "t.tgz"
    triton_cache.main(["--cache", str(cache), "--out", str(out)])
    with tarfile.open(out) as tar:
        folders = {Path(n).parts[1] for n in tar.getnames()}
    assert folders == {"a", "b"}  # fla's compiled configuration ("c") stays behind
    triton_cache.main(["--cache", str(cache), "--out", str(out), "--autotune-only"])
    with tarfile.open(out) as tar:
        assert {Path(n).parts[1] for n in tar.getnames()} == {"a"}
    assert "--cache 'nope': no such folder" in _error(triton_cache.main, ["--cache", "nope", "--out", "x"], capsys)


def test_the_environment_records_launch_options_set_by_the_variable(monkeypatch):
    """A result measured under MOMKIT_LAUNCH says so; without it there is no such key."""
    from benchmarks._common import environment

    monkeypatch.delenv("MOMKIT_LAUNCH", raising=False)
    assert "launch" not in environment("abc1234")
    monkeypatch.setenv("MOMKIT_LAUNCH", "delta.bwd_dqkw:num_warps=8")
    assert environment("abc1234")["launch"] == "delta.bwd_dqkw:num_warps=8"


def test_cpu_memory_simulation_sees_the_state_budget(monkeypatch):
    """The simulated peak of a MoM layer's forward and backward on one long sequence: above what the forward
    holds, and lower where the delta kernels' state budget splits the call into groups than where it fits."""
    from benchmarks import cpu_memory

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with cpu_memory._NoKernels(132, 10_000):
        whole = cpu_memory.simulate("mom", 1, 4096, 2)
    with cpu_memory._NoKernels(132, 32):
        grouped = cpu_memory.simulate("mom", 1, 4096, 2)
    assert whole["peak_mib"] > whole["saved_mib"] > 0
    assert grouped["peak_mib"] < whole["peak_mib"] - 20


def test_cpu_memory_names_bad_arguments(capsys):
    from benchmarks import cpu_memory

    for argv, expected in ((["--slots", "0"], "--slots 0"), (["--budget-mib", "-1"], "--budget-mib -1"),
                           (["--cases", "mom_b2"], "mom_b2")):
        with pytest.raises(SystemExit):
            cpu_memory.parse_args(argv)
        assert expected in capsys.readouterr().err


def test_results_record_launch_options(monkeypatch):
    """Every result file's environment names the launch options set apart from the launchers' defaults."""
    from benchmarks._common import environment

    monkeypatch.delenv("MOMKIT_LAUNCH", raising=False)
    env = environment("abc1234")
    assert env["commit"] == "abc1234" and "launch" not in env
    monkeypatch.setenv("MOMKIT_LAUNCH", "conv.bwd:SHIFT=1")
    assert environment("abc1234")["launch"] == "conv.bwd:SHIFT=1"


def test_gpu_tests_runs_the_tests_kept_apart_after_the_others_with_fewer_workers(tmp_path):
    """``--apart``: two pytest runs, the rest first with --workers and then the selected tests with
    --apart-workers, each with its JUnit file, in one report."""
    suite = tmp_path / "test_suite.py"
    suite.write_text("import pytest\n\n\n" + "".join(
        f"@pytest.mark.gpu\ndef test_{name}():\n    pass\n\n\n" for name in ("titans_a", "ttt_b", "plain")))
    out = tmp_path / "report.txt"
    gpu_tests.main(["--out", str(out), "--workers", "2", "--paths", str(suite), "--apart", "titans or ttt",
                    "--apart-workers", "1"])
    report = out.read_text()
    commands = [ln for ln in report.splitlines() if ln.startswith("command:")]
    assert len(commands) == 2
    assert "-n2" in commands[0] and "-k not (titans or ttt)" in commands[0] and "report.rest.junit.xml" in commands[0]
    assert "-n1" in commands[1] and "-k titans or ttt" in commands[1] and "report.apart.junit.xml" in commands[1]
    assert report.count("status: exit code 0") == 2
    assert "1 passed" in report and "2 passed" in report


def test_gpu_tests_report_names_a_crashed_workers_entry(tmp_path):
    """A worker that crashed leaves a JUnit entry with no name; the report lists it among the others."""
    junit = tmp_path / "r.junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="t" name="test_a" time="0.002"/>'
                     '<testcase time="0.002"/></testsuite></testsuites>')
    lines = gpu_tests.largest([str(junit)])
    assert any(ln.endswith("test_a") for ln in lines) and any(ln.endswith("?") for ln in lines)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--workers", "0"], "--workers 0 is invalid: give a positive number of workers"),
    (["--apart", "titans", "--apart-workers", "0"], "--apart-workers 0 is invalid"),
    (["--apart", "titans", "--", "-k", "gla"], "--apart 'titans' cannot be combined with a -k"),
])
def test_gpu_tests_names_bad_arguments(argv, expected, capsys):
    assert expected in _error(gpu_tests.parse_args, ["--out", "r.txt", *argv], capsys)


# ---------------------------------------------------------------------------------------------- inverse_precision
def test_inverse_by_squares_loses_the_precision_that_substitution_keeps():
    from benchmarks.inverse_precision import errors

    e = errors(noise=0.01, beta_min=0.9, trials=3)
    assert e["substitution"] < 0.01 * e["max_entry"]
    assert e["squares"] > 100 * e["substitution"]
