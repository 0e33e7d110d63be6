"""``synthetic:airline``: a small seeded airline world that needs no external data.

Flights, users and reservations are drawn from a seed with the same record
layout as tau-bench's airline data, and the tools are tau-bench's airline
tools (:mod:`turnrl.envs.airline`), so everything downstream (reward, tiers,
runner) behaves as on the real domain. Each task carries a short user script
in ``facts`` for :class:`~turnrl.envs.ScriptedUser`.
"""

from __future__ import annotations

import random
from typing import Any

from turnrl.envs._base import Action, Domain, Task
from turnrl.envs.airline import AIRPORTS, V1_TOOLS
from turnrl.exceptions import InvalidInputError

POLICY = """# Synthetic airline agent policy

You help users of a small airline manage reservations. Today is 2024-05-15.

- Before any change, get the user id and look up the user or reservation with the tools.
- Before a tool that changes the database (booking, cancelling, changing flights,
  baggage or passengers, sending certificates), list the details and get an explicit
  "yes" from the user.
- Make one tool call at a time. Do not invent information or procedures.
- Cancellation: any reservation the user asks to cancel may be cancelled; the refund goes
  to the original payment methods.
- Cabin changes keep the same flights; pay any difference with a credit card or gift card
  on the user's profile (never a certificate).
- Baggage: each non-free bag costs 50 dollars, paid with a card on the profile.
- Passenger changes keep the number of passengers.
- Bookings: direct flights only here; pay in full with the payment methods the user picks.
- Transfer to a human agent only when the user asks for one or the request is outside
  this policy; then tell the user they are being transferred.
"""

FIRST = ["Ava", "Liam", "Mia", "Noah", "Zoe", "Omar", "Ivy", "Raj", "Lena", "Yuki", "Ezra", "Nia"]
LAST = ["Kim", "Silva", "Patel", "Brown", "Garcia", "Chen", "Novak", "Ali", "Berg", "Ito"]
CABINS = ("basic_economy", "economy", "business")
DATES = [f"2024-05-{d:02d}" for d in range(16, 31)]


def _flights(rng: random.Random, n_routes: int) -> dict[str, Any]:
    codes = list(AIRPORTS)[:8]
    flights: dict[str, Any] = {}
    for i in range(n_routes):
        origin, destination = rng.sample(codes, 2)
        hour = rng.randrange(5, 20)
        number = f"HAT{i + 1:03d}"
        dates = {}
        for d in DATES:
            if rng.random() < 0.1:
                dates[d] = {"status": "cancelled"}
                continue
            base = rng.randrange(50, 200)
            dates[d] = {
                "status": "available",
                "available_seats": {c: rng.randrange(2, 20) for c in CABINS},
                "prices": {
                    "basic_economy": base,
                    "economy": base + rng.randrange(40, 120),
                    "business": base + rng.randrange(250, 600),
                },
            }
        flights[number] = {
            "flight_number": number,
            "origin": origin,
            "destination": destination,
            "scheduled_departure_time_est": f"{hour:02d}:00:00",
            "scheduled_arrival_time_est": f"{hour + rng.randrange(1, 4):02d}:30:00",
            "dates": dates,
        }
    return flights


def _bookable(flights: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    while True:
        number = rng.choice(sorted(flights))
        date = rng.choice(DATES)
        if flights[number]["dates"][date]["status"] == "available":
            return number, date


def generate(
    seed: int = 0, n_users: int = 12, n_routes: int = 16, n_tasks: int = 24
) -> tuple[dict[str, Any], list[Task]]:
    """The tables and tasks of one synthetic world; same seed, same world."""
    if n_users < 1 or n_routes < 2 or n_tasks < 0:
        raise InvalidInputError("synthetic:airline needs n_users >= 1, n_routes >= 2, n_tasks >= 0")
    rng = random.Random(seed)
    flights = _flights(rng, n_routes)
    users: dict[str, Any] = {}
    reservations: dict[str, Any] = {}
    for u in range(n_users):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        user_id = f"{first.lower()}_{last.lower()}_{1000 + u}"
        card = f"credit_card_{rng.randrange(10**6, 10**7)}"
        gift = f"gift_card_{rng.randrange(10**6, 10**7)}"
        cert = f"certificate_{rng.randrange(10**6, 10**7)}"
        dob = f"19{rng.randrange(50, 99)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 28):02d}"
        users[user_id] = {
            "name": {"first_name": first, "last_name": last},
            "dob": dob,
            "payment_methods": {
                card: {
                    "source": "credit_card",
                    "brand": "visa",
                    "last_four": card[-4:],
                    "id": card,
                },
                gift: {"source": "gift_card", "amount": rng.randrange(50, 500), "id": gift},
                cert: {"source": "certificate", "amount": rng.choice([100, 150, 250]), "id": cert},
            },
            "membership": rng.choice(["regular", "silver", "gold"]),
            "reservations": [],
        }
        for _ in range(rng.randrange(1, 3)):
            rid = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(6))
            number, date = _bookable(flights, rng)
            f = flights[number]
            cabin = rng.choice(CABINS)
            price = f["dates"][date]["prices"][cabin]
            passengers = [{"first_name": first, "last_name": last, "dob": dob}]
            if rng.random() < 0.4:
                passengers.append(
                    {"first_name": rng.choice(FIRST), "last_name": last, "dob": "1990-01-01"}
                )
            reservations[rid] = {
                "reservation_id": rid,
                "user_id": user_id,
                "origin": f["origin"],
                "destination": f["destination"],
                "flight_type": "one_way",
                "cabin": cabin,
                "flights": [
                    {
                        "origin": f["origin"],
                        "destination": f["destination"],
                        "flight_number": number,
                        "date": date,
                        "price": price,
                    }
                ],
                "passengers": passengers,
                "payment_history": [{"payment_id": card, "amount": price * len(passengers)}],
                "created_at": "2024-05-10T10:00:00",
                "total_baggages": 0,
                "nonfree_baggages": 0,
                "insurance": "no",
            }
            users[user_id]["reservations"].append(rid)
    tables = {"flights": flights, "reservations": reservations, "users": users}
    tasks = [_task(rng, tables, i) for i in range(n_tasks)]
    return tables, tasks


