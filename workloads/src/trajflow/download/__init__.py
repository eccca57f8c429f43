"""The downloader: partitioned, resumable, verified fetching of datasets into the run root.

    sources.py   s3://, https:// URL lists, catalogs (UCSC Xena-like hubs), file://
    http.py      urllib3 GETs with ranges, validators, proxies and error classification
    transfer.py  one item: parallel ranged parts, in-order hashing, resumable temporaries
    verify.py    digests, declared checksums, per-item verification records
    shard.py     one shard: plan, skip/reuse, bounded worker pool, summary, manifest
    progress.py  progress lines / bar and the duration/throughput gauges
    cli.py       `trajflow download`

Layout under the run root (DESIGN "Data plane contract"):

    plan/download-<shards>-<generation>/         who fetches what: plan.json (first writer wins), a part per shard
    plan/download.json                           a copy of the plan.json in use
    raw/<shard>/<source>/<path>                  verified items (only ever renamed into place)
    raw/_done/<shard>.json                       shard manifest, written last
    raw/.trajflow-verified/<source>/<path>.json  per-item verification records (hidden)

Decisions:
- Destination: everything goes through `trajflow.storage`. On a filesystem root an item is
  fetched into a hidden temporary next to its final path (the storage's `.trajflow-tmp-`
  prefix, skipped by listings) with a journal of the byte ranges written; it is renamed
  after verification. On an S3 root it streams, in byte order, through the storage's
  atomic writer (a multipart upload completed only after verification).
- Verification records are per item, keyed by item (not shard), written right after the
  item is in place: a rerun, or a pod of another shard count, skips a verified item by
  reading one small record and checking the file's size — never by re-hashing. The shard
  manifest alone could not do it: it exists only once the whole shard is done.
- Re-sharding keeps DESIGN's `raw/<shard>/...` layout (downstream reads one shard's
  manifest and directory). An item planned into another shard than before is found
  through its record and moved into its new shard directory — a rename on a filesystem,
  a server-side copy and delete on S3 — never downloaded again; once every shard of the
  new count has run, each item lies in exactly one shard directory.
- Exit codes (the chart's podFailurePolicy): 0 all required items verified; 2 bad
  configuration (FailJob); 3 permanent failures such as 403/404 or checksums that never
  match (FailIndex); 4 transient failures remain, or SIGTERM (retry: the rerun resumes);
  1 the run root itself failed (retry). Stdin is never read.
- Secrets never sit in values: S3 sources take keys from `<credentialsEnvPrefix>AWS_*`
  variables (an `envFrom` Secret with that prefix) or the default AWS chain (workload
  identity); HTTP sources take a bearer token from the variable named by `authTokenEnv`.
"""
