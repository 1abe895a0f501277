"""WebDataset shards: which shards a SRC names (``names.py``: a brace pattern, or a folder or
prefix of ``.tar`` files), and a shard's samples read from one stream and written to one stream
(``tar.py``). Torch-free: planning shards needs no engine; masking one shard is
``tasks/pipeline/shards.py``."""
