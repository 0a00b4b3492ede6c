"""Kubeflow components of the sermtl pipeline.

Each component is a thin lightweight-Python wrapper around one sermtl library call, so the same
code runs in the local SubprocessRunner (where ``base_image`` is ignored and the current
interpreter, with sermtl installed, executes the body) and on a cluster (where the body runs in
the project image, which already carries sermtl and kfp: hence no ``packages_to_install`` and
``install_kfp_package=False``).

Images: every component is declared with ``SERMTL_IMAGE`` as its ``base_image``; the pipeline then
sets each task's image (``PipelineTask.set_container_image``) from ``resolve_images``: the CPU image
for every step, the CUDA image for training on GPUs.
"""

from __future__ import annotations

import os

DEFAULT_IMAGE = "ghcr.io/sermtl/sermtl:0.1.0"
IMAGE_ENV = "SERMTL_IMAGE"
CUDA_IMAGE_ENV = "SERMTL_CUDA_IMAGE"
CUDA_TAG_SUFFIX = "-cuda"  # infra/docker/README.md: `$IMAGE:$TAG-cuda` is built from Dockerfile.cuda

# The project image built from infra/; one name for every component, overridable at compile time.
SERMTL_IMAGE: str = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


def cuda_variant(image: str) -> str:
    """The CUDA image that goes with a CPU image: `repo:tag` -> `repo:tag-cuda` (untagged: `latest-cuda`).

    An image pinned by digest has no such sibling name: name the CUDA image explicitly then.
    """
    if "@" in image:
        raise ValueError(
            f"{image}: an image pinned by digest has no '{CUDA_TAG_SUFFIX}' sibling; set the CUDA image "
            f"explicitly (params.yaml cluster.images.cuda or ${CUDA_IMAGE_ENV})"
        )
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        return image + CUDA_TAG_SUFFIX
    return f"{image}:latest{CUDA_TAG_SUFFIX}"


def resolve_images(cpu: str = "", cuda: str = "") -> tuple[str, str]:
    """(CPU image, CUDA image) for a compiled pipeline: the environment variable, else the params.yaml
    value (cluster.images), else the default; the CUDA image defaults to the CPU image's `-cuda` tag."""
    cpu_image = os.environ.get(IMAGE_ENV) or cpu or DEFAULT_IMAGE
    cuda_image = os.environ.get(CUDA_IMAGE_ENV) or cuda or cuda_variant(cpu_image)
    return cpu_image, cuda_image
