"""Where bytes land: atomic writes, backups, and the per-file locks that serialise writers."""
