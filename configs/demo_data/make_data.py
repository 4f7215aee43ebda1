"""Regenerates the demos' shipped data: messy support requests -> one clean JSON triage object.

python configs/demo_data/make_data.py   (deterministic; writes here train.jsonl and eval.jsonl
                                         for configs/demo.py, chat_train.jsonl and chat_eval.jsonl,
                                         {"messages": [...]}, for configs/demo_chat.py;
                                         configs/demo_dpo.py's pairs are mined from the SFT
                                         adapter's mistakes by mine_pairs.py)

Random combinations of a few phrases repeat and nearly repeat each other; a row is kept only when
it is no near-duplicate of a kept one (nor, for eval, its prompt of a train prompt), so that
`python -m ftjax.check_data` finds nothing to report. Similarity here is the Jaccard of 5-grams of
the demo tokenizer's pre-tokens (words, digits, spaces, punctuation), with a margin below
check_data's 0.8 for BPE pieces that the pre-tokens do not see.
"""
import collections
import json
import os
import random
import re

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
# In the demo tokenizer's words (it is trained on train.jsonl), so they cost few tokens.
SYSTEM = ["intent, product, urgent", "give the intent, product and urgent",
          "triage the order: intent, product, urgent"]
MARGIN = 0.6  # keep rows below this pre-token 5-gram Jaccard (check_data reports >= 0.8)


def request(rng: random.Random) -> tuple[str, str]:
  """(a messy request, its JSON triage)."""
  intent, product = rng.choice(list(INTENTS)), rng.choice(list(PRODUCTS))
  urgent = rng.random() < 0.4
  prompt = rng.choice(TEMPLATES).format(
      opener=rng.choice(OPENERS), ask=rng.choice(INTENTS[intent]),
      product=rng.choice(PRODUCTS[product]), tail=rng.choice(URGENT if urgent else CALM))
  prompt = " ".join(prompt.split())  # messy, but no double spaces
  return prompt, json.dumps({"intent": intent, "product": product, "urgent": urgent})


def example(rng: random.Random) -> dict:
  prompt, completion = request(rng)
  return {"prompt": prompt, "completion": completion}


def chat(rng: random.Random) -> dict:
  """One request or two, each answered; a system message on some."""
  messages = [{"role": "system", "content": rng.choice(SYSTEM)}] if rng.random() < 0.3 else []
  prompt, reply = request(rng)
  messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
  if rng.random() < 0.1:
    prompt, reply = request(rng)
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": reply}]
  return {"messages": messages}


def pieces(text: str) -> list[str]:
  return re.findall(r"[A-Za-z]+|\d|\s|[^A-Za-z\d\s]", text)


def rendered(row: dict) -> tuple[str, str]:
  """(what is asked, the whole row) as text, the chat as demo_chat's template writes it."""
  if "prompt" in row:
    return row["prompt"], row["prompt"] + row["completion"]
  turns = [f"<s>{m['role']}\n{m['content']}</s>\n" for m in row["messages"]]
  return "".join(turns[:-1]), "".join(turns)


class NearIndex:
  """Shingle sets and an inverted index, for the largest Jaccard of a set with those added."""

  def __init__(self):
    self.sets, self.posting = [], collections.defaultdict(list)

  @staticmethod
  def shingles(text: str) -> set:
    p = pieces(text)
    return {tuple(p[i:i + 5]) for i in range(max(1, len(p) - 4))}

  def most_similar(self, s: set) -> float:
    shared = collections.Counter(j for g in s for j in self.posting[g])
    return max((n / (len(s) + len(self.sets[j]) - n) for j, n in shared.items()), default=0.0)

  def add(self, s: set):
    for g in s:
      self.posting[g].append(len(self.sets))
    self.sets.append(s)


def distinct_rows(make, rng: random.Random, n_train: int, n_eval: int):
  """n_train + n_eval rows from make(rng), none a near-duplicate of another, no eval prompt near a
  train prompt."""
  rows, whole, asked = [], NearIndex(), NearIndex()
  while len(rows) < n_train + n_eval:
    row = make(rng)
    question, text = rendered(row)
    s, q = whole.shingles(text), asked.shingles(question)
    if whole.most_similar(s) >= MARGIN:
      continue
    if len(rows) >= n_train and asked.most_similar(q) >= MARGIN:
      continue
    whole.add(s)
    if len(rows) < n_train:
      asked.add(q)
    rows.append(row)
  return rows[:n_train], rows[n_train:]


def write(path: str, rows: list[dict]):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  train, held_out = distinct_rows(example, random.Random(0), 1000, 100)
  write(os.path.join(here, "train.jsonl"), train)
  write(os.path.join(here, "eval.jsonl"), held_out)
  # A second behaviour on the same requests, for a second adapter: the ticket's intent alone.
  for name, rows in (("intent_train.jsonl", train), ("intent_eval.jsonl", held_out)):
    write(os.path.join(here, name), [
        {"prompt": r["prompt"], "completion": json.loads(r["completion"])["intent"]} for r in rows])
  train, held_out = distinct_rows(chat, random.Random(1), 1000, 100)
  write(os.path.join(here, "chat_train.jsonl"), train)
  write(os.path.join(here, "chat_eval.jsonl"), held_out)


if __name__ == "__main__":
  main()
