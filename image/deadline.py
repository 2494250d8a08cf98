"""A job's time budget on the GPU: the work stops at the first denoising step past it.

    deadline = Deadline(540)                      # started now
    deadline.check("upscale at denoising step 12")  # raises JobTooLong once 540 s have passed
    deadline.check_pace(2, 90, "tiles", "upscale")  # ... or now, if 90 tiles would take 594 s+

The engine starts one when it starts a job on the device (after any wait for it), and the
operations check it between denoising steps, tiles and operations: a job that would run for
an hour on a slow card stops with an error that says so, instead of holding the GPU until
the platform kills the request and redelivers it to do the same again.
"""

from __future__ import annotations

import time

from image.errors import JobTooLong


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self, where: str) -> None:
        """Raise JobTooLong naming `where` once the budget is spent."""
        elapsed = self.elapsed()
        if elapsed > self.seconds:
            raise JobTooLong(
                f"{where}: stopped after {elapsed:.0f} s, past the job's time budget of {self.seconds:g} s; {_ADVICE}"
            )

    def check_pace(self, done: int, total: int, what: str, where: str, since: float = 0.0) -> None:
        """After `done` of `total` like parts of a job (`what`: "tiles") that started `since`
        seconds into the budget: raise JobTooLong at once when, at their pace, the job would
        overrun the budget by more than a tenth, instead of spending the budget before failing.
        Closer calls are left to `check`."""
        if not 0 < done < total:
            return
        elapsed = self.elapsed()
        projected = since + (elapsed - since) / done * total
        if projected > 1.1 * self.seconds:
            before = f" (after {since:.0f} s of other work)" if since >= 0.5 else ""
            raise JobTooLong(
                f"{where}: {done} of {total} {what} took {elapsed - since:.0f} s{before}, so the job would take "
                f"about {projected:.0f} s, past its time budget of {self.seconds:g} s; {_ADVICE}"
            )


_ADVICE = ("a retry would take as long. A smaller image or fewer steps fits, or raise the budget "
           "(--max-job-seconds)")
