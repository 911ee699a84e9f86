"""The dataset factory: job configs, the Ray plan and WebDataset shards (orchestration; no diffusers here).

config      the job YAML, validated with pydantic before any work
specs       sample specs, shard tasks and the job's fingerprint, derived from the config alone
sources     listing the user's images and shards on any fsspec URL
images      reading the user's images as they see them (label mode)
preflight   the checks on the driver before Ray starts: output, model, prompts
pipeline    the Ray Data plan: generation actor pool -> encode + write tasks -> manifest
writers     the part writers and the shard assembly (imports no torch)
filters     the quality filters that reject a sample
shards      shard encoding, atomic commit, stats and manifest (local, s3://, gs://), safe decoding
report      the printed plan and summary, report.md / report.png, and the contact sheets they use
console     a quiet console unless --verbose
ray_start   starting (or joining) Ray for a driver, quietly
faults      crash points for the fault-injection tests (inert unless asked for)
"""
