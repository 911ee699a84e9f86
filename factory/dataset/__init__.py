"""The dataset factory: job configs, the Ray plan and WebDataset shards (orchestration; no diffusers here).

config     the job YAML, validated with pydantic before any work
specs      sample specs and shard tasks, derived deterministically from the config
sources    listing the user's images and shards on any fsspec URL
pipeline   the Ray Data plan: generation actor pool -> encode + write tasks -> manifest
filters    the quality filters that reject a sample
shards     shard encoding, atomic commit, stats and manifest (local, s3://, gs://)
report     report.md / report.png beside the shards, and the contact sheets they use
"""
