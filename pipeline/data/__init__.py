"""The training loader: shard specs, which samples each rank and worker reads, decoding and transforms."""
