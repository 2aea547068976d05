"""Write the example files of the other real-world formats (README "Data formats"):
`python examples/data/make_formats.py`. Each holds the same 12 questions in one format."""

import gzip
import json
from pathlib import Path

here = Path(__file__).parent
SYSTEM = "You are a helpful assistant. Answer briefly."
QA = [
    (
        "What is the boiling point of water at sea level?",
        "100 degrees Celsius.",
        "About 50 degrees.",
    ),
    ("How many continents are there?", "Seven.", "Three."),
    ("What is the largest planet in the solar system?", "Jupiter.", "Mars."),
    ("Which organ pumps blood through the body?", "The heart.", "The liver."),
    ("What is the chemical symbol for gold?", "Au.", "Gd."),
    ("How many minutes are in an hour?", "Sixty.", "A hundred."),
    ("What do bees make?", "Honey and wax.", "Milk."),
    ("Which ocean is the largest?", "The Pacific Ocean.", "The Arctic Ocean."),
    ("What is the freezing point of water?", "0 degrees Celsius.", "It never freezes."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci.", "Pablo Picasso."),
    ("How many sides does a hexagon have?", "Six.", "Eight."),
    ("What is the capital of Italy?", "Rome.", "Milan."),
]


def write_jsonl(name: str, rows: list[dict]) -> None:
    (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def openai_rows():
    for i, (q, good, bad) in enumerate(QA):
        messages = [{"role": "system", "content": SYSTEM}] * (i % 2) + [
            {"role": "user", "content": q}
        ]
        yield {
            "input": {"messages": messages},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}],
        }


def sharegpt_rows():
    for i, (q, good, bad) in enumerate(QA):
        turns = [{"from": "human", "value": q}]
        if i % 3 == 2:  # multi-turn: an earlier exchange first
            turns = [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello!"}, *turns]
        row = {
            "conversations": turns,
            "chosen": {"from": "gpt", "value": good},
            "rejected": {"from": "gpt", "value": bad},
        }
        if i % 2:
            row["system"] = SYSTEM
        yield row


def hh_rows():
    for i, (q, good, bad) in enumerate(QA):
        prompt = f"\n\nHuman: {q}\n\nAssistant:"
        # hh-rlhf has rows whose chosen transcript ends at "Assistant:" (an empty answer)
        chosen = prompt if i == 5 else f"{prompt} {good}"
        yield {"chosen": chosen, "rejected": f"{prompt} {bad}"}


def orca_rows():
    for i, (q, good, bad) in enumerate(QA):
        yield {"system": SYSTEM if i % 2 else "", "question": q, "chosen": good, "rejected": bad}


def ultrafeedback_rows():
    for i, (q, good, bad) in enumerate(QA):
        user = {"role": "user", "content": q}
        yield {
            "prompt": q,
            "chosen": [user, {"role": "assistant", "content": good}],
            "rejected": [user, {"role": "assistant", "content": bad}],
            "score_chosen": 8.0 + i % 3,
            "score_rejected": 8.0 - i % 5,  # rows 0, 5, 10 tie: no preference signal
        }


def nested_rows():
    for q, good, bad in QA:
        yield {
            "input": {"messages": [{"role": "user", "content": q}]},
            "answers": {"better": good, "worse": bad},
        }


write_jsonl("openai.jsonl", list(openai_rows()))
(here / "sharegpt.json").write_text(json.dumps(list(sharegpt_rows()), indent=1) + "\n")
with gzip.GzipFile(here / "hh.jsonl.gz", "wb", mtime=0) as f:  # mtime=0: the same bytes each time
    f.write("".join(json.dumps(r) + "\n" for r in hh_rows()).encode())
write_jsonl("orca.jsonl", list(orca_rows()))
write_jsonl("ultrafeedback.jsonl", list(ultrafeedback_rows()))
write_jsonl("nested.jsonl", list(nested_rows()))
print(f"wrote the format examples to {here}")
