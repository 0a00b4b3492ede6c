"""Kubeflow components of the sermtl pipeline.

Each component is a thin lightweight-Python wrapper around one sermtl library call, so the same
code runs in the local SubprocessRunner (where ``base_image`` is ignored and the current
interpreter, with sermtl installed, executes the body) and on a cluster (where the body runs in
the project image, which already carries sermtl and kfp: hence no ``packages_to_install`` and
``install_kfp_package=False``).
"""

from __future__ import annotations

import os

# The project image built from infra/; one name for every component, overridable at compile time.
SERMTL_IMAGE: str = os.environ.get("SERMTL_IMAGE", "ghcr.io/sermtl/sermtl:0.1.0")
