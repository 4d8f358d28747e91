"""The README's measured tables say what the committed benchmark files say."""

from __future__ import annotations

from bench.readme import BLOCK, RESULTS, ROOT, render


def test_every_bench_block_in_the_readme_matches_its_json():
    blocks = list(BLOCK.finditer((ROOT / "README.md").read_text()))
    assert blocks, "README.md has no <!-- bench:NAME --> blocks"
    for m in blocks:
        expected = render(m.group("name"))
        assert expected is not None, f"README block {m.group('name')!r} has no {RESULTS}/{m.group('name')}/*.json"
        assert m.group("body") == expected, f"README block {m.group('name')!r} is stale: run `python -m bench readme`"
