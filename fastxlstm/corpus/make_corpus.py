"""Regenerate ``tales.txt``, the small corpus shipped in the package (``--data tales``), from a fixed seed.

The corpus is ours: short village tales assembled from the word lists and sentence patterns below
(no outside text), released with the package under its licence. The default corpus is the Python
standard library's sources; this one is for a quick check that needs no files at all: it is regular
enough for a tiny byte-level model to learn its spelling and patterns in a minute or two, and varied
enough that the validation split (its last tales) is not memorised. Run
``python fastxlstm/corpus/make_corpus.py`` to rebuild it; the output is byte-identical for a given
Python version's ``random`` module.
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Ada", "Bram", "Cora", "Dorian", "Elin", "Fenn", "Greta", "Hugo", "Ilse", "Jonah", "Kira", "Lorne",
         "Mira", "Nils", "Oona", "Pell", "Quinn", "Rosa", "Silas", "Tamsin", "Ulric", "Vera", "Wren", "Yara"]
ROLES = ["miller", "weaver", "shepherd", "smith", "baker", "ferryman", "potter", "carpenter", "fisher",
         "beekeeper", "lamplighter", "clockmaker", "gardener", "tailor", "cartographer", "mason"]
PLACES = ["the mill by the river", "the old stone bridge", "the market square", "the orchard on the hill",
          "the lighthouse", "the edge of the pine forest", "the harbour", "the high meadow", "the chapel yard",
          "the salt marsh", "the quarry", "the north road", "the well at the crossroads", "the winter barn"]
TOWNS = ["Ashford", "Brindle", "Coldwater", "Dunmere", "Elmstead", "Fallowby", "Greywick", "Hollin", "Ivybridge",
         "Juniper Vale", "Kestrel Point", "Larkspur"]
THINGS = ["a brass key", "a lantern", "a wooden flute", "a map drawn on linen", "a jar of honey", "a silver coin",
          "a bundle of letters", "a compass", "a loaf of rye bread", "a blue scarf", "a broken clock", "a seed pouch",
          "a small boat", "a ledger", "a bell", "a pair of boots"]
TIMES = ["At dawn", "Before the rain", "Late in the evening", "On the first day of spring", "At midsummer",
         "When the frost came", "One grey morning", "After the harvest", "On market day", "Near midnight"]
WEATHER = ["the wind turned cold", "a soft rain began", "the fog rolled in from the sea", "the sun broke through",
           "snow fell without a sound", "the sky was clear and still", "thunder rolled over the hills"]
FEELINGS = ["worried", "curious", "tired", "hopeful", "stubborn", "quiet", "cheerful", "restless", "patient"]
VERBS_GO = ["walked", "hurried", "wandered", "rode", "climbed", "rowed", "ran"]
PROBLEMS = ["the bridge had washed away", "the well had gone dry", "the clock in the tower had stopped",
            "the sheep had scattered", "the ferry rope had snapped", "the bees had left their hives",
            "the lamp oil had run out", "the grain had not been ground", "a letter had gone missing",
            "the path had vanished under the snow"]
FIXES = ["mended it with rope and patience", "asked the whole town for help", "worked through the night",
         "found an older way around", "traded the last of the honey for what was needed",
         "followed the map to the end", "listened to the advice of a child", "tried three times and then once more"]
SAYINGS = ["A slow road still reaches the sea.", "Many hands make a light load.", "Count the stones before you build.",
           "The river keeps no grudge.", "Every lamp was once unlit.", "Measure twice, cut once.",
           "A quiet question finds a loud answer.", "Bread shared is bread doubled."]
ENDINGS = ["nightfall", "the next morning", "the end of the week", "the first snow", "the new moon",
           "the time the bells rang", "supper"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]


def tale(r: random.Random, index: int) -> str:
    hero, friend = r.sample(NAMES, 2)
    role, frole = r.sample(ROLES, 2)
    town = r.choice(TOWNS)
    place, place2 = r.sample(PLACES, 2)
    thing = r.choice(THINGS)
    problem = r.choice(PROBLEMS)
    n = r.choice(NUMBERS)
    lines = [f"Tale {index}: {hero} the {role}", ""]
    lines.append(f"{r.choice(TIMES)}, {hero} the {role} {r.choice(VERBS_GO)} to {place} in {town}. "
                 f"{hero} was {r.choice(FEELINGS)}, because {problem}.")
    lines.append(f"{r.choice(WEATHER).capitalize()}. At {place2}, {hero} met {friend} the {frole}, "
                 f"who carried {thing}.")
    lines.append(f'"What troubles you?" asked {friend}.')
    lines.append(f'"{problem[0].upper() + problem[1:]}," said {hero}, "and I have {n} days to set it right."')
    for _ in range(r.randint(1, 3)):
        choice = r.random()
        if choice < 0.4:
            lines.append(f"So {hero} and {friend} {r.choice(VERBS_GO)} to {r.choice(PLACES)}, "
                         f"where {r.choice(WEATHER)}.")
        elif choice < 0.7:
            lines.append(f"{friend} gave {hero} {thing}, and {hero} turned it over {r.choice(NUMBERS)} times "
                         f"before putting it away.")
        else:
            lines.append(f'"{r.choice(SAYINGS)[:-1]}," said {friend}, and {hero} nodded.')
    lines.append(f"In the end {hero} {r.choice(FIXES)}, and by {r.choice(ENDINGS)} the work was done.")
    lines.append(f"The people of {town} still say: {r.choice(SAYINGS)}")
    return "\n".join(lines) + "\n"


def make(n_tales: int = 420, seed: int = 6) -> str:
    r = random.Random(seed)
    return "\n".join(tale(r, i + 1) for i in range(n_tales))


if __name__ == "__main__":
    out = Path(__file__).with_name("tales.txt")
    out.write_text(make(), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
