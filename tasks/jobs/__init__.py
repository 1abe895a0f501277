"""Jobs: their records in storage, their index in Redis, planning, healing, the manifest, and
sending their tasks by name. Never imports torch or the engine (checked by import-linter)."""
