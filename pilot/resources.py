"""Files that live beside the code at the top of the repository but must also ship in the wheel.

The repository keeps the Hydra configs in ``configs/`` and the published numbers in
``results/published.csv``. ``pyproject.toml`` maps these folders into the package as
``pilot/configs`` and ``pilot/results`` when a wheel is built, so an installed copy (``pip install .``
or a wheel) finds them inside ``pilot/``, while a checkout or an editable install reads the
top-level folders directly. Only the standard library is imported here: the entry points resolve
these paths before anything slow loads.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: str, marker: str) -> Path:
    """The folder ``name`` (``configs`` or ``results``) that holds the file ``marker``.

    The copy inside an installed package (``pilot/<name>``) wins; otherwise the folder beside the
    package in a checkout. When neither holds ``marker`` the checkout path is returned, so that the
    error a caller raises names the place a developer expects.
    """
    candidates = (PACKAGE_DIR / name, PACKAGE_DIR.parent / name)
    for candidate in candidates:
        if (candidate / marker).is_file():
            return candidate
    return candidates[-1]
