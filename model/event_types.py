"""The behaviour event types, one list for the stream processor and the model.

The order is a contract twice over: a type's index is its code in the stored histories
(stream_app/pipeline/state.py) and its row of the model's type embedding (`SeqRec.type_emb`),
so a new type is only ever appended; a checkpoint trained before it still loads, its
missing rows zero (model/checkpoint.py). Torch-free: event validation imports it on the
hot path, and so do clients that never load a model.
"""
from __future__ import annotations

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "search", "dismiss")
TYPE_ID = {t: i for i, t in enumerate(EVENT_TYPES)}
FIRST_TYPES = 5  # len(EVENT_TYPES) when the first checkpoints were trained (no `dismiss`)

# An event of these types says the user took an item: the recent items the transition term
# and co-occurrence read, training and evaluation targets, popularity counts. A search has
# no item; a dismiss names one the user said no to, a model input but never a "yes".
POSITIVE = frozenset({"view", "click", "add_to_cart", "purchase"})
# Engagement: what the online hit rate counts, and what lifts an earlier dismissal of the
# same item (the user changed their mind; model/seen.py).
ENGAGEMENT = frozenset({"click", "add_to_cart", "purchase"})


def positive(item_id: str | None, etype: str) -> bool:
    """Whether an event takes its item (see POSITIVE)."""
    return item_id is not None and etype in POSITIVE
