"""Mechanisms shared by several learners: classifiers, feature passes, class statistics, prompts."""
