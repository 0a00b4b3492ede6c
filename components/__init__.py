"""Kubeflow components of the sermtl pipeline: each a thin wrapper around one library call, run by the
local runner or in the project image (docs/design/pipeline.md)."""

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
