"""Synthetic short-term-rental listings shaped like Inside Airbnb's ``listings.csv``.

For tests, demos and dry runs when the real files (``shared/data/airbnb_listings``)
are not at hand. The generator is deterministic: the same ``(city, rows,
seed)`` always writes the same bytes. The distributions imitate the real
data closely enough for the queries Hansa's demo asks:

- neighbourhood sizes are skewed (Zipf-like weights), so small cells exist
  and the minimum-group-size rule has something to suppress;
- prices are lognormal with a room-type-dependent median, in local currency;
- most hosts have one listing, a few have many (``calculated_host_listings_count``
  is the host's actual count in the file);
- listings without reviews have empty ``last_review`` and ``reviews_per_month``,
  as in the real exports;
- ``name`` sometimes contains commas and quotes, so the CSV needs quoting;
- ``neighbourhood_group`` is empty and ``license`` mostly empty, as in the
  six real cities.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
import random
from pathlib import Path
from typing import Final

from hansa.protocol.messages import ColumnRole

__all__ = ["LISTING_COLUMNS", "default_listing_roles", "write_listings_csv"]

LISTING_COLUMNS: Final[tuple[str, ...]] = (
    "id",
    "name",
    "host_id",
    "host_name",
    "neighbourhood_group",
    "neighbourhood",
    "latitude",
    "longitude",
    "room_type",
    "price",
    "minimum_nights",
    "number_of_reviews",
    "last_review",
    "reviews_per_month",
    "calculated_host_listings_count",
    "availability_365",
    "number_of_reviews_ltm",
    "license",
)
"""The 18 columns of Inside Airbnb's summary ``listings.csv``, in order."""

# Approximate centres and local nightly price medians of the six real cities;
# any other city gets a centre and scale derived from its name.
_CITIES: Final[dict[str, tuple[float, float, float]]] = {
    "austin": (30.27, -97.74, 150.0),
    "bangkok": (13.75, 100.50, 1400.0),
    "buenos-aires": (-34.60, -58.38, 3500.0),
    "cape-town": (-33.92, 18.42, 1100.0),
    "istanbul": (41.01, 28.98, 350.0),
    "melbourne": (-37.81, 144.96, 140.0),
}
_ROOM_TYPES: Final = (
    ("Entire home/apt", 0.62, 1.0),
    ("Private room", 0.33, 0.45),
    ("Hotel room", 0.03, 0.8),
    ("Shared room", 0.02, 0.25),
)
_SYLLABLES: Final = (
    "ka", "ri", "mo", "ne", "sa", "lu", "to", "va", "be", "do",
    "mi", "ra", "che", "po", "li", "an", "el", "or", "um", "is",
)  # fmt: skip
_SUFFIXES: Final = ("Park", "Hill", "Heights", "Central", "North", "South", "Bay", "Town", "Vale")
_FIRST_NAMES: Final = (
    "Ana", "Ben", "Chloe", "David", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jomo",
    "Kai", "Lucia", "Mehmet", "Nok", "Olivia", "Pablo", "Quynh", "Rosa", "Sipho", "Tom",
)  # fmt: skip
_ADJECTIVES: Final = ("Cozy", "Bright", "Modern", "Quiet", "Charming", "Spacious", "Sunny")
_PLACES: Final = ("studio", "loft", "apartment", "room", "house", "flat", "suite")
_SNAPSHOT: Final = dt.date(2021, 11, 1)


