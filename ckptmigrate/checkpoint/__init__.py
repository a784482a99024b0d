"""A checkpoint file as ckptmigrate sees it: the lazy checkpoint, where its state dict sits (layout),
and the envelope of metadata it carries."""
