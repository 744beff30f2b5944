"""Small shared pieces: optional-import checks and the cache folder."""