def _rng(city: str, seed: int) -> random.Random:
    # Python's str hash is salted per process; derive the seed with SHA-256 instead.
    digest = hashlib.sha256(f"{city}\x00{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))  # noqa: S311 (test data, not secrets)


def _city_shape(city: str) -> tuple[float, float, float]:
    if city in _CITIES:
        return _CITIES[city]
    h = hashlib.sha256(city.encode()).digest()
    lat = (h[0] / 255.0) * 120.0 - 60.0
    lon = (h[1] / 255.0) * 360.0 - 180.0
    return lat, lon, 50.0 + 10.0 * h[2]


def _neighbourhoods(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        stem = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        name = stem if rng.random() < 0.5 else f"{stem} {rng.choice(_SUFFIXES)}"
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def _listing_name(rng: random.Random, room: str, hood: str) -> str:
    place = rng.choice(_PLACES)
    name = f"{rng.choice(_ADJECTIVES)} {place} in {hood}"
    roll = rng.random()
    if roll < 0.1:
        name += ", close to transit"
    elif roll < 0.15:
        name = f'"{name}" - {room.lower()}'
    return name


def write_listings_csv(path: Path | str, *, city: str, rows: int, seed: int) -> Path:
    """Write ``rows`` synthetic listings for ``city`` to a CSV file.

    Args:
        path: the file to write (parent directories are created).
        city: a city id; the six Inside Airbnb cities get their real centre
            and price level, others a derived one.
        rows: number of listings (>= 0).
        seed: seed of the deterministic generator.

    Returns:
        The path written.

    Raises:
        ValueError: ``rows`` is negative.
        OSError: the file cannot be written.
    """
    if rows < 0:
        raise ValueError("rows must be >= 0")
    rng = _rng(city, seed)
    lat0, lon0, median_price = _city_shape(city)
    hood_count = max(3, min(60, int(math.sqrt(max(rows, 1)) * 1.5)))
    hoods = _neighbourhoods(rng, hood_count)
    # Zipf-like neighbourhood weights: a few big central areas, a long tail.
    hood_weights = [1.0 / (i + 1) ** 1.1 for i in range(hood_count)]
    hood_centres = [
        (lat0 + rng.gauss(0.0, 0.05), lon0 + rng.gauss(0.0, 0.05)) for _ in range(hood_count)
    ]
    # Hosts: most own one listing, a few own many (Pareto-distributed sizes).
    host_of: list[int] = []
    host_names: dict[int, str] = {}
    next_host = 1000 + rng.randrange(1000)
    while len(host_of) < rows:
        # Capped so that no single host dominates a small file.
        size = min(rows - len(host_of), int(rng.paretovariate(1.8)), max(1, rows // 40))
        next_host += rng.randint(1, 5000)
        host_names[next_host] = rng.choice(_FIRST_NAMES)
        host_of.extend([next_host] * size)
    rng.shuffle(host_of)
    listings_per_host: dict[int, int] = {}
    for host in host_of:
        listings_per_host[host] = listings_per_host.get(host, 0) + 1

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    listing_id = 2000 + rng.randrange(5000)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(LISTING_COLUMNS)
        for i in range(rows):
            listing_id += rng.randint(1, 40_000)
            h = rng.choices(range(hood_count), weights=hood_weights)[0]
            room, _, price_factor = rng.choices(_ROOM_TYPES, weights=[r[1] for r in _ROOM_TYPES])[0]
            price = max(10, round(rng.lognormvariate(math.log(median_price * price_factor), 0.7)))
            minimum_nights = rng.choice((1, 1, 1, 2, 2, 3, 3, 5, 7, 30, 30, 90))
            reviews = 0 if rng.random() < 0.22 else int(rng.expovariate(1 / 35.0)) + 1
            if reviews:
                age_days = min(int(rng.expovariate(1 / 300.0)), 3000)
                last_review = _SNAPSHOT - dt.timedelta(days=age_days)
                months_active = max(1.0, age_days / 30.0 + rng.uniform(1.0, 60.0))
                last_review_text = last_review.isoformat()
                per_month = f"{max(0.01, reviews / months_active):.2f}"
                ltm = min(reviews, int(rng.expovariate(1 / 6.0)))
            else:
                last_review_text, per_month, ltm = "", "", 0
            availability = 0 if rng.random() < 0.3 else rng.randint(1, 365)
            licence = f"STR-{rng.randrange(10**6):06d}" if rng.random() < 0.08 else ""
            host = host_of[i]
            lat_c, lon_c = hood_centres[h]
            writer.writerow(
                (
                    listing_id,
                    _listing_name(rng, room, hoods[h]),
                    host,
                    host_names[host],
                    "",
                    hoods[h],
                    f"{lat_c + rng.gauss(0.0, 0.01):.5f}",
                    f"{lon_c + rng.gauss(0.0, 0.01):.5f}",
                    room,
                    price,
                    minimum_nights,
                    reviews,
                    last_review_text,
                    per_month,
                    listings_per_host[host],
                    availability,
                    ltm,
                    licence,
                )
            )
    return out


def default_listing_roles() -> dict[str, ColumnRole]:
    """Return the roles a city would give the listings columns.

    Listing and host ids are identifiers (countable, never released); free
    text that can name a person or a property (``name``, ``host_name``,
    ``license``) and exact coordinates are hidden; ``neighbourhood``,
    ``neighbourhood_group`` and ``room_type`` are dimensions (Austin's
    ZIP-code neighbourhoods are integers, still a dimension); the counts and
    prices are measures; ``last_review`` is the time column.

    Returns:
        A role per listings column.
    """
    roles = {
        "id": ColumnRole.IDENTIFIER,
        "name": ColumnRole.HIDDEN,
        "host_id": ColumnRole.IDENTIFIER,
        "host_name": ColumnRole.HIDDEN,
        "neighbourhood_group": ColumnRole.DIMENSION,
        "neighbourhood": ColumnRole.DIMENSION,
        "latitude": ColumnRole.HIDDEN,
        "longitude": ColumnRole.HIDDEN,
        "room_type": ColumnRole.DIMENSION,
        "last_review": ColumnRole.TIME,
        "license": ColumnRole.HIDDEN,
    }
    for column in LISTING_COLUMNS:
        roles.setdefault(column, ColumnRole.MEASURE)
    return roles
