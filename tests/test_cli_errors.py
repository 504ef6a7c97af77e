"""Every user error of the CLI is one line and exit status 2; ``--debug`` adds the traceback.

A damaged checkpoint is the case that used to print a Python traceback first.
"""

from __future__ import annotations

import shutil

import pytest

from sparse_jax.embedded import embedded_model_path
from tests.test_pipeline_common import REPO, run_cli


def _truncated_safetensors_folder(tmp_path):
    folder = tmp_path / "tiny_llama"
    shutil.copytree(REPO / "tests" / "fixtures" / "tiny_llama", folder)
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return folder


def _truncated_gguf(tmp_path):
    path = tmp_path / "truncated.gguf"
    data = embedded_model_path().read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_JAX_CACHE", str(tmp_path / "cache"))  # no converted copy to fall back on


@pytest.mark.parametrize(
    "make_model, expected",
    [(_truncated_safetensors_folder, "truncated"), (_truncated_gguf, "the file is truncated (re-download it)")],
    ids=["safetensors", "gguf"],
)
def test_truncated_checkpoint_is_one_line_and_exit_2(tmp_path, make_model, expected):
    model = make_model(tmp_path)
    result = run_cli("generate", "--prompt=hi", f"--model={model}")
    assert result.code == 2
    line = result.error_line()  # exactly one `sparse-jax:` line and no traceback
    assert expected in line and str(model.name) in line, line
    debug = run_cli("--debug", "generate", "--prompt=hi", f"--model={model}")
    assert debug.code == 2 and "Traceback (most recent call last)" in debug.err
    assert debug.err.rstrip().splitlines()[-1] == line
