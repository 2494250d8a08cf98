"""The decoder's limit property under a hard memory cap (RLIMIT_AS), run in its own process:

    python -m tests.reliability.decode_capped [EXAMPLES]

After the imports, the address space is capped at what the process already maps plus
CAP_BYTES, so any allocation of a bomb's size (hundreds of megabytes to terabytes) fails with
MemoryError, which `decode_image` does not swallow: the run would fail. Decoding within the
pixel limit (at most MAX_PIXELS, ~16 MB as RGBA) must still work under the cap, which a large
genuine image checks. Prints the outcomes and exits 0 when the property held throughout.
"""

from __future__ import annotations

import collections
import resource
import sys
import warnings

from hypothesis import HealthCheck, given, settings
from PIL import Image

from image.codec import decode_image
from image.errors import DecompressionBomb
from tests.reliability.crafted import check_declared_size, declared_sizes, zlib_bomb_png

CAP_BYTES = 512 * 1024 * 1024
MAX_PIXELS = 4_000_000


def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main(examples: int) -> int:
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    bomb = zlib_bomb_png(5000, 5000)  # 25 MP of zeros in a few kilobytes
    genuine = zlib_bomb_png(1900, 2000)  # 3.8 MP: under the limit, decoded for real
    limit = _mapped_bytes() + CAP_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # the cap must bite, or this run proves nothing
        bytearray(2 * CAP_BYTES)
        print("the memory cap did not apply", file=sys.stderr)
        return 1
    except MemoryError:
        pass

    try:
        decode_image(bomb, max_bytes=10**8, max_pixels=MAX_PIXELS)
        print("the 25 MP compression bomb was decoded", file=sys.stderr)
        return 1
    except DecompressionBomb:
        pass
    assert decode_image(genuine, max_bytes=10**8, max_pixels=MAX_PIXELS).size == (1900, 2000)

    outcomes: collections.Counter = collections.Counter()

    @settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(declared_sizes(MAX_PIXELS))
    def property_holds(case):
        outcomes[check_declared_size(*case)] += 1

    property_holds()
    print(f"decoded under a {CAP_BYTES >> 20} MiB cap: {dict(outcomes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
