"""pgl_fast.runtime.optim."""
