"""Example pilot plugin: the method ``ranpac_mini`` (see docs/adding_a_method.md in pilot).

Nothing is imported here: pilot imports this package to find its config folder, and that must stay
cheap (no torch). The learner lives in :mod:`pilot_example_plugin.learner`.
"""

__version__ = "0.1.0"
