"""Preprocessing: read raw trajectories, resample them to a uniform rate, write fixed-rate shards.

- `readers`: LeRobot-style parquet, robomimic-style HDF5 and npz -> validated episodes or
  quarantine entries (`npzfile`: npz decoded in memory without numpy.load's per-file cost);
- `batching`: length-grouped, padded batches staged in (pinned) host memory;
- `kernels`: the resampling kernels (Triton on CUDA, PyTorch elsewhere);
- `shards`: the shard format training memory-maps (`open_shard`, `list_shards`), with
  `dtypes` for bf16, which numpy lacks;
- `stage`: one shard end to end (`run_shard`, `process_shard`, `run_shards`);
- `cli`: `trajflow preprocess`.
"""
