"""Training: PyTorch DDP over the resampled shards (`trajflow train`; with
`--nproc-per-node` it starts its workers through torch's elastic agent, as torchrun would).

Modules (torch is imported by the modules, never by this package or `cli`):
    data        windows over the memory-mapped shards, episode split, normalisation stats
    models      LSTM / GRU / Transformer encoder with the statistics as buffers
    dist        the process group from the elastic agent's environment (NCCL on GPU, gloo on CPU)
    loop        the training loop: resume, steps, evaluation, early stopping, artifacts
    checkpoint  atomic checkpoints with markers, newest-valid resume, retention
    artifacts   metrics.json, loss curve, resolved config, the model for inference
    curves      the loss curve's drawing (torch-free: `trajflow run`'s report uses it too)
    synthetic   generated shards of a known dynamical system, for tests and benchmarks
    errors      TrainingDiverged
    launch      the elastic launcher that maps worker exit codes to the pod's
    cli         `trajflow train`

What a worker reads:
    --config FILE (or $TRAJFLOW_CONFIG, default /etc/trajflow/config.yaml): {global, config}
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: set by the agent
    TORCHELASTIC_RESTART_COUNT: how often the group was restarted (a metric and metrics.json)
    TRAJFLOW_LOG_LEVEL, TRAJFLOW_LOG_FORMAT: logging
    TRAJFLOW_METRICS_ADDR: the address /metrics listens on (default every interface)
    AWS_* / the default credential chain: for an S3 run root
Ports: /metrics on training.config.metricsPort + LOCAL_RANK (default 9400, 9401, ...).
Exit codes: 0 done; 2 bad config; 3 unusable data; 4 no shards yet; 5 diverged (NaN/Inf).
"""
