"""Retail tools with tau-bench v1 semantics.

Tables: ``orders`` (by order id), ``products`` (by product id), ``users`` (by
user id). Checks, writes, float rounding, returned JSON and error strings
follow tau-bench in the same order, so states hash alike.
"""

from __future__ import annotations

import json
from typing import Any

from turnrl.envs._base import ToolSpec
from turnrl.envs._db import Store
from turnrl.envs.airline import CALCULATE, THINK, TRANSFER, _s, _spec, in_package

CANCEL_REASONS = ["no longer needed", "ordered by mistake"]


def _payment_methods(store: Store, order: dict[str, Any]) -> dict[str, Any]:
    return store.get("users", order["user_id"])["payment_methods"]


def cancel_pending_order(store: Store, order_id: Any, reason: Any) -> str:
    if not store.has("orders", order_id):
        return "Error: order not found"
    order = store.get("orders", order_id)
    if order["status"] != "pending":
        return "Error: non-pending order cannot be cancelled"
    if reason not in CANCEL_REASONS:
        return "Error: invalid reason"
    refunds = []
    for payment in order["payment_history"]:
        payment_id = payment["payment_method_id"]
        refunds.append(
            {
                "transaction_type": "refund",
                "amount": payment["amount"],
                "payment_method_id": payment_id,
            }
        )
        if "gift_card" in payment_id:  # gift cards are refunded at once
            method = store.mut("users", order["user_id"])["payment_methods"][payment_id]
            method["balance"] += payment["amount"]
            method["balance"] = round(method["balance"], 2)
    order = store.mut("orders", order_id)
    order["status"] = "cancelled"
    order["cancel_reason"] = reason
    order["payment_history"].extend(refunds)
    return json.dumps(order)


def _check_items(order: dict[str, Any], item_ids: Any, missing_text: str | None) -> str | None:
    present = [item["item_id"] for item in order["items"]]
    for item_id in item_ids:
        if item_ids.count(item_id) > present.count(item_id):
            return missing_text if missing_text is not None else f"Error: {item_id} not found"
    return None


def _price_difference(
    store: Store, order: dict[str, Any], item_ids: Any, new_item_ids: Any
) -> tuple[Any, str | None]:
    if len(item_ids) != len(new_item_ids):
        return 0, "Error: the number of items to be exchanged should match"
    diff = 0
    for item_id, new_item_id in zip(item_ids, new_item_ids, strict=False):
        item = next(it for it in order["items"] if it["item_id"] == item_id)
        variants = store.get("products", item["product_id"])["variants"]
        if not (new_item_id in variants and variants[new_item_id]["available"]):
            return diff, f"Error: new item {new_item_id} not found or available"
        diff += variants[new_item_id]["price"] - item["price"]
    return diff, None


def exchange_delivered_order_items(
    store: Store, order_id: Any, item_ids: Any, new_item_ids: Any, payment_method_id: Any
) -> str:
    if not store.has("orders", order_id):
        return "Error: order not found"
    order = store.get("orders", order_id)
    if order["status"] != "delivered":
        return "Error: non-delivered order cannot be exchanged"
    problem = _check_items(order, item_ids, None)
    if problem:
        return problem
    diff, problem = _price_difference(store, order, item_ids, new_item_ids)
    if problem:
        return problem
    diff = round(diff, 2)
    methods = _payment_methods(store, order)
    if payment_method_id not in methods:
        return "Error: payment method not found"
    method = methods[payment_method_id]
    if method["source"] == "gift_card" and method["balance"] < diff:
        return "Error: insufficient gift card balance to pay for the price difference"
    order = store.mut("orders", order_id)
    order["status"] = "exchange requested"
    order["exchange_items"] = sorted(item_ids)
    order["exchange_new_items"] = sorted(new_item_ids)
    order["exchange_payment_method_id"] = payment_method_id
    order["exchange_price_difference"] = diff
    return json.dumps(order)


def find_user_id_by_email(store: Store, email: Any) -> str:
    for user_id, profile in store.items("users"):
        if profile["email"].lower() == email.lower():
            return user_id
    return "Error: user not found"


def find_user_id_by_name_zip(store: Store, first_name: Any, last_name: Any, zip: Any) -> str:
    for user_id, profile in store.items("users"):
        if (
            profile["name"]["first_name"].lower() == first_name.lower()
            and profile["name"]["last_name"].lower() == last_name.lower()
            and profile["address"]["zip"] == zip
        ):
            return user_id
    return "Error: user not found"


def get_order_details(store: Store, order_id: Any) -> str:
    if store.has("orders", order_id):
        return json.dumps(store.get("orders", order_id))
    return "Error: order not found"


def get_product_details(store: Store, product_id: Any) -> str:
    if store.has("products", product_id):
        return json.dumps(store.get("products", product_id))
    return "Error: product not found"


def get_user_details(store: Store, user_id: Any) -> str:
    if store.has("users", user_id):
        return json.dumps(store.get("users", user_id))
    return "Error: user not found"


