"""hkstore.store: the archive format. Never imports jax or haiku."""
