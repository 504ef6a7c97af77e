"""Prompt-length buckets and bucket-sharing batches."""

import pytest

from sparse_jax.engine.buckets import bucket_length, group_by_bucket


@pytest.mark.parametrize(
    "length, bucket",
    [(1, 16), (16, 16), (17, 32), (1000, 1024), (1024, 1024), (1025, 2048), (32768, 32768), (32769, 33792)],
)
def test_bucket_length(length, bucket):
    assert bucket_length(length) == bucket


def test_few_buckets_over_a_sweep():
    buckets = {bucket_length(n) for n in range(7000, 9000)}
    assert buckets == {7168, 8192, 9216}


def test_group_by_bucket_longest_first_and_capped():
    lengths = [10, 3000, 12, 2900, 2990, 500]
    assert group_by_bucket(lengths, batch_size=2) == [[1, 3], [4], [5], [0, 2]]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bucket_length(0), "prompt length must be >= 1"),
        (lambda: bucket_length(5, granularity=1000), "multiple of the page size"),
        (lambda: group_by_bucket([3], batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
