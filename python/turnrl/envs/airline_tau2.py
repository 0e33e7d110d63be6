"""Airline tools with tau2-bench semantics.

tau2 reworked tau-bench's airline tools: errors are raised (``Error: <text>``
with capitalised texts), booking takes seats off the flights, a flight change
also sets the cabin, ``get_flight_status`` is new, ``think`` is gone, one-stop
search chains direct searches (second leg departing after the first lands)
and results carry ``date``. Records are plain dicts in the field order of
tau2's data models.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from turnrl.envs._base import ToolSpec
from turnrl.envs._calc import EVAL_NEEDS_A_STRING, calculate
from turnrl.envs._db import Store
from turnrl.envs.airline import (
    _CABIN,
    _FLIGHT_LEGS,
    _PASSENGER,
    _PAYMENT_ID,
    _RESERVATION_ID,
    AIRPORTS,
    BOOKING_TIME,
    CERTIFICATE_IDS,
    NEW_RESERVATION_IDS,
    _obj_array,
    _s,
)


class ToolError(Exception):
    """A tool refusal; the episode reports it as ``Error: <text>``."""


def _user(store: Store, user_id: Any) -> dict[str, Any]:
    if not store.has("users", user_id):
        raise ToolError(f"User {user_id} not found")
    return store.get("users", user_id)


def _reservation(store: Store, reservation_id: Any) -> dict[str, Any]:
    if not store.has("reservations", reservation_id):
        raise ToolError(f"Reservation {reservation_id} not found")
    return store.get("reservations", reservation_id)


def _flight(store: Store, number: Any) -> dict[str, Any]:
    if not store.has("flights", number):
        raise ToolError(f"Flight {number} not found")
    return store.get("flights", number)


def _instance(store: Store, number: Any, date: Any) -> dict[str, Any]:
    flight = _flight(store, number)
    if date not in flight["dates"]:
        raise ToolError(f"Flight {number} not found on date {date}")
    return flight["dates"][date]


# The pydantic release upstream's uv.lock pins; its error texts link to its docs.
_PYDANTIC_DOCS = "https://errors.pydantic.dev/2.12/v/"
_INT_TEXT = re.compile(r"[+-]?[0-9_]+(?:\.0+)?")


def _input_repr(value: Any) -> str:
    """``input_value`` as pydantic prints it: the repr, cut in the middle past 50 characters."""
    text = repr(value)
    return text if len(text) <= 50 else f"{text[:25]}...{text[-24:]}"


def _invalid(model: str, errors: list[tuple[str, str, str, Any]]) -> ToolError:
    """pydantic's ValidationError text for ``(loc, message, type, input)`` errors."""
    plural = "error" if len(errors) == 1 else "errors"
    lines = [f"{len(errors)} validation {plural} for {model}"]
    for loc, msg, kind, value in errors:
        lines.append(loc)
        lines.append(
            f"  {msg} [type={kind}, input_value={_input_repr(value)}, "
            f"input_type={type(value).__name__}]"
        )
        lines.append(f"    For further information visit {_PYDANTIC_DOCS}{kind}")
    return ToolError("\n".join(lines))


