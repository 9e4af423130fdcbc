"""Model backends behind one small interface (:class:`mlipuq.backends.base.Backend`)."""
