"""Shards, WebDataset tar or Parquet: which shards a SRC names (``names.py``: a brace pattern, or
a folder or prefix of ``.tar`` or ``.parquet`` files), and a shard's samples read from one stream
and written to one stream (``tar.py``, ``parquet.py``; the format by extension, ``formats.py``).
Torch-free: planning shards needs no engine; masking one shard is ``tasks/pipeline/shards.py``."""
