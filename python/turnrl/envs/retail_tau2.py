"""Retail tools with tau2-bench semantics.

tau2's retail tools raise errors (``Error: <text>``, capitalised texts),
look payment methods up strictly, refuse swapping an item for itself, add
``get_item_details``, drop ``think``, and keep one quirk of theirs: a
pending-order item swap writes the price and options of the *last* new item
onto every swapped item. Records are shaped as tau2's models dump them (see
:func:`shape_tables`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from turnrl.envs import retail
from turnrl.envs._base import ToolSpec
from turnrl.envs._db import Store
from turnrl.envs.airline_tau2 import (
    ToolError,
    _check,
    _coerce,
    _coerce_float,
    _invalid,
    calculate_tool,
)
from turnrl.envs.airline_tau2 import _spec as _spec_airline

_ORDER_DEFAULTS = (
    "cancel_reason",
    "exchange_items",
    "exchange_new_items",
    "exchange_payment_method_id",
    "exchange_price_difference",
    "return_items",
    "return_payment_method_id",
)


def _f(x: Any) -> Any:
    return float(x) if isinstance(x, int) and not isinstance(x, bool) else x


def shape_tables(tables: dict[str, Any]) -> dict[str, Any]:
    """Records with tau2's optional order fields present and its float-typed money as floats."""
    orders = {}
    for oid, o in tables.get("orders", {}).items():
        o = dict(o)
        o["items"] = [{**it, "price": _f(it.get("price"))} for it in o.get("items", [])]
        o["payment_history"] = [
            {**p, "amount": _f(p.get("amount"))} for p in o.get("payment_history", [])
        ]
        for key in _ORDER_DEFAULTS:
            o.setdefault(key, None)
        orders[oid] = o
    users = {}
    for uid, u in tables.get("users", {}).items():
        u = dict(u)
        u["payment_methods"] = {
            k: ({**m, "balance": _f(m["balance"])} if "balance" in m else m)
            for k, m in u.get("payment_methods", {}).items()
        }
        users[uid] = u
    products = {}
    for pid, p in tables.get("products", {}).items():
        p = dict(p)
        p["variants"] = {k: {**v, "price": _f(v.get("price"))} for k, v in p["variants"].items()}
        products[pid] = p
    return {**tables, "orders": orders, "users": users, "products": products}


def _order(store: Store, order_id: Any) -> dict[str, Any]:
    if not store.has("orders", order_id):
        raise ToolError("Order not found")
    return store.get("orders", order_id)


def _user(store: Store, user_id: Any) -> dict[str, Any]:
    if not store.has("users", user_id):
        raise ToolError("User not found")
    return store.get("users", user_id)


def _product(store: Store, product_id: Any) -> dict[str, Any]:
    if not store.has("products", product_id):
        raise ToolError("Product not found")
    return store.get("products", product_id)


def _variant(store: Store, product_id: Any, variant_id: Any) -> dict[str, Any]:
    product = _product(store, product_id)
    if variant_id not in product["variants"]:
        raise ToolError("Variant not found")
    return product["variants"][variant_id]


def _method(store: Store, user_id: Any, payment_method_id: Any) -> dict[str, Any]:
    user = _user(store, user_id)
    if payment_method_id not in user["payment_methods"]:
        raise ToolError("Payment method not found")
    return user["payment_methods"][payment_method_id]


def _gift(method: dict[str, Any]) -> bool:
    return method.get("source") == "gift_card"


def _mut_method(store: Store, user_id: str, payment_method_id: str) -> dict[str, Any]:
    return store.mut("users", user_id)["payment_methods"][payment_method_id]


def _payment(transaction_type: str, amount: Any, payment_method_id: Any) -> dict[str, Any]:
    return {
        "transaction_type": transaction_type,
        "amount": _coerce_float("OrderPayment", "amount", amount),
        "payment_method_id": _coerce("OrderPayment", "payment_method_id", str, payment_method_id),
    }


def cancel_pending_order(store: Store, order_id: Any, reason: Any) -> str:
    order = _order(store, order_id)
    if order["status"] != "pending":
        raise ToolError("Non-pending order cannot be cancelled")
    if reason not in {"no longer needed", "ordered by mistake"}:
        raise ToolError("Invalid reason")
    refunds = []
    for payment in order["payment_history"]:
        pid = payment["payment_method_id"]
        refunds.append(_payment("refund", payment["amount"], pid))
        _user(store, order["user_id"])
        if _gift(_method(store, order["user_id"], pid)):
            method = _mut_method(store, order["user_id"], pid)
            method["balance"] += payment["amount"]
            method["balance"] = round(method["balance"], 2)
    order = store.mut("orders", order_id)
    order["status"] = "cancelled"
    order["cancel_reason"] = reason
    order["payment_history"].extend(refunds)
    return json.dumps(order)


