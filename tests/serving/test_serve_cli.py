"""`python -m loopcoder_jax.serve` start-up errors: exit 2 with a message, no traceback."""

from __future__ import annotations

import pytest

from loopcoder_jax import serve


def test_missing_checkpoint_exits_2_with_a_message(tmp_path, capsys):
    assert serve.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,match",
    [
        ([], "one of the arguments --checkpoint --hf is required"),
        (["--checkpoint", "x", "--slots", "0"], "--slots must be >= 1"),
        (["--checkpoint", "x", "--port", "70000"], "--port must lie in"),
        (["--checkpoint", "x", "--max-context", "1"], "--max-context must be >= 2"),
    ],
)
def test_bad_flags_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_bad_mesh_exits_2(tmp_path, capsys):
    assert serve.main(["--checkpoint", str(tmp_path), "--mesh", "rows=2"]) == 2
    assert "--mesh 'rows=2'" in capsys.readouterr().err