def list_all_product_types(store: Store) -> str:
    by_name = {p["name"]: p["product_id"] for p in store.values("products")}
    return json.dumps(dict(sorted(by_name.items())))


def _address(address1: Any, address2: Any, city: Any, state: Any, country: Any, zip: Any) -> dict:
    return {
        "address1": address1,
        "address2": address2,
        "city": city,
        "state": state,
        "country": country,
        "zip": zip,
    }


def modify_pending_order_address(
    store: Store,
    order_id: Any,
    address1: Any,
    address2: Any,
    city: Any,
    state: Any,
    country: Any,
    zip: Any,
) -> str:
    if not store.has("orders", order_id):
        return "Error: order not found"
    if store.get("orders", order_id)["status"] != "pending":
        return "Error: non-pending order cannot be modified"
    order = store.mut("orders", order_id)
    order["address"] = _address(address1, address2, city, state, country, zip)
    return json.dumps(order)


def modify_pending_order_items(
    store: Store, order_id: Any, item_ids: Any, new_item_ids: Any, payment_method_id: Any
) -> str:
    if not store.has("orders", order_id):
        return "Error: order not found"
    order = store.get("orders", order_id)
    if order["status"] != "pending":
        return "Error: non-pending order cannot be modified"
    problem = _check_items(order, item_ids, None)
    if problem:
        return problem
    diff, problem = _price_difference(store, order, item_ids, new_item_ids)
    if problem:
        return problem
    methods = _payment_methods(store, order)
    if payment_method_id not in methods:
        return "Error: payment method not found"
    method = methods[payment_method_id]
    if method["source"] == "gift_card" and method["balance"] < diff:
        return "Error: insufficient gift card balance to pay for the new item"
    order = store.mut("orders", order_id)
    order["payment_history"].append(
        {
            "transaction_type": "payment" if diff > 0 else "refund",
            "amount": abs(diff),
            "payment_method_id": payment_method_id,
        }
    )
    if method["source"] == "gift_card":
        method = store.mut("users", order["user_id"])["payment_methods"][payment_method_id]
        method["balance"] -= diff
        method["balance"] = round(method["balance"], 2)
    for item_id, new_item_id in zip(item_ids, new_item_ids, strict=False):
        item = next(it for it in order["items"] if it["item_id"] == item_id)
        variant = store.get("products", item["product_id"])["variants"][new_item_id]
        item["item_id"] = new_item_id
        item["price"] = variant["price"]
        item["options"] = variant["options"]
    order["status"] = "pending (item modified)"
    return json.dumps(order)


def modify_pending_order_payment(store: Store, order_id: Any, payment_method_id: Any) -> str:
    if not store.has("orders", order_id):
        return "Error: order not found"
    order = store.get("orders", order_id)
    if order["status"] != "pending":
        return "Error: non-pending order cannot be modified"
    methods = _payment_methods(store, order)
    if payment_method_id not in methods:
        return "Error: payment method not found"
    history = order["payment_history"]
    if len(history) > 1 or history[0]["transaction_type"] != "payment":
        return "Error: there should be exactly one payment for a pending order"
    if history[0]["payment_method_id"] == payment_method_id:
        return "Error: the new payment method should be different from the current one"
    amount = history[0]["amount"]
    method = methods[payment_method_id]
    if method["source"] == "gift_card" and method["balance"] < amount:
        return "Error: insufficient gift card balance to pay for the order"
    order = store.mut("orders", order_id)
    old_id = order["payment_history"][0]["payment_method_id"]
    order["payment_history"].extend(
        [
            {
                "transaction_type": "payment",
                "amount": amount,
                "payment_method_id": payment_method_id,
            },
            {"transaction_type": "refund", "amount": amount, "payment_method_id": old_id},
        ]
    )
    if method["source"] == "gift_card":
        method = store.mut("users", order["user_id"])["payment_methods"][payment_method_id]
        method["balance"] -= amount
        method["balance"] = round(method["balance"], 2)
    if "gift_card" in old_id:
        old = store.mut("users", order["user_id"])["payment_methods"][old_id]
        old["balance"] += amount
        old["balance"] = round(old["balance"], 2)
    return json.dumps(order)


def modify_user_address(
    store: Store,
    user_id: Any,
    address1: Any,
    address2: Any,
    city: Any,
    state: Any,
    country: Any,
    zip: Any,
) -> str:
    if not store.has("users", user_id):
        return "Error: user not found"
    user = store.mut("users", user_id)
    user["address"] = _address(address1, address2, city, state, country, zip)
    return json.dumps(user)


def return_delivered_order_items(
    store: Store, order_id: Any, item_ids: Any, payment_method_id: Any
) -> str:
    if not store.has("orders", order_id):
        return "Error: order not found"
    order = store.get("orders", order_id)
    if order["status"] != "delivered":
        return "Error: non-delivered order cannot be returned"
    if payment_method_id not in _payment_methods(store, order):
        return "Error: payment method not found"
    if (
        "gift_card" not in payment_method_id
        and payment_method_id != order["payment_history"][0]["payment_method_id"]
    ):
        return "Error: payment method should be either the original payment method or a gift card"
    problem = _check_items(order, item_ids, "Error: some item not found")
    if problem:
        return problem
    order = store.mut("orders", order_id)
    order["status"] = "return requested"
    order["return_items"] = sorted(item_ids)
    order["return_payment_method_id"] = payment_method_id
    return json.dumps(order)


