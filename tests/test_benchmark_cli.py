"""Benchmark command lines reject bad options before any work starts."""

import pytest

from experiments.benchmarks import compile_time, decode_kernels, engine_methods


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
