"""Scale-out: device meshes, sharding rules, per-shard attention, multi-process runs.

See ``docs/scale_out.md``. Modules: :mod:`.mesh` (the ``data`` x ``model`` mesh),
:mod:`.sharding` (parameter, KV-cache and batch layouts), :mod:`.sharded_method`
(methods under ``shard_map``), :mod:`.placement` (sharded models and engines, sharded
checkpoint restore), :mod:`.runtime` (``jax.distributed`` start-up, sample ownership).
"""