def _task(rng: random.Random, tables: dict[str, Any], i: int) -> Task:
    users, reservations, flights = tables["users"], tables["reservations"], tables["flights"]
    user_id = rng.choice(sorted(users))
    user = users[user_id]
    name = user["name"]["first_name"]
    card = next(k for k, v in user["payment_methods"].items() if v["source"] == "credit_card")
    rid = rng.choice(user["reservations"])
    res = reservations[rid]
    kind = ["cancel", "bags", "cabin", "passenger", "book", "balance"][i % 6]
    hello = f"Hi, I'm {name}, user id {user_id}."
    outputs: tuple[str, ...] = ()
    if kind == "cancel":
        want = f"You want to cancel reservation {rid}."
        actions = [Action("cancel_reservation", {"reservation_id": rid})]
        lines = [f"{hello} Please cancel reservation {rid}."]
    elif kind == "bags":
        bags = rng.randrange(1, 3)
        want = f"You want {bags} paid checked bags on reservation {rid}, paid with {card}."
        args = {
            "reservation_id": rid,
            "total_baggages": bags,
            "nonfree_baggages": bags,
            "payment_id": card,
        }
        actions = [Action("update_reservation_baggages", args)]
        lines = [f"{hello} I want to add {bags} checked bags to {rid}; charge {card}."]
    elif kind == "cabin":
        cabin = rng.choice([c for c in CABINS if c != res["cabin"]])
        legs = [{"flight_number": f["flight_number"], "date": f["date"]} for f in res["flights"]]
        want = f"You want reservation {rid} in {cabin}, same flights, paying with {card}."
        args = {"reservation_id": rid, "cabin": cabin, "flights": legs, "payment_id": card}
        actions = [Action("update_reservation_flights", args)]
        lines = [f"{hello} Please move reservation {rid} to {cabin}, same flights; use {card}."]
    elif kind == "passenger":
        new_first = rng.choice([f for f in FIRST if f != res["passengers"][-1]["first_name"]])
        passengers = [dict(p) for p in res["passengers"]]
        passengers[-1]["first_name"] = new_first
        last = passengers[-1]
        want = f"On reservation {rid}, the last passenger's first name should be {new_first}."
        args = {"reservation_id": rid, "passengers": passengers}
        actions = [Action("update_reservation_passengers", args)]
        lines = [
            f"{hello} On {rid}, please change passenger {res['passengers'][-1]['first_name']} "
            f"{last['last_name']} (born {last['dob']}) to first name {new_first}."
        ]
    elif kind == "book":
        number, date = _bookable(flights, rng)
        f = flights[number]
        cabin = "economy"
        price = f["dates"][date]["prices"][cabin]
        passenger = {
            "first_name": user["name"]["first_name"],
            "last_name": user["name"]["last_name"],
            "dob": user["dob"],
        }
        args = {
            "user_id": user_id,
            "origin": f["origin"],
            "destination": f["destination"],
            "flight_type": "one_way",
            "cabin": cabin,
            "flights": [{"flight_number": number, "date": date}],
            "passengers": [passenger],
            "payment_methods": [{"payment_id": card, "amount": price}],
            "total_baggages": 0,
            "nonfree_baggages": 0,
            "insurance": "no",
        }
        want = (
            f"You want a one-way economy seat on {number} from {f['origin']} to "
            f"{f['destination']} on {date}, just you, no bags, no insurance, paid with {card}."
        )
        actions = [Action("book_reservation", args)]
        lines = [
            f"{hello} I'd like to book {number} from {f['origin']} to {f['destination']} on "
            f"{date}, economy, one way, only me, no bags, no insurance. Pay with {card}."
        ]
    else:
        gift = next(v for v in user["payment_methods"].values() if v["source"] == "gift_card")
        want = "You want to know your gift card balance."
        actions = [Action("get_user_details", {"user_id": user_id})]
        outputs = (str(gift["amount"]),)
        lines = [f"{hello} What is the balance on my gift card?"]
    instruction = f"Your user id is {user_id}. {want} Confirm when the agent asks."
    return Task(
        id=f"synthetic/{i}",
        user_id=user_id,
        instruction=instruction,
        actions=tuple(actions),
        outputs=outputs,
        facts={"kind": kind, "user_lines": lines},
    )


def load(split: str | None = None, seed: int = 0, **sizes: int) -> Domain:
    """The ``synthetic:airline`` domain for ``seed`` (``split`` is accepted and ignored)."""
    if split not in (None, "test", "train"):
        raise InvalidInputError(f"synthetic:airline: unknown split {split!r}; use train or test")
    tables, tasks = generate(seed=seed, **sizes)
    return Domain(
        name="synthetic:airline",
        tables=tables,
        tools=V1_TOOLS,
        tasks=tasks,
        policy=POLICY,
    )
