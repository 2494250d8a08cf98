"""Dollars per 1000 images per operation, from measured GPU-seconds and a stated price.

    python -m bench --cost                        # the newest results in bench/results/
    python -m bench --cost bench/results/X.json

cost per 1000 images = seconds per image x price per second x 1000, with the seconds of
one warm request (the bench's median: the GPU is busy that long per image; queueing, I/O,
encode and idle time are not in it). Prices are LIST PRICES, on-demand, without committed
use or sustained use discounts: update them here when they change. They were not re-read
on the date below (no web access in the session that wrote this): check the sources before
quoting a figure.

A price applies to the card it names. Seconds measured on another card (an H100's seconds
priced at an L4's rate) give a lower bound only: an L4 is several times slower than an
H100 at fp16, so the table marks those columns "other card" and the L4 figure needs a run on
an L4 (Cloud Run GPU) with the same command.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Price:
    """What one second of a GPU instance costs, and where the figure comes from."""

    name: str
    card: str  # a whole word of the results' card name, any case (same_card)
    dollars_per_second: float
    breakdown: str
    source: str


PRICES_AS_OF = "2025-06 list prices (Cloud Run GPU GA), recorded 2026-11-26 without re-checking"

PRICES = (
    Price(
        name="Cloud Run L4",
        card="L4",
        # GPU $0.0001867/s (no zonal redundancy) + infra/terraform's default 8 vCPU x
        # $0.000018/s + 32 GiB x $0.000002/s, instance-based billing, Tier 1 region (us-central1).
        dollars_per_second=0.0001867 + 8 * 0.000018 + 32 * 0.000002,
        breakdown="L4 $0.0001867/s + 8 vCPU x $0.000018/s + 32 GiB x $0.000002/s (Terraform's "
        "default cpu and memory; Tier 1, instance-based billing, no zonal redundancy)",
        source="https://cloud.google.com/run/pricing",
    ),
    Price(
        name="GCE H100 on-demand",
        card="H100",
        dollars_per_second=11.06 / 3600,
        breakdown="a3-highgpu-1g (1 x H100 80GB, 26 vCPU, 234 GB) on-demand, us-central1, "
        "about $11.06/hour",
        source="https://cloud.google.com/compute/vm-instance-pricing#accelerator-optimized",
    ),
)


def _per_thousand(seconds: float | None, price: Price) -> float | None:
    return None if seconds is None else seconds * price.dollars_per_second * 1000


def same_card(price_card: str, card: str) -> bool:
    """Whether `card` (the GPU's name, "NVIDIA L4") is the one a price names ("L4"): a whole
    word, so an L40S is not priced as an L4."""
    return re.search(rf"\b{re.escape(price_card)}\b", card, re.IGNORECASE) is not None


def cost_rows(results: dict, prices=PRICES) -> list[dict]:
    """Per case and path: seconds per image and dollars per 1000 images at each price."""
    card = results["environment"]["card"]
    rows = []
    for case in results.get("cases", []):
        paths = [("stock", case.get("stock")), ("imagen", case.get("imagen"))]
        paths += [(f"imagen [{name}]", entry) for name, entry in (case.get("variants") or {}).items()]
        for label, entry in paths:
            seconds = (entry or {}).get("seconds")
            if seconds is None:
                continue
            rows.append({
                "case": case["case"],
                "operation": case["operation"],
                "path": label,
                "seconds": seconds,
                "dollars_per_1000": {
                    p.name: _per_thousand(seconds, p) for p in prices
                },
                "same_card": {p.name: same_card(p.card, card) for p in prices},
            })
    return rows


def format_cost(results: dict, prices=PRICES) -> str:
    """The cost table (Markdown) with the prices and their sources under it."""
    env = results["environment"]
    header = "| case | path | s / image (" + env["card"] + ") | " + " | ".join(
        f"$ / 1000 at {p.name}" for p in prices) + " |"
    lines = [header, "|" + "---|" * (3 + len(prices))]
    for row in cost_rows(results, prices):
        cells = []
        for p in prices:
            value = row["dollars_per_1000"][p.name]
            mark = "" if row["same_card"][p.name] else " (other card)"
            cells.append(f"{value:.3f}{mark}")
        lines.append(f"| {row['case']} | {row['path']} | {row['seconds']:.3f} | " + " | ".join(cells) + " |")
    notes = [f"Prices: {PRICES_AS_OF}; list prices to update in bench/cost.py."]
    notes += [f"- {p.name}: ${p.dollars_per_second * 3600:.3f}/hour = {p.breakdown}; {p.source}" for p in prices]
    if env.get("device", "").startswith("cpu"):
        notes.append("These seconds were measured on a CPU: the dollars only show the table's shape.")
    else:
        notes.append("'(other card)': seconds measured on this card priced at another card's rate; "
                     "rerun the bench on that card for its figure.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)
