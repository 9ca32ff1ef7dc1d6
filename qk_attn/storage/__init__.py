"""Writing an output folder: capture batches -> host -> Parquet shards, manifest, card."""
