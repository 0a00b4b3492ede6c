"""Plots and HTML pages of every report (results, significance, comparison, validation, MLflow plots), made
one way: a headless pyplot, PNG bytes or an inline base64 image, and one page skeleton and style."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

PAGE_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display on servers and in pipeline steps); imported late:
    matplotlib costs a second and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure: Any, dpi: int = 110) -> bytes:
    """The figure as PNG, closed (a long study draws hundreds: open figures would pile up)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(figure)
    return buffer.getvalue()


def save_png(figure: Any, path: Path, dpi: int = 90) -> None:
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


def inline_image(png: bytes, alt: str) -> str:
    """An <img> carrying the PNG itself, so a report is one self-contained file."""
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def html_page(title: str, body: str, style: str = "") -> str:
    """The page skeleton every HTML report uses; `style` adds to (and overrides) PAGE_STYLE."""
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}{style}</style></head><body>{body}</body></html>\n"
    )
