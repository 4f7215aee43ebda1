"""Regenerates the demo's shipped data: messy support requests -> one clean JSON triage object.

python configs/demo_data/make_data.py   (deterministic; writes train.jsonl and eval.jsonl here)
"""
import json
import os
import random

# intent -> ways customers say it
INTENTS = {
    "refund": ["i want my money back", "refund me", "pls refund", "can i get a refund",
               "give me my money back"],
    "cancel": ["cancel my order", "i dont want it anymore", "pls cancel", "stop the order",
               "cancel it"],
    "track": ["where is my order", "has it shipped yet", "tracking number pls", "it hasnt arrived",
              "when will it come"],
    "repair": ["it stopped working", "it is broken", "screen cracked", "it wont turn on",
               "its making a weird noise"],
    "upgrade": ["i want the bigger plan", "upgrade my plan", "can i get the pro version",
                "need more storage", "switch me to premium"],
}
# product -> words customers use for it
PRODUCTS = {"phone": ["phone", "mobile", "cell"], "laptop": ["laptop", "notebook", "macbook"],
            "tv": ["tv", "television", "telly"], "watch": ["watch", "smartwatch"],
            "headphones": ["headphones", "earbuds", "headset"]}
URGENT = ["asap", "URGENT!!", "right now", "today pls", "its an emergency"]
CALM = ["", "thanks", "no rush", "whenever", "cheers"]
OPENERS = ["hi", "hey", "hello team", "", "yo", "good morning"]
TEMPLATES = ["{opener} {ask} - my {product} {tail}", "{opener} my {product}: {ask} {tail}",
             "{ask}!! {product} {tail}", "{opener} about the {product}, {ask}. {tail}",
             "{product} order - {ask} {tail}"]


def example(rng: random.Random) -> dict:
  intent, product = rng.choice(list(INTENTS)), rng.choice(list(PRODUCTS))
  urgent = rng.random() < 0.4
  prompt = rng.choice(TEMPLATES).format(
      opener=rng.choice(OPENERS), ask=rng.choice(INTENTS[intent]),
      product=rng.choice(PRODUCTS[product]), tail=rng.choice(URGENT if urgent else CALM))
  prompt = " ".join(prompt.split())  # messy, but no double spaces
  completion = json.dumps({"intent": intent, "product": product, "urgent": urgent})
  return {"prompt": prompt, "completion": completion}


def main():
  rng = random.Random(0)
  here = os.path.dirname(os.path.abspath(__file__))
  rows = [example(rng) for _ in range(1100)]
  for name, part in (("train.jsonl", rows[:1000]), ("eval.jsonl", rows[1000:])):
    with open(os.path.join(here, name), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
  main()
