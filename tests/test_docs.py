"""The README stays an index, its links resolve, and its main.py commands parse.

Checks the Markdown as text (no rendering): README.md and every file under docs/.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
DOCS = sorted((ROOT / 'docs').rglob('*.md'))
MAX_README_LINES = 300

FENCE = re.compile(r'^```.*?^```', re.S | re.M)
LINK = re.compile(r'\]\(([^)\s]+)\)')
HEADING = re.compile(r'^#{1,6}\s+(.*?)\s*$', re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks (code may hold brackets that are not links)."""
    return FENCE.sub('', text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace('`', '')
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(_prose(path.read_text())):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f'{slug}-{n}')
    return anchors


def _main_py_commands(text: str) -> list[list[str]]:
    """The arguments after `main.py` of every shell command in the ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r'^```(?:bash|sh)\n(.*?)^```', text, re.S | re.M):
        for line in block.replace('\\\n', ' ').splitlines():
            tokens = shlex.split(line, comments=True)
            if 'main.py' in tokens:
                commands.append(tokens[tokens.index('main.py') + 1:])
    return commands


@pytest.fixture(scope='module')
def main_parser() -> argparse.ArgumentParser:
    import main
    with mock.patch.object(argparse.ArgumentParser, 'parse_args', lambda self, argv=None: self):
        return main.parse_option([])


def test_readme_is_an_index_of_at_most_300_lines():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


@pytest.mark.parametrize('doc', [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r'[a-z]+:', target):
            continue  # http(s), mailto: not checked here
        path_part, _, anchor = target.partition('#')
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f'{target}: no such file')
        elif anchor and path.suffix == '.md' and anchor not in _anchors(path):
            broken.append(f'{target}: no heading #{anchor} in {path.relative_to(ROOT)}')
    assert not broken, f'{doc.relative_to(ROOT)}: ' + '; '.join(broken)


def test_every_docs_file_named_in_the_readme_exists_and_every_docs_file_is_linked():
    text = README.read_text()
    named = set(re.findall(r'docs/[\w/.-]+\.md', text))
    assert named, 'the README names no docs/ file'
    assert not [n for n in named if not (ROOT / n).exists()]
    assert not [str(d.relative_to(ROOT)) for d in DOCS if str(d.relative_to(ROOT)) not in named]


def test_readme_main_py_commands_parse(main_parser):
    commands = _main_py_commands(README.read_text())
    assert len(commands) >= 6, commands  # training, evaluation, throughput, official launch, multi-node
    for argv in commands:
        main_parser.parse_args(argv)  # argparse exits (SystemExit) on an unknown flag or a bad value


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_main_py_commands_parse(main_parser, doc: Path):
    for argv in _main_py_commands(doc.read_text()):
        main_parser.parse_args(argv)


def test_flags_named_in_readme_and_training_doc_exist(main_parser):
    known = set(main_parser._option_string_actions)
    readme_flags = re.findall(r'^- .*$', README.read_text(), re.M)
    flags = {f for line in readme_flags for f in re.findall(r'`(--[a-z][\w-]*)', line)}
    table = (ROOT / 'docs' / 'training.md').read_text()  # its flag table: the first cell of each row
    flags |= {f for cell in re.findall(r'^\| (`--.*?)\|', table, re.M) for f in re.findall(r'(--[a-z][\w-]*)', cell)}
    assert len(flags) >= 15, flags
    assert not sorted(flags - known)


def test_paths_in_the_readme_exist():
    """Files and folders the README names in backticks or in its layout exist (the layout is today's)."""
    text = README.read_text()
    candidates = set(re.findall(r'`([\w./-]+\.(?:py|yaml|md|txt))`', text))
    layout = re.search(r'^## Layout\n+```\n(.*?)^```', text, re.S | re.M)
    assert layout, 'the README has no layout block'
    for line in layout.group(1).splitlines():
        if line.startswith(' '):  # the description of the entry above, continued
            continue
        first = line.split()[0]  # the entry: a file or folder at the root, or a path under one
        candidates.add(first)
        candidates |= {p for p in re.findall(r'[\w-]+/[\w./-]*\.py', line)}
    assert len(candidates) >= 20, candidates
    missing = sorted(c for c in candidates if '*' not in c and not (ROOT / c).exists())
    assert not missing
