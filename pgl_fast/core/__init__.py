"""pgl_fast.core.learner."""
