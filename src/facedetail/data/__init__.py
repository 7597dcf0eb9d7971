"""Sharded face datasets: tar shards + parquet index, the stage runner (Dask or in-process), streaming readers."""
