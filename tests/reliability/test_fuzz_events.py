"""A short run of scripts/fuzz_events.py (the full run: `python -m scripts.fuzz_events`,
100,000 inputs): every parser input ends in EventError or a safely routed event."""

from __future__ import annotations

from scripts.fuzz_events import main, run


def test_a_few_thousand_parser_inputs_without_a_crash():
    counts = run(3000, random_seed=20261126)
    assert counts["inputs"] >= 3000
    # The inputs reach every outcome, not only the first parse error.
    assert counts["rejected"] and counts["ignored"] and counts["routed"], counts


def test_the_script_prints_its_count(capsys):
    assert main(["--inputs", "200", "--seed", "1"]) == 0
    assert "parser inputs" in capsys.readouterr().out
