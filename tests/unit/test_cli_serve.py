"""`imagen serve`'s options: refused before anything loads where they could not work."""

from __future__ import annotations

from click.testing import CliRunner

from handlers.cli import main


def test_serve_needs_a_thread_for_health_checks_beside_the_job():
    # With one thread gunicorn serves one request at a time: /healthz would go unanswered for
    # a whole job, and the liveness probe would restart the instance mid-job.
    result = CliRunner().invoke(main, ["serve", "--threads", "1"])
    assert result.exit_code == 2 and "--threads" in result.output and "1 is not in the range x>=2" in result.output
