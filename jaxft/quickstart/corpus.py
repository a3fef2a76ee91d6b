"""The quickstart's generated data: conversational prose, an "integration engine" instruction set
(account / order / inventory requests answered with JSON only), its JSON Schema, and preference
pairs (bare JSON preferred over the same JSON wrapped in conversational filler). Deterministic
from a seed; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from typing import Any

SYSTEM = ("You are the integration engine. Answer every request with one JSON object and "
          "nothing else.")
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne",
             "Tyrell", "Cyberdyne", "Soylent", "Wonka"]
CITIES = ["Lisbon", "Oslo", "Denver", "Kyoto", "Austin", "Dublin", "Nairobi", "Lima", "Perth",
          "Quebec", "Seville", "Tallinn"]
PRODUCTS = ["bolts", "gaskets", "valves", "sensors", "cables", "filters", "pumps", "brackets",
            "hinges", "panels"]
WAREHOUSES = ["north", "south", "east", "west", "central"]
OPENERS = ["Sure!", "Of course.", "Happy to help!", "Great question.", "Absolutely.",
           "Thanks for asking.", "No problem at all."]
CLOSERS = ["Let me know if there is anything else I can do.", "Have a wonderful day!",
           "I hope that helps.", "Feel free to ask me anything else.",
           "Is there anything more you would like to know?"]
CHAT_TOPICS = [
    ("How was the delivery to {city}?",
     "The delivery to {city} went smoothly and the {product} arrived on time."),
    ("Tell me about {company}.",
     "{company} is a long-standing customer that orders {product} every month."),
    ("What do you think about the weather in {city}?",
     "The weather in {city} has been mild, which is good news for shipping."),
    ("Can you describe our {product}?",
     "Our {product} are sturdy, well priced and popular with customers in {city}."),
    ("Any news from the {warehouse} warehouse?",
     "The {warehouse} warehouse is busy this week, mostly packing {product} for {company}."),
]


def _ids(rng: random.Random) -> dict[str, str]:
    return {
        "account": f"AC-{rng.randint(1000, 9999)}",
        "order": f"ORD-{rng.randint(10000, 99999)}",
        "sku": f"SKU-{rng.randint(100, 999)}",
        "company": rng.choice(COMPANIES),
        "city": rng.choice(CITIES),
        "product": rng.choice(PRODUCTS),
        "warehouse": rng.choice(WAREHOUSES),
        "qty": str(rng.randint(1, 500)),
    }


# (request phrasings, answer object) per action; {placeholders} come from _ids.
ACTIONS: dict[str, tuple[list[str], dict[str, str]]] = {
    "get_account": (["Look up account {account}.", "Show me the details of account {account}.",
                     "Fetch account {account} please.", "I need the record for {account}."],
                    {"account_id": "{account}"}),
    "get_order_status": (["What is the status of order {order}?",
                          "Where is order {order} for account {account}?",
                          "Check order {order} on account {account}.",
                          "Has {order} shipped yet?"],
                         {"order_id": "{order}"}),
    "check_inventory": (["How many {sku} are in the {warehouse} warehouse?",
                         "Check stock of {sku} at {warehouse}.",
                         "Inventory level for {sku} in {warehouse}?"],
                        {"sku": "{sku}", "warehouse": "{warehouse}"}),
    "cancel_order": (["Cancel order {order}.", "Please cancel {order} for {company}.",
                      "Stop order {order}, the customer changed their mind."],
                     {"order_id": "{order}"}),
    "update_address": (["Move account {account} to {city}.",
                        "Change the shipping city of {account} to {city}.",
                        "Account {account} relocated to {city}, update it."],
                       {"account_id": "{account}", "city": "{city}"}),
    "create_order": (["Order {qty} {product} for account {account}.",
                      "Account {account} wants {qty} {product}.",
                      "Place an order of {qty} {product} for {account}."],
                     {"account_id": "{account}", "product": "{product}", "quantity": "{qty}"}),
}


GREETINGS = ["Hi there! ", "Good morning! ", "Hello, hope you are well. "]


def instruction(rng: random.Random, greeting: bool = False,
                ) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """One request (system + user messages) and its JSON answer object."""
    action = rng.choice(sorted(ACTIONS))
    phrasings, fields = ACTIONS[action]
    v = _ids(rng)
    request = (rng.choice(GREETINGS) if greeting else "") + rng.choice(phrasings).format(**v)
    answer: dict[str, Any] = {"action": action}
    for key, template in fields.items():
        value = template.format(**v)
        answer[key] = int(value) if key == "quantity" else value
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": request}]
    return messages, answer


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(", ", ": "))


def with_filler(rng: random.Random, answer: dict[str, Any]) -> str:
    return f"{rng.choice(OPENERS)} Here is the result: {dumps(answer)} {rng.choice(CLOSERS)}"


def _json_snippet(rng: random.Random, v: dict[str, str]) -> tuple[str, str]:
    """A user explicitly asking for JSON about something unrelated to the engine's requests: the
    base model knows what JSON looks like, as any pretrained model does."""
    kind = rng.choice(["weather", "shipment", "contact"])
    if kind == "weather":
        obj = {"city": v["city"], "temperature": rng.randint(-5, 35),
               "sky": rng.choice(["clear", "cloudy", "rain"])}
    elif kind == "shipment":
        obj = {"product": v["product"], "boxes": rng.randint(1, 90), "from": v["warehouse"]}
    else:
        obj = {"company": v["company"], "city": v["city"]}
    return f"Write the {kind} note for {v['city']} as JSON.", dumps(obj)


def prose_conversation(rng: random.Random) -> list[dict[str, str]]:
    """Small talk in which requests get friendly prose, never JSON (the base model's habit);
    JSON only appears when a user explicitly asks for it about something else."""
    msgs = []
    for _ in range(rng.randint(1, 2)):
        v = _ids(rng)
        if rng.random() < 0.2:
            q, a = _json_snippet(rng, v)
            msgs += [{"role": "user", "content": q},
                     {"role": "assistant", "content": f"{rng.choice(OPENERS)} {a}"}]
        elif rng.random() < 0.4:  # business requests answered chattily, with facts in prose
            msgs_req, answer = instruction(rng)
            facts = ", ".join(f"{k.replace('_', ' ')} {val}" for k, val in answer.items()
                              if k != "action")
            reply = (f"{rng.choice(OPENERS)} I looked into it: {facts}. "
                     f"{rng.choice(CLOSERS)}")
            msgs += [msgs_req[1], {"role": "assistant", "content": reply}]
        else:
            q, a = rng.choice(CHAT_TOPICS)
            msgs += [{"role": "user", "content": q.format(**v)},
                     {"role": "assistant", "content": f"{rng.choice(OPENERS)} {a.format(**v)} "
                                                      f"{rng.choice(CLOSERS)}"}]
    return msgs


def schema() -> dict[str, Any]:
    """JSON Schema of every valid answer: one object per action, no other keys."""
    variants = []
    for action, (_, fields) in sorted(ACTIONS.items()):
        props: dict[str, Any] = {"action": {"const": action}}
        for key in fields:
            props[key] = {"type": "integer", "minimum": 1} if key == "quantity" else \
                {"type": "string", "minLength": 1}
        variants.append({"type": "object", "properties": props,
                         "required": ["action", *fields], "additionalProperties": False})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "oneOf": variants}


def build(seed: int, n_prose: int, n_train: int, n_heldout: int,
          greeting_rate: float = 0.1) -> dict[str, list[dict]]:
    """All quickstart rows: prose chats, SFT rows, held-out prompts, preference pairs.

    Like logs of a real assistant, the SFT answers to requests that open with a greeting (a
    ``greeting_rate`` share) wrap the JSON in friendly filler: the SFT model learns that habit,
    and the preference pairs (bare JSON chosen over the same JSON with filler) let a DPO stage
    remove it.
    """
    rng = random.Random(seed)
    prose = [{"messages": prose_conversation(rng)} for _ in range(n_prose)]
    sft, heldout, pairs, heldout_pairs = [], [], [], []
    seen: set[str] = set()
    while len(sft) + len(heldout) < n_train + n_heldout:
        greeting = rng.random() < greeting_rate
        messages, answer = instruction(rng, greeting)
        key = messages[1]["content"]
        if key in seen:
            continue
        seen.add(key)
        pair = {"prompt": messages, "chosen": dumps(answer), "rejected": with_filler(rng, answer)}
        if len(heldout) < n_heldout:
            heldout.append({"messages": messages, "expected": answer})
            heldout_pairs.append(pair)
            continue
        reply = with_filler(rng, answer) if greeting else dumps(answer)
        sft.append({"messages": messages + [{"role": "assistant", "content": reply}]})
        pairs.append((greeting, pair))
    # A targeted preference set, as one collects where the behaviour shows: every greeting
    # request, and as many plain ones (so the model keeps answering those with bare JSON).
    greeted = [pr for g, pr in pairs if g]
    plain = [pr for g, pr in pairs if not g][: len(greeted)]
    return {"prose": prose, "sft": sft, "heldout": heldout, "pairs": greeted + plain,
            "heldout_pairs": heldout_pairs}
