"""Write ``paca_lightning/assets/oasst1_sample.jsonl``: a small OASST1-schema sample for the demo.

    python scripts/make_oasst1_sample.py

The conversations below were written for this project. They follow the real OASST1 export
(one JSON object per message, linked by ``parent_id`` into trees) so the loader's tree code runs
on the demo exactly as on the real data: trees branch (several ranked replies to one prompt),
some messages are deleted or failed review, and the languages are English, Spanish, German and
French. Message ids are UUIDv5 of the tree and path, so the file is reproducible.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paca_lightning.data import OASST1_SAMPLE  # noqa: E402

NAMESPACE = uuid.UUID("6f1c9d2e-58a4-4c1b-9a57-3d0e8f1b2c44")


def P(text, *replies, **flags):
    """A prompter message and the assistant replies to it."""
    return {"role": "prompter", "text": text, "children": list(replies), **flags}


def A(text, *followups, rank=None, **flags):
    """An assistant reply (``rank`` 0 is the best among its siblings) and the follow-up prompts."""
    return {"role": "assistant", "text": text, "children": list(followups), "rank": rank, **flags}


TREES = [
    ("en", P("What is the boiling point of water?",
             A("At sea level, water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit. "
               "At higher altitude the air pressure is lower, so water boils at a lower temperature.",
               P("Why does lower pressure lower the boiling point?",
                 A("Water boils when its vapour pressure equals the pressure of the air around it. "
                   "With less air pressure, the water reaches that point at a lower temperature.")),
               rank=0),
             A("100 degrees.", rank=1))),
    ("en", P("Can you give me a short tip for learning a new language?",
             A("Practise a little every day. Fifteen minutes of reading, listening or speaking each "
               "day helps more than a long session once a week.", rank=0),
             A("Just move to the country.", rank=2),
             A("Learn the most common words first, then read simple stories that use them.", rank=1))),
    ("en", P("Write a haiku about the sea.",
             A("Grey waves fold and break,\nsalt wind carries gull voices,\nthe tide keeps its time."))),
    ("en", P("How do I reverse a list in Python?",
             A("Use slicing to get a reversed copy: `items[::-1]`. To reverse the list in place, "
               "call `items.reverse()`.",
               P("Which one is faster?",
                 A("Both are fast. `items.reverse()` does not create a new list, so it uses less "
                   "memory; slicing is handy when you need to keep the original order.")),
               rank=0))),
    ("en", P("What is photosynthesis?",
             A("Photosynthesis is the process plants use to turn light, water and carbon dioxide into "
               "sugar and oxygen. It happens in the chloroplasts of their leaves."))),
    ("en", P("Tell me a fun fact about octopuses.",
             A("An octopus has three hearts and blue blood. Two hearts pump blood through the gills "
               "and the third pumps it through the rest of the body.", rank=0),
             A("I don't know any.", rank=1, deleted=True))),
    ("en", P("How many minutes are in a day?",
             A("There are 1440 minutes in a day: 24 hours times 60 minutes."))),
    ("en", P("Explain what a function is in programming.",
             A("A function is a named block of code that does one job. You give it inputs, called "
               "arguments, and it can return a result. Functions let you reuse code instead of "
               "writing it again.",
               P("Can you show an example?",
                 A("Sure. In Python:\n\ndef add(a, b):\n    return a + b\n\nCalling `add(2, 3)` "
                   "returns 5.")),
               rank=0))),
    ("en", P("What should I pack for a day hike?",
             A("Water, a snack, sun cream, a light jacket, a map or charged phone, and comfortable "
               "shoes. Tell someone where you are going."))),
    ("en", P("Summarize the story of Little Red Riding Hood in two sentences.",
             A("A girl walks through the forest to visit her grandmother, and a wolf tricks her and "
               "gets to the house first. A woodcutter arrives in time and saves them both."))),
    ("en", P("Is a tomato a fruit or a vegetable?",
             A("Botanically a tomato is a fruit, because it grows from the flower and holds seeds. "
               "In cooking it is usually treated as a vegetable.", rank=0),
             A("It is a vegetable, everyone knows that.", rank=1, review_result=False))),
    ("en", P("Give me three words that rhyme with cat.",
             A("Hat, bat and mat."))),
    ("en", P("How can I sleep better?",
             A("Go to bed at the same time each night, keep the room dark and cool, avoid screens "
               "for an hour before sleep, and skip coffee in the afternoon.",
               P("What if I still can't fall asleep?",
                 A("Get up after twenty minutes, do something calm in dim light, and go back to bed "
                   "when you feel sleepy. If it goes on for weeks, talk to a doctor.")),
               rank=0))),
    ("en", P("What is the capital of Australia?",
             A("The capital of Australia is Canberra, not Sydney as many people think."))),
    ("en", P("Convert 5 kilometres to miles.",
             A("5 kilometres is about 3.1 miles, since one kilometre is about 0.62 miles."))),
    ("en", P("Why is the sky blue?",
             A("Sunlight contains all colours. Air molecules scatter short blue wavelengths much more "
               "than red ones, so blue light reaches our eyes from every part of the sky.", rank=0),
             A("Because it reflects the ocean.", rank=1))),
    ("en", P("Suggest a name for a friendly robot.",
             A("How about Bolt? It is short, cheerful and easy to remember."))),
    ("en", P("What does a CPU do?",
             A("The CPU, or central processing unit, runs the instructions of programs: it does "
               "arithmetic, compares values and decides which instruction comes next."))),
    ("es", P("¿Cuál es el río más largo del mundo?",
             A("El Nilo y el Amazonas compiten por el título. Según la medición, el Amazonas mide "
               "unos 6.400 kilómetros y el Nilo unos 6.650.", rank=0),
             A("El Misisipi.", rank=1))),
    ("es", P("Dame una receta sencilla para el desayuno.",
             A("Tostadas con tomate: tuesta pan, frota un tomate maduro encima, añade aceite de oliva "
               "y una pizca de sal.",
               P("¿Y algo dulce?",
                 A("Yogur con fruta y un poco de miel. Está listo en dos minutos.")),
               rank=0))),
    ("es", P("¿Cómo se dice 'gracias' en alemán?",
             A("Se dice 'danke'. Para dar las gracias con más énfasis puedes decir 'danke schön'."))),
    ("es", P("Explícame qué es una variable en programación.",
             A("Una variable es un nombre que guarda un valor. Por ejemplo, `edad = 30` guarda el "
               "número 30 con el nombre edad, y luego puedes usarlo o cambiarlo."))),
    ("de", P("Was ist die Hauptstadt von Kanada?",
             A("Die Hauptstadt von Kanada ist Ottawa.", rank=0),
             A("Toronto.", rank=1))),
    ("de", P("Wie kann ich Wasser sparen?",
             A("Dusche kürzer, drehe den Hahn beim Zähneputzen zu und starte die Waschmaschine nur, "
               "wenn sie voll ist.",
               P("Und im Garten?",
                 A("Gieße früh am Morgen oder am Abend und sammle Regenwasser in einer Tonne.")),
               rank=0))),
    ("de", P("Erkläre kurz, was ein Algorithmus ist.",
             A("Ein Algorithmus ist eine genaue Schritt-für-Schritt-Anleitung, um eine Aufgabe zu "
               "lösen, zum Beispiel eine Liste zu sortieren."))),
    ("fr", P("Quelle est la différence entre la météo et le climat ?",
             A("La météo décrit le temps qu'il fait pendant quelques jours. Le climat décrit le temps "
               "moyen d'une région sur de nombreuses années."))),
    ("fr", P("Peux-tu me conseiller un livre pour apprendre à cuisiner ?",
             A("Commence par un livre de recettes de base avec des photos pour chaque étape. Choisis "
               "cinq recettes simples et refais-les jusqu'à les connaître.", rank=0),
             A("Non.", rank=1, deleted=True),
             A("Regarde plutôt des vidéos.", rank=2))),
    ("fr", P("Combien de jours y a-t-il dans une année bissextile ?",
             A("Une année bissextile compte 366 jours : février a 29 jours au lieu de 28."))),
    # A tree whose only reply was deleted: it holds no usable conversation.
    ("en", P("Tell me a secret.", A("I can't do that.", deleted=True))),
    # A prompt that failed review: the loader drops it with its whole subtree.
    ("en", P("asdf qwer zxcv", A("It looks like random letters. What would you like to ask?"),
             review_result=False)),
]


def rows_of_tree(lang: str, root: dict, tree_index: int) -> list[dict]:
    tree_id = str(uuid.uuid5(NAMESPACE, f"tree-{tree_index}"))
    rows = []

    def visit(node: dict, parent_id, path: str):
        message_id = tree_id if parent_id is None else str(uuid.uuid5(NAMESPACE, f"{tree_index}/{path}"))
        rows.append({
            "message_id": message_id,
            "parent_id": parent_id,
            "user_id": str(uuid.uuid5(NAMESPACE, f"user-{(tree_index * 7 + len(path)) % 11}")),
            "created_date": f"2023-02-{1 + tree_index % 28:02d}T{len(path) % 24:02d}:00:00+00:00",
            "text": node["text"],
            "role": node["role"],
            "lang": lang,
            "review_count": 3,
            "review_result": node.get("review_result", True),
            "deleted": node.get("deleted", False),
            "rank": node.get("rank"),
            "synthetic": False,
            "model_name": None,
            "message_tree_id": tree_id,
            "tree_state": "ready_for_export",
        })
        for index, child in enumerate(node["children"]):
            visit(child, message_id, f"{path}.{index}")

    visit(root, None, "0")
    return rows


def main() -> int:
    rows = [row for index, (lang, root) in enumerate(TREES) for row in rows_of_tree(lang, root, index)]
    OASST1_SAMPLE.parent.mkdir(parents=True, exist_ok=True)
    with open(OASST1_SAMPLE, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} messages in {len(TREES)} trees to {OASST1_SAMPLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
