"""Thin Beam adapters: reading shards and image files, decoding, batched CAM inference, writing Parquet."""
