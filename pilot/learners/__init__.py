"""Learners: one class per method, each a few hooks on :class:`pilot.learners.base.Learner`."""
