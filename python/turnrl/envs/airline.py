"""Airline tools with tau-bench v1 semantics.

Tables: ``flights`` (by flight number), ``reservations`` (by id), ``users``
(by user id). Every tool checks in the same order as tau-bench, writes the same
fields, returns the same JSON text (``json.dumps`` of the record) and the same
error strings, so that database hashes and observations agree with upstream.
Arguments arrive as private copies (see :class:`~turnrl.envs.Episode`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from turnrl.envs._base import ToolSpec
from turnrl.envs._calc import calculate
from turnrl.envs._db import Store, copy_json

AIRPORTS = {
    "SFO": "San Francisco",
    "JFK": "New York",
    "LAX": "Los Angeles",
    "ORD": "Chicago",
    "DFW": "Dallas",
    "DEN": "Denver",
    "SEA": "Seattle",
    "ATL": "Atlanta",
    "MIA": "Miami",
    "BOS": "Boston",
    "PHX": "Phoenix",
    "IAH": "Houston",
    "LAS": "Las Vegas",
    "MCO": "Orlando",
    "EWR": "Newark",
    "CLT": "Charlotte",
    "MSP": "Minneapolis",
    "DTW": "Detroit",
    "PHL": "Philadelphia",
    "LGA": "LaGuardia",
}
NEW_RESERVATION_IDS = ("HATHAT", "HATHAU", "HATHAV")
CERTIFICATE_IDS = (3221322, 3221323, 3221324)
BOOKING_TIME = "2024-05-15T15:00:00"
CABINS = ["basic_economy", "economy", "business"]


def _flight_price_check(store: Store, flight: dict[str, Any], cabin: Any, seats: int) -> str | None:
    """Fill price/origin/destination of one flight leg; an error text if not bookable."""
    number = flight["flight_number"]
    if not store.has("flights", number):
        return f"Error: flight {number} not found"
    info = store.get("flights", number)
    if flight["date"] not in info["dates"]:
        return f"Error: flight {number} not found on date {flight['date']}"
    on_date = info["dates"][flight["date"]]
    if on_date["status"] != "available":
        return f"Error: flight {number} not available on date {flight['date']}"
    if on_date["available_seats"][cabin] < seats:
        return f"Error: not enough seats on flight {number}"
    flight["price"] = on_date["prices"][cabin]
    flight["origin"] = info["origin"]
    flight["destination"] = info["destination"]
    return None


def book_reservation(
    store: Store,
    user_id: Any,
    origin: Any,
    destination: Any,
    flight_type: Any,
    cabin: Any,
    flights: Any,
    passengers: Any,
    payment_methods: Any,
    total_baggages: Any,
    nonfree_baggages: Any,
    insurance: Any,
) -> str:
    if not store.has("users", user_id):
        return "Error: user not found"
    user = store.get("users", user_id)
    reservation_id = NEW_RESERVATION_IDS[0]
    for candidate in NEW_RESERVATION_IDS[1:]:
        if not store.has("reservations", reservation_id):
            break
        reservation_id = candidate
    reservation = {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "origin": origin,
        "destination": destination,
        "flight_type": flight_type,
        "cabin": cabin,
        "flights": flights,
        "passengers": passengers,
        "payment_history": payment_methods,
        "created_at": BOOKING_TIME,
        "total_baggages": total_baggages,
        "nonfree_baggages": nonfree_baggages,
        "insurance": insurance,
    }
    total_price = 0
    for flight in reservation["flights"]:
        problem = _flight_price_check(store, flight, cabin, len(passengers))
        if problem:
            return problem
        total_price += flight["price"] * len(passengers)
    if insurance == "yes":
        total_price += 30 * len(passengers)
    total_price += 50 * nonfree_baggages

    methods = user["payment_methods"]
    for payment in payment_methods:
        payment_id, amount = payment["payment_id"], payment["amount"]
        if payment_id not in methods:
            return f"Error: payment method {payment_id} not found"
        if methods[payment_id]["source"] in ("gift_card", "certificate"):
            if methods[payment_id]["amount"] < amount:
                return f"Error: not enough balance in payment method {payment_id}"
    paid = sum(p["amount"] for p in payment_methods)
    if paid != total_price:
        return (
            f"Error: payment amount does not add up, total price is {total_price}, "
            f"but paid {sum(p['amount'] for p in payment_methods)}"
        )

    user = store.mut("users", user_id)
    for payment in payment_methods:
        payment_id, amount = payment["payment_id"], payment["amount"]
        source = user["payment_methods"][payment_id]["source"]
        if source == "gift_card":
            user["payment_methods"][payment_id]["amount"] -= amount
        elif source == "certificate":
            del user["payment_methods"][payment_id]
    store.put("reservations", reservation_id, reservation)
    user["reservations"].append(reservation_id)
    return json.dumps(reservation)


def cancel_reservation(store: Store, reservation_id: Any) -> str:
    if not store.has("reservations", reservation_id):
        return "Error: reservation not found"
    reservation = store.mut("reservations", reservation_id)
    refunds = [
        {"payment_id": p["payment_id"], "amount": -p["amount"]}
        for p in reservation["payment_history"]
    ]
    reservation["payment_history"].extend(refunds)
    reservation["status"] = "cancelled"
    return json.dumps(reservation)


def get_reservation_details(store: Store, reservation_id: Any) -> str:
    if store.has("reservations", reservation_id):
        return json.dumps(store.get("reservations", reservation_id))
    return "Error: user not found"  # sic: tau-bench's text


def get_user_details(store: Store, user_id: Any) -> str:
    if store.has("users", user_id):
        return json.dumps(store.get("users", user_id))
    return "Error: user not found"


def list_all_airports(store: Store) -> str:
    return json.dumps(AIRPORTS)


def _flight_on(flight: dict[str, Any], date: str) -> dict[str, Any]:
    row = {k: v for k, v in flight.items() if k != "dates"}
    row.update(flight["dates"][date])
    return row


def search_direct_flight(store: Store, origin: Any, destination: Any, date: Any) -> str:
    results = []
    for flight in store.values("flights"):
        if flight["origin"] == origin and flight["destination"] == destination:
            if date in flight["dates"] and flight["dates"][date]["status"] == "available":
                results.append(_flight_on(flight, date))
    return json.dumps(results)


def search_onestop_flight(store: Store, origin: Any, destination: Any, date: Any) -> str:
    results = []
    flights = list(store.values("flights"))
    for first in flights:
        if first["origin"] != origin:
            continue
        for second in flights:
            if second["destination"] != destination or first["destination"] != second["origin"]:
                continue
            # tau-bench's rule for an overnight first leg (day without zero padding).
            date2 = (
                f"2024-05-{int(date[-2:]) + 1}"
                if "+1" in first["scheduled_arrival_time_est"]
                else date
            )
            if first["scheduled_arrival_time_est"] > second["scheduled_departure_time_est"]:
                continue
            if date in first["dates"] and date2 in second["dates"]:
                if (
                    first["dates"][date]["status"] == "available"
                    and second["dates"][date2]["status"] == "available"
                ):
                    leg1 = _flight_on(first, date)
                    leg1["date"] = date
                    # tau-bench reads the second leg's status and prices on the
                    # first leg's date (a KeyError when it has none): kept as is.
                    leg2 = _flight_on(second, date)
                    leg2["date"] = date2
                    results.append([leg1, leg2])
    return json.dumps(results)


def send_certificate(store: Store, user_id: Any, amount: Any) -> str:
    if not store.has("users", user_id):
        return "Error: user not found"
    for number in CERTIFICATE_IDS:
        payment_id = f"certificate_{number}"
        if payment_id not in store.get("users", user_id)["payment_methods"]:
            user = store.mut("users", user_id)
            user["payment_methods"][payment_id] = {
                "source": "certificate",
                "amount": amount,
                "id": payment_id,
            }
            return f"Certificate {payment_id} added to user {user_id} with amount {amount}."
    return "None"  # tau-bench returns None once all three certificate ids are used


def think(store: Store, thought: Any) -> str:
    return ""


def transfer_to_human_agents(store: Store, summary: Any) -> str:
    return "Transfer successful"


def _payment_for_update(
    store: Store, user_id: str, payment_id: Any, total_price: Any
) -> str | None:
    methods = store.get("users", user_id)["payment_methods"]
    if payment_id not in methods:
        return "Error: payment method not found"
    method = methods[payment_id]
    if method["source"] == "certificate":
        return "Error: certificate cannot be used to update reservation"
    if method["source"] == "gift_card" and method["amount"] < total_price:
        return "Error: gift card balance is not enough"
    return None


def update_reservation_baggages(
    store: Store, reservation_id: Any, total_baggages: Any, nonfree_baggages: Any, payment_id: Any
) -> str:
    if not store.has("reservations", reservation_id):
        return "Error: reservation not found"
    reservation = store.get("reservations", reservation_id)
    total_price = 50 * max(0, nonfree_baggages - reservation["nonfree_baggages"])
    problem = _payment_for_update(store, reservation["user_id"], payment_id, total_price)
    if problem:
        return problem
    reservation = store.mut("reservations", reservation_id)
    reservation["total_baggages"] = total_baggages
    reservation["nonfree_baggages"] = nonfree_baggages
    if store.get("users", reservation["user_id"])["payment_methods"][payment_id]["source"] == (
        "gift_card"
    ):
        user = store.mut("users", reservation["user_id"])
        user["payment_methods"][payment_id]["amount"] -= total_price
    if total_price != 0:
        reservation["payment_history"].append({"payment_id": payment_id, "amount": total_price})
    return json.dumps(reservation)


def update_reservation_flights(
    store: Store, reservation_id: Any, cabin: Any, flights: Any, payment_id: Any
) -> str:
    if not store.has("reservations", reservation_id):
        return "Error: reservation not found"
    reservation = store.get("reservations", reservation_id)
    n_passengers = len(reservation["passengers"])
    total_price = 0
    for flight in flights:
        kept = [
            f
            for f in reservation["flights"]
            if f["flight_number"] == flight["flight_number"]
            and f["date"] == flight["date"]
            and cabin == reservation["cabin"]
        ]
        if kept:
            total_price += kept[0]["price"] * n_passengers
            flight["price"] = kept[0]["price"]
            flight["origin"] = kept[0]["origin"]
            flight["destination"] = kept[0]["destination"]
            continue
        problem = _flight_price_check(store, flight, cabin, n_passengers)
        if problem:
            return problem
        total_price += flight["price"] * n_passengers
    total_price -= sum(f["price"] for f in reservation["flights"]) * n_passengers

    problem = _payment_for_update(store, reservation["user_id"], payment_id, total_price)
    if problem:
        return problem
    user_id = reservation["user_id"]
    if store.get("users", user_id)["payment_methods"][payment_id]["source"] == "gift_card":
        store.mut("users", user_id)["payment_methods"][payment_id]["amount"] -= total_price
    reservation = store.mut("reservations", reservation_id)
    reservation["flights"] = flights
    if total_price != 0:
        reservation["payment_history"].append({"payment_id": payment_id, "amount": total_price})
    return json.dumps(reservation)


def update_reservation_passengers(store: Store, reservation_id: Any, passengers: Any) -> str:
    if not store.has("reservations", reservation_id):
        return "Error: reservation not found"
    if len(passengers) != len(store.get("reservations", reservation_id)["passengers"]):
        return "Error: number of passengers does not match"
    reservation = store.mut("reservations", reservation_id)
    reservation["passengers"] = passengers
    return json.dumps(reservation)


# --- schemas (our own wording; names, types and enums follow tau-bench) ------


def _s(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _obj_array(description: str, fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "array",
        "description": description,
        "items": {"type": "object", "properties": fields, "required": list(fields)},
    }


_FLIGHT_LEGS = {
    "flight_number": _s("Flight number, for example 'HAT001'."),
    "date": _s("Flight date as 'YYYY-MM-DD', for example '2024-05-01'."),
}
_PASSENGER = {
    "first_name": _s("Passenger first name, for example 'Noah'."),
    "last_name": _s("Passenger last name, for example 'Brown'."),
    "dob": _s("Passenger date of birth as 'YYYY-MM-DD', for example '1990-01-01'."),
}
_PAYMENT_ID = _s(
    "A payment id from the user's profile, for example 'credit_card_7815826', "
    "'gift_card_7815826' or 'certificate_7815826'."
)
_RESERVATION_ID = _s("Reservation id, for example 'ZFA04Y'.")
_CABIN = {"type": "string", "enum": CABINS}


def in_package(spec: ToolSpec, package: str) -> ToolSpec:
    """``spec`` as tau-bench's ``package`` (``airline``, ``retail``) defines it:
    its ``invoke`` lives in ``tau_bench.envs.<package>.tools.<tool name>``,
    which Python names when an agent argument ``data`` clashes with the
    environment's own ``invoke(data=...)``."""
    module = f"tau_bench.envs.{package}.tools.{spec.name}"
    return replace(spec, call_keywords={"data": f"{module}.{spec.invoke_name}"})