# --- schemas (our own wording; names, types and enums follow tau-bench) ------

_ORDER_ID = _s("Order id, starting with '#', for example '#W0000000'.")
_ITEM_IDS = {
    "type": "array",
    "items": {"type": "string"},
    "description": "Item ids, for example ['1008292230']; an id may repeat.",
}
_PAYMENT_METHOD_ID = _s(
    "A payment method id from the user's profile, for example 'gift_card_0000000' or "
    "'credit_card_0000000'."
)
_ADDRESS = {
    "address1": _s("First address line, for example '123 Main St'."),
    "address2": _s("Second address line, for example 'Apt 1' or ''."),
    "city": _s("City, for example 'San Francisco'."),
    "state": _s("State, for example 'CA'."),
    "country": _s("Country, for example 'USA'."),
    "zip": _s("Zip code, for example '12345'."),
}
_CONFIRM = " Explain the details to the user and get an explicit yes before calling."

_TOOLS: list[ToolSpec] = [
    CALCULATE,
    _spec(
        cancel_pending_order,
        "write",
        "CancelPendingOrder",
        "Cancel a pending order (processed or delivered orders cannot be cancelled)." + _CONFIRM,
        order_id=_ORDER_ID,
        reason={"type": "string", "enum": CANCEL_REASONS, "description": "Why it is cancelled."},
    ),
    _spec(
        exchange_delivered_order_items,
        "write",
        "ExchangeDeliveredOrderItems",
        "Exchange items of a delivered order for other items of the same product type; a "
        "delivered order can be returned or exchanged once." + _CONFIRM,
        order_id=_ORDER_ID,
        item_ids=_ITEM_IDS,
        new_item_ids={**_ITEM_IDS, "description": "New item ids, in the order of item_ids."},
        payment_method_id=_PAYMENT_METHOD_ID,
    ),
    _spec(
        find_user_id_by_email,
        "read",
        "FindUserIdByEmail",
        "Find a user id by email; returns an error text when there is none.",
        email=_s("Email, for example 'something@example.com'."),
    ),
    _spec(
        find_user_id_by_name_zip,
        "read",
        "FindUserIdByNameZip",
        "Find a user id by first name, last name and zip code; returns an error text when "
        "there is none. Prefer finding by email.",
        first_name=_s("First name, for example 'John'."),
        last_name=_s("Last name, for example 'Doe'."),
        zip=_s("Zip code, for example '12345'."),
    ),
    _spec(
        get_order_details,
        "read",
        "GetOrderDetails",
        "Look up an order's status and details.",
        order_id=_ORDER_ID,
    ),
    _spec(
        get_product_details,
        "read",
        "GetProductDetails",
        "Look up a product's inventory.",
        product_id=_s("Product id, for example '6086499569' (not an item id)."),
    ),
    _spec(
        get_user_details,
        "read",
        "GetUserDetails",
        "Look up a user, including their orders.",
        user_id=_s("User id, for example 'sara_doe_496'."),
    ),
    _spec(
        list_all_product_types,
        "read",
        "ListAllProductTypes",
        "List every product type's name and product id (there are 50).",
    ),
    _spec(
        modify_pending_order_address,
        "write",
        "ModifyPendingOrderAddress",
        "Change the shipping address of a pending order." + _CONFIRM,
        order_id=_ORDER_ID,
        **_ADDRESS,
    ),
    _spec(
        modify_pending_order_items,
        "write",
        "ModifyPendingOrderItems",
        "Swap items of a pending order for other items of the same product type; can be done "
        "once per order." + _CONFIRM,
        order_id=_ORDER_ID,
        item_ids=_ITEM_IDS,
        new_item_ids={**_ITEM_IDS, "description": "New item ids, in the order of item_ids."},
        payment_method_id=_PAYMENT_METHOD_ID,
    ),
    _spec(
        modify_pending_order_payment,
        "write",
        "ModifyPendingOrderPayment",
        "Change the payment method of a pending order." + _CONFIRM,
        order_id=_ORDER_ID,
        payment_method_id=_PAYMENT_METHOD_ID,
    ),
    _spec(
        modify_user_address,
        "write",
        "ModifyUserAddress",
        "Change a user's default address." + _CONFIRM,
        user_id=_s("User id, for example 'sara_doe_496'."),
        **_ADDRESS,
    ),
    _spec(
        return_delivered_order_items,
        "write",
        "ReturnDeliveredOrderItems",
        "Return items of a delivered order; its status becomes 'return requested'." + _CONFIRM,
        order_id=_ORDER_ID,
        item_ids=_ITEM_IDS,
        payment_method_id=_PAYMENT_METHOD_ID,
    ),
    THINK,
    TRANSFER,
]
V1_TOOLS: list[ToolSpec] = [in_package(t, "retail") for t in _TOOLS]
