"""Data: ``shards`` (webdataset read/write with skip-and-record), ``augment`` (policy, seeds,
parameters, pixels), ``views`` (the one replay path: image + seed + manifest view -> view)."""
