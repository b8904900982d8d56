"""The demo's text: short stories generated from a small grammar written for this project.

``python -m qat.run`` with no arguments pretrains its tiny teacher on this text, so the demo needs
no download and no outside data. The grammar is small on purpose: a model of a few hundred
thousand parameters learns it in a minute, and quantization errors show up clearly in its
perplexity. The same seed always gives the same text.
"""

from __future__ import annotations

import random

NAMES = ["Mila", "Tom", "Ada", "Ben", "Lena", "Sam", "Ivy", "Max", "Nora", "Leo", "Ruby", "Finn"]
ANIMALS = ["cat", "dog", "fox", "owl", "frog", "duck", "bear", "mouse", "rabbit", "turtle"]
PLACES = ["a small village", "the green valley", "a house by the river", "the old forest",
          "a farm near the hills", "a town by the sea"]
OBJECTS = ["ball", "kite", "box", "hat", "lamp", "boat", "drum", "key", "map", "cup"]
COLORS = ["red", "blue", "green", "yellow", "little", "shiny", "old", "soft"]
FEELINGS = ["happy", "sad", "tired", "curious", "brave", "proud", "scared", "calm"]
FOODS = ["apples", "bread", "soup", "cake", "berries", "honey", "carrots"]
WEATHER = ["the sun was warm", "it was raining", "the wind was cold", "the sky was clear", "snow was falling"]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    animal, pet = rng.choice(ANIMALS), rng.choice(ANIMALS)
    obj, color, place = rng.choice(OBJECTS), rng.choice(COLORS), rng.choice(PLACES)
    feeling, later = rng.sample(FEELINGS, 2)
    food, weather = rng.choice(FOODS), rng.choice(WEATHER)
    opening = rng.choice([
        f"Once upon a time, there was {_a(animal)} named {hero}. {hero} lived in {place}.",
        f"{hero} was {_a(feeling)} {animal} who lived in {place}.",
        f"In {place}, there lived {_a(animal)} called {hero}.",
    ])
    middle = rng.choice([
        f"One day, {weather}, and {hero} found {_a(color)} {obj} under a tree.",
        f"One morning, {hero} saw {_a(color)} {obj} near the door. {hero} felt {feeling}.",
        f"When {weather}, {hero} went out to look for {food}, and found {_a(color)} {obj}.",
    ])
    meeting = rng.choice([
        f"{hero} showed the {obj} to {friend} the {pet}. \"Look at my {obj}!\" said {hero}.",
        f"Then {friend} the {pet} came by and asked, \"Can I play with your {obj}?\"",
        f"{friend}, {_a(pet)} from {place}, wanted the {obj} too.",
    ])
    turn = rng.choice([
        f"They played with the {obj} all day, until {hero} was {later}.",
        f"At first {hero} did not want to share, but then {hero} gave the {obj} to {friend}.",
        f"The {obj} fell into the water, and {friend} helped {hero} get it back.",
    ])
    ending = rng.choice([
        f"In the evening they ate {food} together, and {hero} felt {later}.",
        f"{hero} learned that sharing makes friends {later}. The end.",
        f"From that day on, {hero} and {friend} were best friends.",
    ])
    return " ".join([opening, middle, meeting, turn, ending])


def demo_corpus(n_stories: int = 2000, seed: int = 0) -> str:
    """``n_stories`` stories separated by blank lines (about 400 characters each)."""
    rng = random.Random(seed)
    return "\n\n".join(_story(rng) for _ in range(n_stories)) + "\n"
