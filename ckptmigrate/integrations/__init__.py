"""Migration at load time: ``load_state_dict``, ``attach`` (a load pre-hook on a module), and the
Lightning callback."""