def _check(kind: type, value: Any) -> tuple[Any, tuple[str, str, Any] | None]:
    """Lax validation of one value as pydantic does it: (value, None) or (None, error)."""
    if kind is str:
        if isinstance(value, str):
            return value, None
        return None, ("Input should be a valid string", "string_type", value)
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value), None
        if isinstance(value, str):
            try:
                return float(value.strip()), None
            except ValueError:
                pass
            return None, (
                "Input should be a valid number, unable to parse string as a number",
                "float_parsing",
                value,
            )
        return None, ("Input should be a valid number", "float_type", value)
    if isinstance(value, int):  # bool included, as pydantic's lax mode allows
        return int(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, ("Input should be a finite number", "finite_number", value)
        if value.is_integer():
            return int(value), None
        return None, (
            "Input should be a valid integer, got a number with a fractional part",
            "int_from_float",
            value,
        )
    if isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            try:
                return int(text.split(".")[0]), None
            except ValueError:
                pass
        return None, (
            "Input should be a valid integer, unable to parse string as an integer",
            "int_parsing",
            value,
        )
    return None, ("Input should be a valid integer", "int_type", value)


def _coerce(model: str, field: str, kind: type, value: Any) -> Any:
    """Lax validation of one field as tau2's pydantic models do it (str strict, int lax)."""
    out, error = _check(kind, value)
    if error is not None:
        raise _invalid(model, [(field, *error)])
    return out


_MODELS: dict[str, tuple[tuple[str, type], ...]] = {
    "FlightInfo": (("flight_number", str), ("date", str)),
    "Passenger": (("first_name", str), ("last_name", str), ("dob", str)),
    "Payment": (("payment_id", str), ("amount", int)),
}


def _literal_error(allowed: tuple[str, ...], value: Any) -> tuple[str, str, Any] | None:
    if value in allowed and isinstance(value, str):
        return None
    quoted = [f"'{a}'" for a in allowed]
    text = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
    return f"Input should be {text}", "literal_error", value


def _coerce_float(model: str, field: str, value: Any) -> float:
    return _coerce(model, field, float, value)


def _model_errors(
    value: dict[str, Any], model: str, loc: str = ""
) -> list[tuple[str, str, str, Any]]:
    errors = []
    for field, kind in _MODELS[model]:
        if field not in value:
            errors.append((f"{loc}{field}", "Field required", "missing", value))
            continue
        error = _check(kind, value[field])[1]
        if error is not None:
            errors.append((f"{loc}{field}", *error))
    return errors


def _leg(value: Any, model: str) -> Any:
    """One argument object validated into a tau2 model's field order (extra keys dropped)."""
    if not isinstance(value, dict):
        return value  # tau2 converts only when every item is a dict
    errors = _model_errors(value, model)
    if errors:
        raise _invalid(model, errors)
    return {field: _check(kind, value[field])[0] for field, kind in _MODELS[model]}


def _legs(values: Any, model: str) -> Any:
    if all(isinstance(v, dict) for v in values):
        return [_leg(v, model) for v in values]
    return values


def _list_errors(field: str, values: Any, model: str) -> list[tuple[str, str, str, Any]]:
    """Errors of a ``List[model]`` field of a tau2 model built from ``values``."""
    if not isinstance(values, list):
        return [(field, "Input should be a valid list", "list_type", values)]
    errors = []
    for i, v in enumerate(values):
        if isinstance(v, dict):
            errors += _model_errors(v, model, f"{field}.{i}.")
        else:
            errors.append(
                (
                    f"{field}.{i}",
                    f"Input should be a valid dictionary or instance of {model}",
                    "model_type",
                    v,
                )
            )
    return errors


def _no_attribute(item: Any, field: str) -> ToolError:
    """What tau2 raises reading ``item.<field>`` off an argument it left unconverted."""
    return ToolError(f"'{type(item).__name__}' object has no attribute '{field}'")


def _payment_for_update(
    store: Store, user_id: str, payment_id: Any, total_price: Any
) -> dict[str, Any] | None:
    methods = store.get("users", user_id)["payment_methods"]
    if payment_id not in methods:
        raise ToolError("Payment method not found")
    method = methods[payment_id]
    if method["source"] == "certificate":
        raise ToolError("Certificate cannot be used to update reservation")
    if method["source"] == "gift_card" and method["amount"] < total_price:
        raise ToolError("Gift card balance is not enough")
    if method["source"] == "gift_card":
        store.mut("users", user_id)["payment_methods"][payment_id]["amount"] -= total_price
    if total_price != 0:
        # tau2's Payment model types the amount int: a float total (bags
        # given as 2.0) is stored whole, a fractional one refused, after the
        # gift card was charged, as there.
        return {"payment_id": payment_id, "amount": _coerce("Payment", "amount", int, total_price)}
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
    flights = _legs(flights, "FlightInfo")
    passengers = _legs(passengers, "Passenger")
    payment_methods = _legs(payment_methods, "Payment")
    user = _user(store, user_id)
    reservation_id = next(
        (r for r in NEW_RESERVATION_IDS if not store.has("reservations", r)), None
    )
    if reservation_id is None:
        raise ToolError("Too many reservations")
    # tau2 builds its Reservation model here, which validates these fields (all
    # errors at once, in the model's field order).
    errors = []
    for field, value in (("user_id", user_id), ("origin", origin), ("destination", destination)):
        error = _check(str, value)[1]
        errors += [(field, *error)] if error else []
    for field, allowed, value in (
        ("flight_type", ("round_trip", "one_way"), flight_type),
        ("cabin", ("business", "economy", "basic_economy"), cabin),
    ):
        error = _literal_error(allowed, value)
        errors += [(field, *error)] if error else []
    errors += _list_errors("passengers", passengers, "Passenger")
    errors += _list_errors("payment_history", payment_methods, "Payment")
    stored_total, error = _check(int, total_baggages)
    errors += [("total_baggages", *error)] if error else []
    stored_nonfree, error = _check(int, nonfree_baggages)
    errors += [("nonfree_baggages", *error)] if error else []
    error = _literal_error(("yes", "no"), insurance)
    errors += [("insurance", *error)] if error else []
    if errors:
        raise _invalid("Reservation", errors)
    legs = []
    total_price = 0
    if not all(isinstance(info, dict) for info in flights):
        raise _no_attribute(next(iter(flights)), "flight_number")
    for info in flights:
        number = info["flight_number"]
        flight = _flight(store, number)
        on_date = _instance(store, number, info["date"])
        if on_date["status"] != "available":
            raise ToolError(f"Flight {number} not available on date {info['date']}")
        if on_date["available_seats"][cabin] < len(passengers):
            raise ToolError(f"Not enough seats on flight {number}")
        price = on_date["prices"][cabin]
        legs.append(
            {
                "flight_number": number,
                "origin": flight["origin"],
                "destination": flight["destination"],
                "date": info["date"],
                "price": price,
            }
        )
        total_price += price * len(passengers)
    if insurance == "yes":
        total_price += 30 * len(passengers)
    total_price += 50 * nonfree_baggages
    methods = user["payment_methods"]
    for payment in payment_methods:
        pid, amount = payment["payment_id"], payment["amount"]
        if pid not in methods:
            raise ToolError(f"Payment method {pid} not found")
        if (
            methods[pid]["source"] in ("gift_card", "certificate")
            and methods[pid]["amount"] < amount
        ):
            raise ToolError(f"Not enough balance in payment method {pid}")
    total_payment = sum(p["amount"] for p in payment_methods)
    if total_payment != total_price:
        raise ToolError(
            f"Payment amount does not add up, total price is {total_price}, "
            f"but paid {total_payment}"
        )
    user = store.mut("users", user_id)
    for payment in payment_methods:
        pid, amount = payment["payment_id"], payment["amount"]
        if user["payment_methods"][pid]["source"] == "gift_card":
            user["payment_methods"][pid]["amount"] -= amount
        elif user["payment_methods"][pid]["source"] == "certificate":
            user["payment_methods"].pop(pid)
    for leg in legs:
        seats = store.mut("flights", leg["flight_number"])["dates"][leg["date"]]["available_seats"]
        seats[cabin] -= len(passengers)
    reservation = {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "origin": origin,
        "destination": destination,
        "flight_type": flight_type,
        "cabin": cabin,
        "flights": legs,
        "passengers": passengers,
        "payment_history": payment_methods,
        "created_at": BOOKING_TIME,
        "total_baggages": stored_total,
        "nonfree_baggages": stored_nonfree,
        "insurance": insurance,
        "status": None,
    }
    store.put("reservations", reservation_id, reservation)
    user["reservations"].append(reservation_id)
    return json.dumps(reservation)


def calculate_tool(store: Store, expression: Any) -> str:
    out = calculate(expression)
    # tau2's tool raises where tau-bench's answers these two with text.
    if out == "Error: invalid characters in expression":
        raise ToolError("Invalid characters in expression")
    if out == EVAL_NEEDS_A_STRING:
        raise ToolError(out.removeprefix("Error: "))
    return out


def cancel_reservation(store: Store, reservation_id: Any) -> str:
    _reservation(store, reservation_id)
    reservation = store.mut("reservations", reservation_id)
    refunds = [
        {"payment_id": p["payment_id"], "amount": -p["amount"]}
        for p in reservation["payment_history"]
    ]
    reservation["payment_history"].extend(refunds)
    reservation["status"] = "cancelled"
    return json.dumps(reservation)


def get_reservation_details(store: Store, reservation_id: Any) -> str:
    return json.dumps(_reservation(store, reservation_id))


def get_user_details(store: Store, user_id: Any) -> str:
    return json.dumps(_user(store, user_id))


def list_all_airports(store: Store) -> str:
    return json.dumps([{"iata": k, "city": v} for k, v in AIRPORTS.items()])


def _direct(
    store: Store, date: Any, origin: Any = None, destination: Any = None, leave_after: Any = None
) -> list[dict[str, Any]]:
    out = []
    for f in store.values("flights"):
        if (
            (origin is None or f["origin"] == origin)
            and (destination is None or f["destination"] == destination)
            and date in f["dates"]
            and f["dates"][date]["status"] == "available"
            and (leave_after is None or f["scheduled_departure_time_est"] >= leave_after)
        ):
            out.append(
                {
                    "flight_number": f["flight_number"],
                    "origin": f["origin"],
                    "destination": f["destination"],
                    "status": "available",
                    "scheduled_departure_time_est": f["scheduled_departure_time_est"],
                    "scheduled_arrival_time_est": f["scheduled_arrival_time_est"],
                    "date": None,
                    "available_seats": f["dates"][date]["available_seats"],
                    "prices": f["dates"][date]["prices"],
                }
            )
    return out


def search_direct_flight(store: Store, origin: Any, destination: Any, date: Any) -> str:
    return json.dumps(_direct(store, date, origin, destination))


def search_onestop_flight(store: Store, origin: Any, destination: Any, date: Any) -> str:
    results = []
    for first in _direct(store, date, origin, None):
        first["date"] = date
        arrival = first["scheduled_arrival_time_est"]
        date2 = f"2024-05-{int(date[-2:]) + 1}" if "+1" in arrival else date
        for second in _direct(store, date2, first["destination"], destination, arrival):
            second["date"] = date2
            results.append([first, second])
    return json.dumps(results)


def send_certificate(store: Store, user_id: Any, amount: Any) -> str:
    user = _user(store, user_id)
    for number in CERTIFICATE_IDS:
        payment_id = f"certificate_{number}"
        if payment_id not in user["payment_methods"]:
            store.mut("users", user_id)["payment_methods"][payment_id] = {
                "source": "certificate",
                "id": payment_id,
                "amount": _coerce_float("Certificate", "amount", amount),
            }
            return f"Certificate {payment_id} added to user {user_id} with amount {amount}."
    raise ToolError("Too many certificates")


def transfer_to_human_agents(store: Store, summary: Any) -> str:
    return "Transfer successful"


def update_reservation_baggages(
    store: Store, reservation_id: Any, total_baggages: Any, nonfree_baggages: Any, payment_id: Any
) -> str:
    reservation = _reservation(store, reservation_id)
    _user(store, reservation["user_id"])
    total_price = 50 * max(0, nonfree_baggages - reservation["nonfree_baggages"])
    payment = _payment_for_update(store, reservation["user_id"], payment_id, total_price)
    reservation = store.mut("reservations", reservation_id)
    if payment is not None:
        reservation["payment_history"].append(payment)
    reservation["total_baggages"] = total_baggages
    reservation["nonfree_baggages"] = nonfree_baggages
    return json.dumps(reservation)


def update_reservation_flights(
    store: Store, reservation_id: Any, cabin: Any, flights: Any, payment_id: Any
) -> str:
    flights = _legs(flights, "FlightInfo")
    reservation = _reservation(store, reservation_id)
    _user(store, reservation["user_id"])
    n = len(reservation["passengers"])
    total_price = 0
    legs = []
    if not all(isinstance(info, dict) for info in flights):
        raise _no_attribute(next(iter(flights)), "flight_number")
    for info in flights:
        kept = next(
            (
                f
                for f in reservation["flights"]
                if f["flight_number"] == info["flight_number"]
                and f["date"] == info["date"]
                and cabin == reservation["cabin"]
            ),
            None,
        )
        if kept:
            total_price += kept["price"] * n
            legs.append(dict(kept))
            continue
        flight = _flight(store, info["flight_number"])
        on_date = _instance(store, info["flight_number"], info["date"])
        if on_date["status"] != "available":
            raise ToolError(f"Flight {info['flight_number']} not available on date {info['date']}")
        if on_date["available_seats"][cabin] < n:
            raise ToolError(f"Not enough seats on flight {info['flight_number']}")
        leg = {
            "flight_number": info["flight_number"],
            "origin": flight["origin"],
            "destination": flight["destination"],
            "date": info["date"],
            "price": on_date["prices"][cabin],
        }
        total_price += leg["price"] * n
        legs.append(leg)
    total_price -= sum(f["price"] for f in reservation["flights"]) * n
    payment = _payment_for_update(store, reservation["user_id"], payment_id, total_price)
    reservation = store.mut("reservations", reservation_id)
    if payment is not None:
        reservation["payment_history"].append(payment)
    reservation["flights"] = legs
    reservation["cabin"] = cabin
    return json.dumps(reservation)


def update_reservation_passengers(store: Store, reservation_id: Any, passengers: Any) -> str:
    passengers = _legs(passengers, "Passenger")
    reservation = _reservation(store, reservation_id)
    if len(passengers) != len(reservation["passengers"]):
        raise ToolError("Number of passengers does not match")
    reservation = store.mut("reservations", reservation_id)
    reservation["passengers"] = passengers
    return json.dumps(reservation)


def get_flight_status(store: Store, flight_number: Any, date: Any) -> str:
    return str(_instance(store, flight_number, date)["status"])


# tau2-bench runs a tool call as make_tool_call(name, requestor=..., **arguments)
# on its Environment: agent arguments of these names fail there.
_MAKE_TOOL_CALL = "Environment.make_tool_call"
CALL_KEYWORDS = {"requestor": f"tau2.environment.environment.{_MAKE_TOOL_CALL}"}
WRAPPER_PARAMS = {"self": _MAKE_TOOL_CALL, "tool_name": _MAKE_TOOL_CALL}


def _spec(fn: Any, kind: str, description: str, **params: Any) -> ToolSpec:
    return ToolSpec(
        name=fn.__name__,
        kind=kind,  # type: ignore[arg-type]
        fn=fn,
        description=description,
        params=params,
        required=tuple(params),
        invoke_name=f"AirlineTools.{fn.__name__}",
        call_keywords=CALL_KEYWORDS,
        wrapper_params=WRAPPER_PARAMS,
    )


calculate_tool.__name__ = "calculate"
_date = _s("Date as 'YYYY-MM-DD', for example '2024-05-01'.")
_origin = _s("IATA code of the origin airport, for example 'JFK'.")
_destination = _s("IATA code of the destination airport, for example 'LAX'.")

TAU2_TOOLS: list[ToolSpec] = [
    _spec(
        book_reservation,
        "write",
        "Book a reservation.",
        user_id=_s("Id of the user who books, for example 'sara_doe_496'."),
        origin=_origin,
        destination=_destination,
        flight_type={"type": "string", "enum": ["one_way", "round_trip"]},
        cabin=_CABIN,
        flights=_obj_array("Every flight leg of the reservation.", _FLIGHT_LEGS),
        passengers=_obj_array("Every passenger of the reservation.", _PASSENGER),
        payment_methods=_obj_array(
            "How the total is paid: payment ids and the amount charged to each.",
            {"payment_id": _PAYMENT_ID, "amount": {"type": "integer", "description": "Amount."}},
        ),
        total_baggages={"type": "integer", "description": "Total number of checked bags."},
        nonfree_baggages={"type": "integer", "description": "Number of bags that are paid."},
        insurance={"type": "string", "enum": ["yes", "no"]},
    ),
    _spec(
        calculate_tool,
        "read",
        "Evaluate an arithmetic expression.",
        expression=_s("The expression: numbers, + - * /, parentheses and spaces."),
    ),
    _spec(
        cancel_reservation, "write", "Cancel a whole reservation.", reservation_id=_RESERVATION_ID
    ),
    _spec(
        get_reservation_details, "read", "Look up a reservation.", reservation_id=_RESERVATION_ID
    ),
    _spec(
        get_user_details,
        "read",
        "Look up a user, including their reservations.",
        user_id=_s("User id, for example 'sara_doe_496'."),
    ),
    _spec(list_all_airports, "read", "List all airports and their cities."),
    _spec(
        search_direct_flight,
        "read",
        "Find direct flights between two airports on a date.",
        origin=_origin,
        destination=_destination,
        date=_date,
    ),
    _spec(
        search_onestop_flight,
        "read",
        "Find one-stop connections between two airports on a date.",
        origin=_origin,
        destination=_destination,
        date=_date,
    ),
    _spec(
        send_certificate,
        "write",
        "Give the user a travel certificate. Use with care.",
        user_id=_s("Id of the user, for example 'sara_doe_496'."),
        amount={"type": "integer", "description": "Certificate value."},
    ),
    _spec(
        transfer_to_human_agents,
        "read",
        "Hand the user over to a human agent with a summary of the issue. Only transfer when "
        "the user explicitly asks for a human agent, or when the policy and tools cannot "
        "resolve the issue.",
        summary=_s("Summary of the user's issue."),
    ),
    _spec(
        update_reservation_baggages,
        "write",
        "Change the baggage of a reservation.",
        reservation_id=_RESERVATION_ID,
        total_baggages={"type": "integer", "description": "New total number of checked bags."},
        nonfree_baggages={"type": "integer", "description": "New number of paid bags."},
        payment_id=_PAYMENT_ID,
    ),
    _spec(
        update_reservation_flights,
        "write",
        "Change the flights (and cabin) of a reservation.",
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
        "Change the passengers of a reservation.",
        reservation_id=_RESERVATION_ID,
        passengers=_obj_array("Every passenger of the reservation.", _PASSENGER),
    ),
    _spec(
        get_flight_status,
        "read",
        "Get the status of a flight on a date.",
        flight_number=_s("Flight number, for example 'HAT001'."),
        date=_date,
    ),
]
