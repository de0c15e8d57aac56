"""CLI test helpers."""

from __future__ import annotations

import pytest

from nnopt.cli import main


@pytest.fixture
def expect_error(capsys):
    """Run the CLI and check the contract for bad input: exit 2 and one `nnopt: error:` line naming it."""

    def check(argv, message):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("nnopt: error:"), err
        assert message in err, err

    return check
