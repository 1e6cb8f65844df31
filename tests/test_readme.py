"""The README is run as written: its Python snippet executes, and every file its commands name exists."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_python_snippets_run_as_written():
    assert blocks("python")
    for code in blocks("python"):
        exec(compile(code, "README.md", "exec"), {})


def test_every_file_a_command_or_link_names_exists():
    named = set()
    for command in blocks("bash"):
        named |= set(re.findall(r"\b((?:configs|bench|docs|tests)/[\w./-]+\.\w+)", command))
    named |= {link.split("#")[0] for link in re.findall(r"\]\(((?!https?:)[^)]+)\)", README)}
    assert named and all((ROOT / path).exists() for path in named), sorted(p for p in named if not (ROOT / p).exists())
    assert len(README.splitlines()) <= 300
