"""tests/mutants.py stays runnable: every mutant's snippet occurs exactly once in its file and names tests that exist."""

import pytest

from mutants import MUTANTS, REPO, occurrences


@pytest.mark.parametrize("name, path, old, new, tests", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_the_mutants_snippet_occurs_exactly_once(name, path, old, new, tests):
    assert occurrences(path, old) == 1, f"{path}: the snippet for {name!r} occurs {occurrences(path, old)} times; update tests/mutants.py"
    assert old != new
    for test in tests:
        file, _, function = test.partition("::")
        assert (REPO / file).exists(), test
        assert not function or f"def {function}(" in (REPO / file).read_text(), test
