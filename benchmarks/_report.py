"""Shared by the benchmark scripts: markdown tables and BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys

import jax

from autospace_jax.runtime import platforms

platforms.skip_absent_tpu()  # Before machine() asks JAX for its backend.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    backend = jax.default_backend()
    return f"{os.cpu_count()} CPU cores ({cpu}), {backend} backend, jax {jax.__version__}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command() -> str:
    """How this benchmark was started (its section's first line): the script and its flags."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join(["python", script, *sys.argv[1:]])


def write_section(name: str, command: str, body: str) -> None:
    """Replaces (or appends) the section ``name`` of BENCHMARKS.md."""
    date = datetime.date.today().isoformat()
    parts = [f"<!-- {name} -->\n## {name}", f"`{command}`", f"{date}, {machine()}", body]
    section = "\n\n".join(parts) + f"\n<!-- /{name} -->"
    text = open(BENCHMARKS).read() if os.path.exists(BENCHMARKS) else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = f"{text.rstrip()}\n\n{section}\n"
    with open(BENCHMARKS, "w") as f:
        f.write(text)
