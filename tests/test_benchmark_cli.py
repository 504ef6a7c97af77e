"""Benchmark command lines reject bad options before any work starts."""

import argparse

import pytest

from experiments.benchmarks import compile_time, decode_kernels, engine_bench, engine_methods


@pytest.mark.parametrize(
    "module,argv,message",
    [
        (decode_kernels, ["--steps", "0"], "--steps must be at least 1"),
        (engine_methods, ["--methods", "quest"], "--methods must name 'dense'"),
        (engine_methods, ["--methods", "dense,qeust"], "--methods must name 'dense'"),
        (engine_methods, ["--method-sparsity", "block_sparse=0.9:chunk_size=big"], "--method-sparsity takes NAME=S"),
        (engine_methods, ["--method-sparsity", "dense=0.5"], "--method-sparsity names a sparse method"),
        (compile_time, ["--batch", "0"], "--batch, --bucket and --new-tokens must be >= 1"),
        (compile_time, ["--sweep", "quest", "--sparsities", "0.5,1.5"], "--sparsities must be comma-separated"),
        (compile_time, ["--sweep", "qeust"], "--sweep 'qeust' is not a registered method"),
    ],
)
def test_bad_options_name_the_problem(module, argv, message, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [module.__name__, *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("side_by_side", [False, True])
def test_fused_qkv_is_the_benchmarks_default_and_off_asks_for_the_separate_layout(side_by_side, capsys):
    parser = argparse.ArgumentParser()
    engine_bench.add_fused_qkv_argument(parser, side_by_side=side_by_side)
    assert parser.parse_args([]).fused_qkv == "on"
    assert parser.parse_args(["--fused-qkv"]).fused_qkv == "on"  # the bare flag of older commands
    assert parser.parse_args(["--fused-qkv", "off"]).fused_qkv == "off"
    if side_by_side:
        assert engine_bench.QKV_LAYOUTS[parser.parse_args(["--fused-qkv", "both"]).fused_qkv] == ("separate", "fused")
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(["--fused-qkv", "both"])
        assert "invalid choice: 'both'" in capsys.readouterr().err
