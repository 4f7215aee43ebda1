"""Regenerates configs/smollm2_json.py's data: messy customer messages -> one strict JSON object.

python configs/demo_data/make_orders.py   (deterministic; writes here orders_train.jsonl,
                                           orders_eval.jsonl and orders_prompt.txt)

The real-model sibling of make_data.py's demo task, with more to get right: the intent, the
product, the order number when the message gives one (else null) and whether it is urgent, as
{"intent": ..., "product": ..., "order_id": ..., "urgent": ...} and nothing else. Every way of
asking, every product word, urgency marker and sentence shape has train variants and variants held
out for eval, so eval rows are phrasings training never saw. Rows are kept only when no
near-duplicate of a kept row (make_data.NearIndex), so `python -m ftjax.check_data` is clean.
orders_prompt.txt is the prompting baseline: the instruction and two worked examples.
"""
import importlib.util
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("make_data", os.path.join(HERE, "make_data.py"))
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

# Each list: (train variants, eval-only variants).
INTENTS = {
    "refund": (["i want my money back", "refund me please", "can i get a refund",
                "i need a refund for this", "pls send my money back", "how do i get refunded"],
               ["reimburse me", "i expect a full refund", "return the money to my card"]),
    "cancel": (["cancel my order", "i dont want it anymore", "please cancel it",
                "stop the order before it ships", "cancel that purchase", "i changed my mind"],
               ["call off the order", "scrap my order please", "i no longer need it, cancel"]),
    "track": (["where is my order", "has it shipped yet", "can i get a tracking number",
               "it still hasnt arrived", "when will it be delivered", "no sign of my package"],
              ["whats the delivery status", "is it on its way", "the parcel is late"]),
    "repair": (["it stopped working", "it is broken", "the screen cracked", "it wont turn on",
                "its making a weird noise", "the battery dies in an hour"],
               ["it keeps crashing", "it overheats badly", "the buttons dont respond"]),
    "exchange": (["can i swap it for another colour", "i got the wrong size",
                  "i want a different model instead", "exchange it for the black one",
                  "wrong item, send the right one", "can i trade it for a newer version"],
                 ["replace it with the silver version", "i ordered blue but got red"]),
}
PRODUCTS = {
    "phone": (["phone", "mobile", "smartphone", "cell"], ["handset"]),
    "laptop": (["laptop", "notebook", "macbook"], ["ultrabook"]),
    "tv": (["tv", "television", "telly"], ["smart tv"]),
    "headphones": (["headphones", "earbuds", "headset"], ["airpods"]),
    "tablet": (["tablet", "ipad"], ["e-reader"]),
}
URGENT = (["asap", "URGENT!!", "right now", "today please", "this is an emergency", "need it fixed NOW"],
          ["immediately!!!", "time sensitive", "top priority"])
CALM = (["", "thanks", "no rush", "whenever you can", "cheers", "thank you"],
        ["kind regards", "appreciate it"])
OPENERS = (["hi", "hey", "hello team", "", "good morning", "dear support"], ["greetings", "hiya"])
ORDERS = (["order {n}", "order #{n}", "order no. {n}", "ref {n}"], ["purchase {n}", "#{n}"])
TEMPLATES = (
    ["{opener} {ask} - my {product} {order} {tail}", "{opener} my {product} ({order}): {ask}. {tail}",
     "{ask}!! {product} {order} {tail}", "{opener}, about the {product} {order}, {ask}. {tail}",
     "{order} - {product} - {ask} {tail}", "{opener} {product} here. {ask} {order} {tail}"],
    ["{opener}. {order}, the {product}... {ask}. {tail}", "re {product} {order}: {ask} {tail}"])
INSTRUCTION = ("Read the customer message and reply with one JSON object only: {\"intent\": one of "
               "refund, cancel, track, repair, exchange; \"product\": one of phone, laptop, tv, "
               "headphones, tablet; \"order_id\": the order number as a string, or null; "
               "\"urgent\": true or false}.")


def request(rng: random.Random, split: int) -> tuple[str, str]:
  """(a messy message, its JSON); split 0 draws train variants, 1 eval-only ones (mixed with
  train variants, so each eval row has at least its ask held out)."""
  pick = lambda pair, held: rng.choice(pair[1] if held else pair[0])
  intent, product = rng.choice(list(INTENTS)), rng.choice(list(PRODUCTS))
  urgent, has_order = rng.random() < 0.4, rng.random() < 0.6
  held = [split == 1 and (i == 0 or rng.random() < 0.4) for i in range(6)]
  order_id = str(rng.randint(10000, 999999)) if has_order else None
  text = pick(TEMPLATES, held[1]).format(
      opener=pick(OPENERS, held[2]), ask=pick(INTENTS[intent], held[0]),
      product=pick(PRODUCTS[product], held[3]),
      order=pick(ORDERS, held[4]).format(n=order_id) if has_order else "",
      tail=pick(URGENT if urgent else CALM, held[5]))
  text = " ".join(text.replace(" ,", ",").split()).strip(" ,.-")
  if rng.random() < 0.3:
    text = text.lower()
  return text, json.dumps({"intent": intent, "product": product, "order_id": order_id,
                           "urgent": urgent})


def chat(rng: random.Random, split: int) -> dict:
  prompt, reply = request(rng, split)
  return {"messages": [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": reply}]}


def main():
  rng = random.Random(0)
  n_train, n_eval = 400, 60
  train, _ = make_data.distinct_rows(lambda r: chat(r, 0), rng, n_train, 0)
  index = make_data.NearIndex()
  for row in train:
    index.add(index.shingles(row["messages"][0]["content"]))
  held_out = []
  while len(held_out) < n_eval:
    row = chat(rng, 1)
    s = index.shingles(row["messages"][0]["content"])
    if index.most_similar(s) < make_data.MARGIN:
      index.add(s)
      held_out.append(row)
  make_data.write(os.path.join(HERE, "orders_train.jsonl"), train)
  make_data.write(os.path.join(HERE, "orders_eval.jsonl"), held_out)
  examples = [request(random.Random(seed), 0) for seed in (101, 202)]
  with open(os.path.join(HERE, "orders_prompt.txt"), "w") as f:
    f.write(INSTRUCTION + "\n" + "".join(f"Message: {m}\nJSON: {j}\n" for m, j in examples))


if __name__ == "__main__":
  main()
