"""Offline jobs: the resumable JSONL/Parquet job, its input and output files, the command line,
and the same job on a Ray cluster."""
