"""Built-in sparse attention methods; importing this package registers them.

Prefill: ``block_sparse``, ``vertical_and_slash``, ``flexprefill``. KV eviction after a
dense prefill: ``snapkv``, ``ada_snapkv``. Decode-time page selection: ``quest``.
Oracles (the same budgets spent by true attention mass): ``oracle_block_sparse``,
``oracle_vertical_and_slash``, ``oracle_tokens``, ``oracle_quest``.
"""

from sparse_jax.attention.methods.ada_snapkv import AdaSnapKV
from sparse_jax.attention.methods.block_sparse import BlockSparse
from sparse_jax.attention.methods.flexprefill import FlexPrefill
from sparse_jax.attention.methods.oracles import OracleBlockSparse, OracleQuest, OracleTokens, OracleVerticalAndSlash
from sparse_jax.attention.methods.quest import Quest
from sparse_jax.attention.methods.snapkv import SnapKV
from sparse_jax.attention.methods.vertical_and_slash import VerticalAndSlash

__all__ = [
    "AdaSnapKV",
    "BlockSparse",
    "FlexPrefill",
    "OracleBlockSparse",
    "OracleQuest",
    "OracleTokens",
    "OracleVerticalAndSlash",
    "Quest",
    "SnapKV",
    "VerticalAndSlash",
]