def _swap_price(
    store: Store, order: dict[str, Any], item_ids: Any, new_item_ids: Any, same_check: bool
) -> tuple[Any, dict[str, Any] | None]:
    diff = 0
    variant = None
    for item_id, new_item_id in zip(item_ids, new_item_ids, strict=False):
        if same_check and item_id == new_item_id:
            raise ToolError("The new item id should be different from the old item id")
        item = next((it for it in order["items"] if it["item_id"] == item_id), None)
        if item is None:
            raise ToolError(f"Item {item_id} not found")
        variant = _variant(store, item["product_id"], new_item_id)
        if not variant["available"]:
            raise ToolError(f"New item {new_item_id} not found or available")
        diff += variant["price"] - item["price"]
    return diff, variant


def exchange_delivered_order_items(
    store: Store, order_id: Any, item_ids: Any, new_item_ids: Any, payment_method_id: Any
) -> str:
    order = _order(store, order_id)
    if order["status"] != "delivered":
        raise ToolError("Non-delivered order cannot be exchanged")
    present = [it["item_id"] for it in order["items"]]
    for item_id in item_ids:
        if item_ids.count(item_id) > present.count(item_id):
            raise ToolError(f"Number of {item_id} not found.")
    if len(item_ids) != len(new_item_ids):
        raise ToolError("The number of items to be exchanged should match.")
    diff, _ = _swap_price(store, order, item_ids, new_item_ids, same_check=False)
    diff = round(diff, 2)
    method = _method(store, order["user_id"], payment_method_id)
    if _gift(method) and method["balance"] < diff:
        raise ToolError("Insufficient gift card balance to pay for the price difference")
    order = store.mut("orders", order_id)
    order["status"] = "exchange requested"
    order["exchange_items"] = sorted(item_ids)
    order["exchange_new_items"] = sorted(new_item_ids)
    order["exchange_payment_method_id"] = payment_method_id
    order["exchange_price_difference"] = diff
    return json.dumps(order)


def find_user_id_by_name_zip(store: Store, first_name: Any, last_name: Any, zip: Any) -> str:
    for user_id, u in store.items("users"):
        if (
            u["name"]["first_name"].lower() == first_name.lower()
            and u["name"]["last_name"].lower() == last_name.lower()
            and u["address"]["zip"] == zip
        ):
            return user_id
    raise ToolError("User not found")


def find_user_id_by_email(store: Store, email: Any) -> str:
    for user_id, u in store.items("users"):
        if u["email"].lower() == email.lower():
            return user_id
    raise ToolError("User not found")


def get_order_details(store: Store, order_id: Any) -> str:
    return json.dumps(_order(store, order_id))


def get_product_details(store: Store, product_id: Any) -> str:
    return json.dumps(_product(store, product_id))


def get_item_details(store: Store, item_id: Any) -> str:
    for product in store.values("products"):
        if item_id in product["variants"]:
            return json.dumps(product["variants"][item_id])
    raise ToolError("Item not found")


def get_user_details(store: Store, user_id: Any) -> str:
    return json.dumps(_user(store, user_id))


def list_all_product_types(store: Store) -> str:
    by_name = {p["name"]: p["product_id"] for p in store.values("products")}
    return json.dumps(by_name, sort_keys=True)


_ADDRESS_FIELDS = ("address1", "address2", "city", "country", "state", "zip")


def _address(**fields: Any) -> dict[str, Any]:
    """A UserAddress in tau2's field order (country before state)."""
    errors = [(k, *e) for k in _ADDRESS_FIELDS if (e := _check(str, fields[k])[1])]
    if errors:
        raise _invalid("UserAddress", errors)
    return {k: fields[k] for k in _ADDRESS_FIELDS}


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
    order = _order(store, order_id)
    if "pending" not in order["status"]:
        raise ToolError("Non-pending order cannot be modified")
    address = _address(
        address1=address1, address2=address2, city=city, state=state, country=country, zip=zip
    )
    order = store.mut("orders", order_id)
    order["address"] = address
    return json.dumps(order)


def modify_pending_order_items(
    store: Store, order_id: Any, item_ids: Any, new_item_ids: Any, payment_method_id: Any
) -> str:
    order = _order(store, order_id)
    if order["status"] != "pending":
        raise ToolError("Non-pending order cannot be modified")
    present = [it["item_id"] for it in order["items"]]
    for item_id in item_ids:
        if item_ids.count(item_id) > present.count(item_id):
            raise ToolError(f"{item_id} not found")
    if len(item_ids) != len(new_item_ids):
        raise ToolError("The number of items to be exchanged should match")
    diff, variant = _swap_price(store, order, item_ids, new_item_ids, same_check=True)
    method = _method(store, order["user_id"], payment_method_id)
    if _gift(method) and method["balance"] < diff:
        raise ToolError("Insufficient gift card balance to pay for the new item")
    record = _payment("payment" if diff > 0 else "refund", abs(diff), payment_method_id)
    order = store.mut("orders", order_id)
    order["payment_history"].append(record)
    if _gift(method):
        method = _mut_method(store, order["user_id"], payment_method_id)
        method["balance"] -= diff
        method["balance"] = round(method["balance"], 2)
    for item_id, new_item_id in zip(item_ids, new_item_ids, strict=False):
        item = next((it for it in order["items"] if it["item_id"] == item_id), None)
        if item is None:
            raise ToolError(f"Item {item_id} not found")
        item["item_id"] = new_item_id
        # tau2 writes the last checked variant onto every swapped item (kept as is)
        item["price"] = variant["price"]  # type: ignore[index]
        item["options"] = variant["options"]  # type: ignore[index]
    order["status"] = "pending (item modified)"
    return json.dumps(order)


