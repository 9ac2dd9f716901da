"""The README's Python runs as written and every relative link in the docs resolves."""

import ast
import contextlib
import glob
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

_FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _blocks(text, lang):
    return [body for kind, body in _FENCE.findall(text) if kind == lang]


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def _expected_prints(block):
    """For each top-level ``print(...)  # <literal>`` line, the literal (else None)."""
    out = []
    for line in block.splitlines():
        if not line.startswith("print("):
            continue
        comment = line.partition("  # ")[2].strip()
        out.append(_literal(comment) if comment else None)
    return out


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    blocks = _blocks(_read(README), "python")
    assert blocks, "README.md has no ```python blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(blocks, 1):
        buf = io.StringIO()
        code = compile(block, f"README.md python block {i}", "exec")
        with contextlib.redirect_stdout(buf):
            exec(code, namespace)
        # A literal in the comment after a print is what the reader is told to expect.
        printed = buf.getvalue().splitlines()
        expected = _expected_prints(block)
        assert len(printed) == len(expected), (i, printed)
        for line, want in zip(printed, expected):
            if want is not None:
                assert _literal(line) == want, f"block {i}: printed {line!r}, README says {want!r}"


def test_readme_quick_start_is_two_commands_and_ci_runs_the_second():
    text = _read(README)
    quick = re.search(r"^## Quick start\n(.*?)^##", text, re.M | re.S)
    assert quick is not None
    commands = _blocks(quick.group(1), "bash")
    assert len(commands) == 2, commands
    assert all("\n" not in c.strip() for c in commands)
    demo, tests = (c.strip() for c in commands)
    assert demo.endswith("torchdefects demo")
    assert tests.endswith("python -m pytest") and '".[test,onnx]"' in tests
    # .ci/run reads the command from the block after this sentence; keep them together.
    assert re.search(r"^Run the tests:\s*\n+```bash\n" + re.escape(tests) + "\n```", text, re.M)
    ci = _read(os.path.join(ROOT, ".ci", "run"))
    assert "Run the tests:" in ci and 'eval "$cmd"' in ci


def _doc_files():
    files = [README, os.path.join(ROOT, "CHANGELOG.md")]
    files += sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return [f for f in files if os.path.isfile(f)]


def _relative_links(text):
    text = _FENCE.sub("", text)
    text = _INLINE_CODE.sub("", text)
    for target in _INLINE_LINK.findall(text) + _REF_LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor in the same page
        yield target


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(doc):
    base = os.path.dirname(doc)
    missing = []
    for target in _relative_links(_read(doc)):
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not path:
            continue
        if not os.path.exists(os.path.normpath(os.path.join(base, path))):
            missing.append(target)
    assert not missing, f"{os.path.relpath(doc, ROOT)}: links to missing files: {missing}"


def test_link_checker_finds_links():
    text = "[a](docs/x.md) [b](https://e.org) [c](#top) `[d](no.md)` ![e](img/p.png#f)\n[r]: ref.md"
    assert sorted(_relative_links(text)) == ["docs/x.md", "img/p.png#f", "ref.md"]