def _spec(fn: Any, kind: str, invoke: str, description: str, **params: Any) -> ToolSpec:
    return ToolSpec(
        name=fn.__name__,
        kind=kind,  # type: ignore[arg-type]
        fn=fn,
        description=description,
        params=params,
        required=tuple(params),
        invoke_name=f"{invoke}.invoke",
    )


def calculate_tool(store: Store, expression: Any) -> str:
    return calculate(expression)


calculate_tool.__name__ = "calculate"

CALCULATE = _spec(
    calculate_tool,
    "read",
    "Calculate",
    "Evaluate an arithmetic expression.",
    expression=_s("The expression, for example '2 + 2': numbers, + - * /, parentheses and spaces."),
)
THINK = _spec(
    think,
    "read",
    "Think",
    "Write down a thought. Reads and changes nothing; use it for complex reasoning.",
    thought=_s("The thought."),
)
TRANSFER = _spec(
    transfer_to_human_agents,
    "read",
    "TransferToHumanAgents",
    "Hand the user over to a human agent with a summary of the issue. Only transfer when the "
    "user explicitly asks for a human agent, or when the issue cannot be resolved with the "
    "available tools.",
    summary=_s("Summary of the user's issue."),
)

_TOOLS: list[ToolSpec] = [
    _spec(
        book_reservation,
        "write",
        "BookReservation",
        "Book a reservation.",
        user_id=_s("Id of the user who books, for example 'sara_doe_496'."),
        origin=_s("IATA code of the origin city, for example 'SFO'."),
        destination=_s("IATA code of the destination city, for example 'JFK'."),
        flight_type={"type": "string", "enum": ["one_way", "round_trip"]},
        cabin=_CABIN,
        flights=_obj_array("Every flight leg of the reservation.", _FLIGHT_LEGS),
        passengers=_obj_array("Every passenger of the reservation.", _PASSENGER),
        payment_methods=_obj_array(
            "How the total is paid: payment ids and the amount charged to each.",
            {"payment_id": _PAYMENT_ID, "amount": {"type": "number", "description": "Amount."}},
        ),
        total_baggages={"type": "integer", "description": "Total number of checked bags."},
        nonfree_baggages={"type": "integer", "description": "Number of bags that are paid."},
        insurance={"type": "string", "enum": ["yes", "no"]},
    ),
    CALCULATE,
    _spec(
        cancel_reservation,
        "write",
        "CancelReservation",
        "Cancel a whole reservation.",
        reservation_id=_RESERVATION_ID,
    ),
    _spec(
        get_reservation_details,
        "read",
        "GetReservationDetails",
        "Look up a reservation.",
        reservation_id=_RESERVATION_ID,
    ),
    _spec(
        get_user_details,
        "read",
        "GetUserDetails",
        "Look up a user, including their reservations.",
        user_id=_s("User id, for example 'sara_doe_496'."),
    ),
    _spec(list_all_airports, "read", "ListAllAirports", "List all airports and their cities."),
    _spec(
        search_direct_flight,
        "read",
        "SearchDirectFlight",
        "Find direct flights between two cities on a date.",
        origin=_s("IATA code of the origin city, for example 'JFK'."),
        destination=_s("IATA code of the destination city, for example 'LAX'."),
        date=_s("Date as 'YYYY-MM-DD', for example '2024-01-01'."),
    ),
    _spec(
        search_onestop_flight,
        "read",
        "SearchOnestopFlight",
        "Find one-stop connections between two cities on a date.",
        origin=_s("IATA code of the origin city, for example 'JFK'."),
        destination=_s("IATA code of the destination city, for example 'LAX'."),
        date=_s("Date as 'YYYY-MM-DD', for example '2024-05-01'."),
    ),
    _spec(
        send_certificate,
        "write",
        "SendCertificate",
        "Give the user a travel certificate. Use with care.",
        user_id=_s("Id of the user, for example 'sara_doe_496'."),
        amount={"type": "number", "description": "Certificate value."},
    ),
    THINK,
    TRANSFER,
    _spec(
        update_reservation_baggages,
        "write",
        "UpdateReservationBaggages",
        "Change the baggage of a reservation.",
        reservation_id=_RESERVATION_ID,
        total_baggages={"type": "integer", "description": "New total number of checked bags."},
        nonfree_baggages={"type": "integer", "description": "New number of paid bags."},
        payment_id=_PAYMENT_ID,
    ),
    _spec(
        update_reservation_flights,
        "write",
        "UpdateReservationFlights",
        "Change the flights of a reservation.",
        reservation_id=_RESERVATION_ID,
        cabin=_CABIN,
        flights=_obj_array(
            "Every flight leg of the whole new reservation, unchanged legs included.",
            _FLIGHT_LEGS,
        ),
        payment_id=_PAYMENT_ID,
    ),
    _spec(
        update_reservation_passengers,
        "write",
        "UpdateReservationPassengers",
        "Change the passengers of a reservation.",
        reservation_id=_RESERVATION_ID,
        passengers=_obj_array("Every passenger of the reservation.", _PASSENGER),
    ),
]
V1_TOOLS: list[ToolSpec] = [in_package(t, "airline") for t in _TOOLS]

__all__ = ["AIRPORTS", "V1_TOOLS", "copy_json"]
