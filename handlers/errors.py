"""Cloud-side exceptions, on top of `image.errors`.

    ImagenError                     (image.errors)
    ├── InputError                  permanent: a failure report, then an ack
    │   ├── ... image errors ...
    │   ├── UnsafeObjectName        a name that cannot be mapped safely into the layout
    │   ├── BadJobMessage           a job message naming its source but wrong otherwise
    │   ├── SourceNotAllowed        a job message's output not allowed, or any job message where
    │   │                           IMAGEN_ALLOWED_BUCKETS is unset (a source outside the list
    │   │                           when set, a notification's too, or a code bucket's:
    │   │                           Undeliverable instead)
    │   ├── OutputTaken             the output path holds another live source's result
    │   ├── OperationNotServed      a filtered subscription brought a job for another pool's
    │   │                           operation (imagen-operation metadata across folders)
    │   ├── OperationNotDeployed    no pool of an unfiltered deployment serves the job
    │   ├── JobStoppedWorker        the job was running each time its process died (a crash,
    │   │                           memory, a GPU that failed or hung): not run again
    │   └── StoragePermanentError   403/404/400 from Cloud Storage on the job's own objects
    ├── EventError                  a request or message that cannot be parsed (to the dead-letter
    │                               topic at once where IMAGEN_DEAD_LETTER_TOPIC names it; else
    │                               HTTP 400, nack; a body that is no push envelope: 400)
    ├── Undeliverable               refused, with no bucket of ours to report in (the same: the
    │                               message ends in the dead-letter topic)
    ├── ConfigError                 bad settings; raised at start-up, names the variable
    ├── SourceSuperseded            the event's generation is gone or replaced: skip, ack
    └── TransientError              worth retrying: 429/5xx, timeouts (HTTP 503, nack)
        ├── PreconditionLost        another writer changed the output first: look again
        └── ReportRefused           a failure report refused for good (400/403/404)

Only the HTTP edge (`handlers.http`) and the pull worker turn these into transport answers.
"""

from __future__ import annotations

from handlers.logs import clip
from image.errors import ImagenError, InputError


class UnsafeObjectName(InputError):
    pass


class SourceNotAllowed(InputError):
    pass


class StoragePermanentError(InputError):
    pass


class BadJobMessage(InputError):
    """A job message that names its source but is wrong otherwise (an unknown field, no
    operation, params that are no object, a bad output or generation): reported beside the
    source. Its own type: the report says nothing about the object (imagen backfill queues it
    as it would any object whose report is of another kind)."""


class OutputTaken(InputError):
    """Two sources map to one output (photo.jpg and photo.png): the first keeps it."""


class OutputNotWritable(InputError):
    """Cloud Storage refused the output a job message named, outside the output prefix: the
    workers may write only under it (Terraform's grant), so no retry would help."""


class OperationNotServed(InputError):
    """A job this pool cannot serve reached it through a subscription filtered to its own
    operations (IMAGEN_FILTERED_SUBSCRIPTION): no other pool received it, so skipping it would
    lose it. A job message naming the operation reaches the right pool."""


class OperationNotDeployed(InputError):
    """Every pool receives every job (IMAGEN_DEPLOYED_OPERATIONS) and none of them serves this
    one (a chain, an operation left out): one of them reports it. No message reaches a pool
    that is not there."""


class JobStoppedWorker(InputError):
    """Deliveries of the job kept ending with their process (killed while it ran): each
    retry would take down another worker and its cold start."""


class EventError(ImagenError):
    """The request or message cannot be parsed; `reason` says why, in at most REASON_LIMIT
    characters (it quotes what the message holds, which may be any length)."""

    REASON_LIMIT = 300

    def __init__(self, reason: str):
        reason = clip(reason, self.REASON_LIMIT)
        super().__init__(reason)
        self.reason = reason


class Undeliverable(ImagenError):
    """A job refused before any read whose report would have to be written into a bucket we
    must not touch: it is left to the dead-letter topic instead."""

    operation: str | None = None  # the job's operation text, for the metrics' label (Processor.handle sets it)


class ConfigError(ImagenError):
    pass


class TransientError(ImagenError):
    pass


class OutputRefused(TransientError):
    """Cloud Storage refused an output write (401, 403, 404): the deployment's fault while a
    grant propagates or a bucket is made, unless the job itself named that output."""


class SourceSuperseded(ImagenError):
    pass


class PreconditionLost(TransientError):
    pass


class ReportRefused(TransientError):
    """Cloud Storage refused a failure report for good (400, 401, 403, 404): retried like any
    report not written, except where the bucket was never ours to write in."""
