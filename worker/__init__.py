"""The GPU side: model loading, the mask engine, image codecs, and the Celery worker lifecycle."""