def modify_pending_order_payment(store: Store, order_id: Any, payment_method_id: Any) -> str:
    order = _order(store, order_id)
    if "pending" not in order["status"]:
        raise ToolError("Non-pending order cannot be modified")
    method = _method(store, order["user_id"], payment_method_id)
    history = order["payment_history"]
    if len(history) != 1 or history[0]["transaction_type"] != "payment":
        raise ToolError("There should be exactly one payment for a pending order")
    if history[0]["payment_method_id"] == payment_method_id:
        raise ToolError("The new payment method should be different from the current one")
    amount = history[0]["amount"]
    if _gift(method) and method["balance"] < amount:
        raise ToolError("Insufficient gift card balance to pay for the order")
    old_id = history[0]["payment_method_id"]
    records = [_payment("payment", amount, payment_method_id), _payment("refund", amount, old_id)]
    order = store.mut("orders", order_id)
    order["payment_history"].extend(records)
    if _gift(method):
        method = _mut_method(store, order["user_id"], payment_method_id)
        method["balance"] -= amount
        method["balance"] = round(method["balance"], 2)
    old = _method(store, order["user_id"], old_id)
    if _gift(old):
        old = _mut_method(store, order["user_id"], old_id)
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
    _user(store, user_id)
    address = _address(
        address1=address1, address2=address2, city=city, state=state, country=country, zip=zip
    )
    user = store.mut("users", user_id)
    user["address"] = address
    return json.dumps(user)


def return_delivered_order_items(
    store: Store, order_id: Any, item_ids: Any, payment_method_id: Any
) -> str:
    order = _order(store, order_id)
    if order["status"] != "delivered":
        raise ToolError("Non-delivered order cannot be returned")
    method = _method(store, order["user_id"], payment_method_id)
    if not _gift(method) and payment_method_id != order["payment_history"][0]["payment_method_id"]:
        raise ToolError("Payment method should be the original payment method")
    present = [it["item_id"] for it in order["items"]]
    for item_id in item_ids:
        if item_ids.count(item_id) > present.count(item_id):
            raise ToolError("Some item not found")
    order = store.mut("orders", order_id)
    order["status"] = "return requested"
    order["return_items"] = sorted(item_ids)
    order["return_payment_method_id"] = payment_method_id
    return json.dumps(order)


def transfer_to_human_agents(store: Store, summary: Any) -> str:
    return "Transfer successful"


def _spec(fn: Any, kind: str, like: str | None = None, **params: Any) -> ToolSpec:
    """A tau2 retail tool; description and parameters as tau-bench's tool ``like``."""
    base = {t.name: t for t in retail.V1_TOOLS}.get(like or fn.__name__)
    spec = _spec_airline(
        fn,
        kind,
        base.description if base else params.pop("_description"),
        **(dict(base.params) if base else params),
    )
    return replace(spec, invoke_name=f"RetailTools.{fn.__name__}")


def _any_reason(spec: ToolSpec) -> ToolSpec:
    """tau2 types a cancel reason as any string (tau-bench's schema had an
    enum) and refuses other reasons in the tool; its schema says so."""
    reason = {
        "type": "string",
        "description": "Why it is cancelled: 'no longer needed' or 'ordered by mistake'.",
    }
    return replace(spec, params={**spec.params, "reason": reason})


TAU2_TOOLS: list[ToolSpec] = [
    _spec(calculate_tool, "read"),
    _any_reason(_spec(cancel_pending_order, "write")),
    _spec(exchange_delivered_order_items, "write"),
    _spec(find_user_id_by_name_zip, "read"),
    _spec(find_user_id_by_email, "read"),
    _spec(get_order_details, "read"),
    _spec(get_product_details, "read"),
    _spec(
        get_item_details,
        "read",
        _description="Look up one item (a product variant) by its item id.",
        item_id={"type": "string", "description": "Item id, for example '1008292230'."},
    ),
    _spec(get_user_details, "read"),
    _spec(list_all_product_types, "read"),
    _spec(modify_pending_order_address, "write"),
    _spec(modify_pending_order_items, "write"),
    _spec(modify_pending_order_payment, "write"),
    _spec(modify_user_address, "write"),
    _spec(return_delivered_order_items, "write"),
    _spec(transfer_to_human_agents, "read"),
]
