"""Hydra configs of the plugin: ``method/ranpac_mini.yaml`` (a ``pilot.configs`` entry point names this package)."""
