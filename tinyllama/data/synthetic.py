"""The built-in synthetic story corpus: short children's stories, offline and deterministic.

Every story is built from one plot template filled with a hero (a child or an animal with a
name and pronouns), a friend, a place, a loved object, feelings, dialogue and an ending. The
same (seed, index) always gives the same story, independently of every other index, so the
corpus can be generated in any order or in parallel. All of the text is written for this
project. A tiny model trained on it for a few minutes learns the visible regularities: names
that recur, pronouns that agree, quotes that close, stories that end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

GIRLS = [
    "Mia",
    "Lucy",
    "Ella",
    "Rosa",
    "Nora",
    "Zoe",
    "Ivy",
    "Ruby",
    "Hana",
    "Leah",
    "Maya",
    "Amy",
    "Sofia",
    "Anna",
    "Clara",
    "Daisy",
    "Emma",
    "Grace",
    "Kira",
    "Luna",
    "Nina",
    "Olive",
    "Pia",
    "Sara",
    "Tess",
    "Vera",
    "Wendy",
    "Aisha",
    "Bea",
    "Fern",
    "Juno",
    "Lola",
    "Mina",
    "Priya",
    "Alice",
    "Bella",
    "Chloe",
    "Dora",
    "Edith",
    "Freya",
    "Gemma",
    "Hazel",
    "Iris",
    "Jade",
    "Katie",
    "Lena",
    "Molly",
    "Nadia",
    "Opal",
    "Penny",
    "Queenie",
    "Rita",
    "Stella",
    "Tara",
    "Uma",
    "Violet",
    "Willa",
    "Yara",
    "Zara",
    "Amara",
    "Bonnie",
    "Celia",
    "Delia",
    "Elsa",
    "Flora",
    "Greta",
    "Holly",
    "Imani",
    "Jenny",
    "Keiko",
    "Lily",
    "Mabel",
    "Nell",
    "Olga",
    "Poppy",
    "Rania",
    "Susie",
    "Tilly",
    "Ursula",
    "Wren",
    "Yoko",
    "Ada",
    "Beth",
    "Cora",
    "Dina",
    "Esme",
    "Fatima",
    "Gwen",
    "Heidi",
    "Ines",
    "Josie",
    "Kate",
    "Linda",
    "Marta",
    "Noor",
    "Pearl",
    "Rosie",
    "Sunny",
    "Tina",
    "Maisie",
]
BOYS = [
    "Sam",
    "Leo",
    "Ben",
    "Max",
    "Tom",
    "Finn",
    "Omar",
    "Jack",
    "Eli",
    "Noah",
    "Kai",
    "Hugo",
    "Adam",
    "Theo",
    "Ravi",
    "Otto",
    "Milo",
    "Jonah",
    "Liam",
    "Paul",
    "Ezra",
    "Felix",
    "Hiro",
    "Ivan",
    "Jude",
    "Luis",
    "Nico",
    "Oscar",
    "Ryan",
    "Toby",
    "Victor",
    "Yusuf",
    "Zane",
    "Arlo",
    "Alfie",
    "Bruno",
    "Caleb",
    "Dylan",
    "Emil",
    "Frank",
    "George",
    "Harry",
    "Isaac",
    "Jasper",
    "Kofi",
    "Lucas",
    "Marco",
    "Nate",
    "Owen",
    "Peter",
    "Quinn",
    "Rufus",
    "Simon",
    "Tariq",
    "Umar",
    "Vinny",
    "Wally",
    "Xavier",
    "Yuri",
    "Zack",
    "Aiden",
    "Barney",
    "Colin",
    "Dmitri",
    "Edgar",
    "Fred",
    "Gus",
    "Henry",
    "Igor",
    "Jamal",
    "Kenji",
    "Louie",
    "Matteo",
    "Ned",
    "Ollie",
    "Pablo",
    "Rex",
    "Stan",
    "Teddy",
    "Ulf",
    "Walter",
    "Amir",
    "Basil",
    "Cody",
    "Dev",
    "Ethan",
    "Filip",
    "Gabe",
    "Hamid",
    "Ike",
    "Joel",
    "Karl",
    "Lenny",
    "Moses",
    "Nils",
    "Percy",
    "Rocco",
    "Seth",
    "Timo",
    "Wilbur",
]
ANIMALS = [
    "dog",
    "cat",
    "rabbit",
    "bear",
    "fox",
    "duck",
    "mouse",
    "owl",
    "frog",
    "pig",
    "lamb",
    "turtle",
    "squirrel",
    "horse",
    "hen",
    "goat",
    "puppy",
    "kitten",
    "bunny",
    "deer",
    "hedgehog",
    "bird",
    "elephant",
    "lion",
    "monkey",
    "panda",
    "penguin",
    "seal",
    "tiger",
    "whale",
    "giraffe",
    "zebra",
    "camel",
    "beaver",
    "badger",
    "otter",
    "raccoon",
    "koala",
    "kangaroo",
    "parrot",
    "goose",
    "swan",
    "crab",
    "snail",
    "ladybug",
    "butterfly",
    "bee",
    "cow",
    "sheep",
    "donkey",
    "chick",
    "wolf",
    "moose",
    "hippo",
    "crocodile",
    "dolphin",
    "octopus",
    "robin",
    "sparrow",
]
TRAITS = [
    "little",
    "brave",
    "shy",
    "curious",
    "kind",
    "happy",
    "small",
    "clever",
    "gentle",
    "silly",
    "cheerful",
    "quiet",
    "friendly",
    "busy",
    "sleepy",
    "playful",
    "bold",
    "careful",
    "proud",
    "funny",
    "sweet",
    "tiny",
    "young",
    "lively",
    "fluffy",
    "grumpy",
    "helpful",
    "honest",
    "polite",
    "patient",
    "noisy",
    "speedy",
    "wise",
    "generous",
    "hungry",
    "jolly",
    "merry",
    "eager",
    "daring",
    "thoughtful",
    "dreamy",
    "fearless",
    "loving",
    "nimble",
    "spirited",
    "stubborn",
    "witty",
]
PLACES = [
    "a small house near the woods",
    "a big farm with a red barn",
    "a quiet town by the sea",
    "a tall tree in the park",
    "a cozy den under a hill",
    "a little village in the hills",
    "a busy city full of cars",
    "a warm hut by the river",
    "a blue house on a long street",
    "a garden full of flowers",
    "a cabin in the snowy mountains",
    "a pond with tall grass",
    "a boat on a calm lake",
    "an old mill by the stream",
    "a yellow house next to a school",
    "a lighthouse on a rocky island",
    "a tent at the edge of a desert",
    "a nest high in an oak",
    "an apartment above a bakery",
    "a castle made of gray stone",
    "a burrow under an apple tree",
    "a treehouse in a jungle",
    "a hollow log in the marsh",
    "a cottage with a thatched roof",
    "a houseboat on a winding canal",
    "a farmhouse among golden wheat fields",
]
OUTINGS = [
    "the park",
    "the beach",
    "the forest",
    "the market",
    "the lake",
    "the zoo",
    "the hill",
    "the library",
    "the garden",
    "the playground",
    "the river",
    "the meadow",
    "the farm",
    "the bakery",
    "the field",
    "the shop",
    "the cave",
    "the pond",
    "the museum",
    "the harbor",
    "the orchard",
    "the swimming pool",
    "the circus",
    "the fair",
    "the station",
    "the island",
    "the castle",
    "the valley",
    "the waterfall",
    "the village square",
    "the toy store",
    "the aquarium",
    "the train yard",
    "the vegetable patch",
    "the old bridge",
    "the sand dunes",
]
COLORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "pink",
    "purple",
    "orange",
    "white",
    "shiny",
    "soft",
    "striped",
    "golden",
    "big",
    "little",
    "old",
    "new",
    "spotted",
    "bright",
    "silver",
    "brown",
    "black",
    "gray",
    "tiny",
    "huge",
    "sparkly",
    "fuzzy",
    "wooden",
    "plastic",
    "woolly",
    "dotted",
    "glittery",
    "crimson",
    "turquoise",
    "lavender",
    "velvet",
    "checkered",
    "rusty",
    "polished",
]
THINGS = [
    "ball",
    "kite",
    "hat",
    "book",
    "toy car",
    "doll",
    "drum",
    "boat",
    "balloon",
    "teddy bear",
    "scarf",
    "bike",
    "wagon",
    "shell",
    "box of crayons",
    "blanket",
    "cup",
    "robot",
    "puzzle",
    "whistle",
    "umbrella",
    "jar of buttons",
    "train",
    "sled",
    "bucket",
    "rock",
    "flute",
    "map",
    "lantern",
    "compass",
    "marble",
    "yo-yo",
    "feather",
    "necklace",
    "basket",
    "shovel",
    "violin",
    "telescope",
    "notebook",
    "paintbrush",
    "backpack",
    "helmet",
    "pillow",
    "mitten",
    "sticker",
    "bracelet",
    "castle of blocks",
    "spinning top",
    "skateboard",
    "trumpet",
    "flag",
    "ribbon",
    "glove",
    "key",
    "clock",
    "pebble",
    "seashell",
    "snow globe",
    "music box",
    "crown",
    "wand",
]
FOODS = [
    "apples",
    "cookies",
    "bread",
    "soup",
    "cake",
    "carrots",
    "berries",
    "pancakes",
    "honey",
    "cheese",
    "plums",
    "muffins",
    "corn",
    "pie",
    "grapes",
    "noodles",
    "peaches",
    "rice",
    "strawberries",
    "bananas",
    "pears",
    "oranges",
    "cherries",
    "waffles",
    "dumplings",
    "pumpkins",
    "potatoes",
    "tomatoes",
    "lemons",
    "melons",
    "walnuts",
    "cupcakes",
    "porridge",
    "jam",
    "butter",
    "yogurt",
    "raisins",
    "biscuits",
    "sandwiches",
    "pretzels",
    "blueberries",
    "mangoes",
    "figs",
]
WEATHER = [
    "The sun was warm and bright.",
    "The sky was gray and full of clouds.",
    "A cool wind blew through the trees.",
    "Snow covered the ground like a white blanket.",
    "It was a rainy morning.",
    "The birds were singing in the trees.",
    "Leaves of red and gold fell from the trees.",
    "The air smelled of fresh grass.",
]
GOOD = ["happy", "glad", "proud", "excited", "thankful", "calm", "cheerful", "joyful"]
BAD = ["sad", "scared", "worried", "upset", "lonely", "angry", "nervous", "grumpy"]
SAID = ["said", "said", "said", "whispered", "replied", "explained", "answered"]
ASKED = ["asked", "asked", "wondered", "whispered"]
EXCLAIMED = ["said", "shouted", "cried", "called"]
OPENINGS = [
    "Once upon a time, there was a {trait} {kind} named {name}.",
    "Once upon a time, in {place}, there lived a {trait} {kind} named {name}.",
    "One day, a {trait} {kind} named {name} woke up early.",
    "There once was a {trait} {kind} called {name}.",
    "Long ago, a {trait} {kind} named {name} lived in {place}.",
    "{name} was a {trait} {kind} who lived in {place}.",
]


@dataclass
class Character:
    name: str
    kind: str  # "girl", "boy" or an animal
    he: str
    him: str
    his: str


def _character(rng: random.Random, avoid: str = "") -> Character:
    girl = rng.random() < 0.5
    name = rng.choice(GIRLS if girl else BOYS)
    while name == avoid:
        name = rng.choice(GIRLS if girl else BOYS)
    kind = rng.choice(ANIMALS) if rng.random() < 0.4 else ("girl" if girl else "boy")
    return Character(name, kind, *(("she", "her", "her") if girl else ("he", "him", "his")))


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _say(rng: random.Random, who: Character, words: str) -> str:
    """One line of dialogue; the verb fits the punctuation, the tag goes before or after."""
    verbs = ASKED if words.endswith("?") else EXCLAIMED if words.endswith("!") else SAID
    verb = rng.choice(verbs)
    if rng.random() < 0.5:
        # A statement quoted before its tag ends with a comma: "I can," said Mia.
        quote = words[:-1] + "," if words.endswith(".") else words
        return f'"{quote}" {verb} {who.name}.'
    return f'{who.name} {verb}, "{words}"'


# Each plot takes the story's slots and returns its middle sentences. Slots: h (hero),
# f (friend), thing, color, food, out (an outing), good, bad (feelings).
Plot = Callable[[random.Random, Dict], List[str]]


def _lost(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"One day, {h.name} went to {s['out']} with {h.his} {s['color']} {s['thing']}.",
        f"{_cap(h.he)} played until the sun was low. When {h.he} looked around, the {s['thing']} was gone!",
        f"{h.name} felt very {s['bad']}.",
        _say(rng, h, f"Where is my {s['thing']}?"),
        f"A {f.kind} named {f.name} saw {h.him} and came over.",
        _say(rng, f, "Do not worry. I will help you look."),
        "They looked under the bushes and behind the rocks.",
        f"At last, {f.name} found the {s['thing']} under a big leaf.",
        _say(rng, h, f"Thank you, {f.name}! You are a good friend."),
        f"{h.name} felt {s['good']} again, and they played together until dinner.",
    ]


def _share(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name} had a {s['color']} {s['thing']}. {_cap(h.he)} loved it more than anything.",
        f"One day, {f.name} the {f.kind} came to play.",
        _say(rng, f, f"Can I play with your {s['thing']}?"),
        f'{h.name} did not want to share. {_cap(h.he)} held the {s["thing"]} close and said, "No, it is mine!"',
        f"{f.name} looked {s['bad']} and walked away.",
        f"Soon {h.name} felt {s['bad']} too. Playing alone was not fun.",
        f"{_cap(h.he)} ran after {f.name}.",
        _say(rng, h, f"I am sorry. Let us play with my {s['thing']} together."),
        f"{f.name} smiled. They took turns, and the game was twice as much fun.",
    ]


def _bake(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name} wanted to make something special for {h.his} mom.",
        _say(rng, h, f"I will bake {s['food']} with {s['food2']}!"),
        f"{_cap(h.he)} asked {f.name} the {f.kind} to help.",
        f"They mixed flour, milk and sugar in a big bowl. {f.name} spilled some flour on the floor, and they both laughed.",
        f"Then they put the {s['food']} in the oven and waited.",
        "Soon the kitchen smelled sweet and warm.",
        f"When mom came home, she saw the {s['food']} on the table.",
        _say(rng, Character("Mom", "mom", "she", "her", "her"), "What a nice surprise! Thank you!"),
        f"{h.name} felt {s['good']}. Making something for someone you love is the best gift.",
    ]


def _storm(rng, s):
    h, f = s["h"], s["f"]
    return [
        "One night, a big storm came. The wind howled and the rain hit the windows.",
        f"{h.name} was {s['bad']}. {_cap(h.he)} hid under {h.his} blanket.",
        _say(rng, h, "I do not like the loud noise."),
        f"{h.his.capitalize()} friend {f.name} the {f.kind} came and sat close.",
        _say(rng, f, "The storm is loud, but we are safe inside. Let us tell stories until it stops."),
        f"{f.name} told a story about a {s['color']} {s['thing']} that could fly.",
        f"{h.name} listened and forgot about the thunder.",
        "In the morning, the sun came out and the sky was clean and blue.",
        f"{h.name} was not {s['bad']} anymore. {_cap(h.he)} felt {s['good']} and brave.",
    ]


def _race(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name} and {f.name} liked to run. One day they went to {s['out']}.",
        _say(rng, f, "Let us have a race to the big tree!"),
        '"Ready, set, go!" They ran as fast as they could.',
        f"Halfway there, {f.name} fell down and hurt {f.his} knee.",
        f"{h.name} could win the race, but {h.he} stopped and went back.",
        _say(rng, h, "Are you okay? Let me help you up."),
        "They walked to the big tree together, side by side.",
        _say(rng, f, "You are the best friend in the world."),
        f"{h.name} felt {s['good']}. Helping a friend was better than winning.",
    ]


def _seed(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name} found a tiny seed in {s['out']}.",
        _say(rng, h, "What will this seed grow into?"),
        f"{_cap(h.he)} planted it in a pot and gave it water every day.",
        f"Days went by, and nothing happened. {h.name} felt {s['bad']}.",
        _say(rng, f, "Be patient. Good things take time."),
        f"So {h.name} kept waiting and kept giving it water.",
        f"One morning, {h.he} saw a little green sprout! It grew and grew.",
        f"Soon there was a {s['color']} flower, as big as {h.his} hand.",
        f"{h.name} showed it to {f.name}. They were both very {s['good']}.",
    ]


def _noise(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"One night, {h.name} heard a strange noise. Scratch, scratch, scratch!",
        f"{_cap(h.he)} felt {s['bad']}.",
        _say(rng, h, "Who is there?"),
        f"{_cap(h.he)} took a lamp and looked behind the door.",
        f"It was {f.name}, a small {f.kind}, looking for {s['food']}.",
        _say(rng, f, "I am sorry I scared you. I was so hungry."),
        f"{h.name} laughed and gave {f.name} some {s['food']}.",
        f"From that night on, they were friends, and {f.name} came to visit every day.",
    ]


def _trip(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"Today was a special day. {h.name} and {h.his} family were going to {s['out']}.",
        f"{_cap(h.he)} packed {h.his} {s['color']} {s['thing']} and some {s['food']}.",
        f"At {s['out']}, {h.name} met {f.name} the {f.kind}.",
        _say(rng, f, "Do you want to explore with me?"),
        f"They saw a {s['color2']} butterfly, a long stick and a puddle shaped like a star.",
        f"They shared the {s['food']} and sang songs.",
        f"When it was time to go, {h.name} waved goodbye.",
        _say(rng, h, "See you next time!"),
        f"On the way home, {h.name} was tired but {s['good']}.",
    ]


def _birthday(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"It was {h.name}'s birthday, and {h.he} was {s['good']}.",
        f"But all morning, nobody said happy birthday. {h.name} began to feel {s['bad']}.",
        f"In the afternoon, {f.name} the {f.kind} asked {h.him} to come to {s['out']}.",
        f'When they got there, all of {h.his} friends jumped out and shouted, "Surprise!"',
        f"There was a cake with {s['food']} on top and a {s['color']} {s['thing']} wrapped in paper.",
        _say(rng, h, "You did not forget!"),
        _say(rng, f, "We wanted it to be a surprise."),
        f"{h.name} hugged everyone. It was the best birthday ever.",
    ]


def _lesson(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name} wanted to learn how to ride a {s['color']} bike.",
        f"{_cap(h.he)} got on and fell off. {_cap(h.he)} tried again and fell again.",
        _say(rng, h, "I can not do it!"),
        f"{h.name} felt {s['bad']} and wanted to give up.",
        f"{f.name} the {f.kind} came by.",
        _say(rng, f, "Everyone falls at first. Try one more time, and I will hold the bike."),
        f"{h.name} took a deep breath and tried again. This time {h.he} did not fall!",
        f"{_cap(h.he)} rode all the way to {s['out']} and back.",
        _say(rng, h, "I did it!"),
        f"{h.name} learned that trying again is how you get better.",
    ]


def _help(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"One day, {h.name} saw {f.name} the {f.kind} sitting alone by the road.",
        _say(rng, h, "Why are you so sad?"),
        _say(rng, f, f"I lost my way to {s['out']}, and now I can not find my home."),
        f"{h.name} wanted to help. {_cap(h.he)} knew the way very well.",
        f"They walked past the {s['color']} gate and over the little bridge.",
        f"At last, they saw {f.name}'s home. {f.his.capitalize()} mother was waiting at the door.",
        _say(rng, f, "Thank you for helping me!"),
        f"{h.name} felt {s['good']}. A small kindness can make a big difference.",
    ]


def _snow(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"When {h.name} woke up, everything outside was white. It had snowed all night!",
        _say(rng, h, f"{f.name}, come quickly! Let us build a snowman!"),
        "They rolled a huge snowball for the bottom and a smaller one for the middle.",
        f"{f.name} found two pebbles for eyes, and {h.name} gave it {h.his} {s['color']} {s['thing']}.",
        "Then their fingers got cold and their noses turned pink.",
        _say(rng, f, "My toes are freezing. Should we go inside?"),
        "Grandma made hot cocoa with marshmallows floating on top.",
        f"They sipped it slowly and watched their snowman through the frosty window, feeling {s['good']}.",
    ]


def _treasure(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name} found an old map tucked inside a dusty book.",
        _say(rng, h, f"Look, {f.name}! An X marks a treasure near {s['out']}."),
        f"They packed a shovel, a flashlight and some {s['food']}, and followed the crooked path.",
        "They climbed over fallen branches and tiptoed across slippery stones.",
        f'Near a crooked willow, {f.name} pointed at the ground. "Dig here!"',
        "They dug and dug until the shovel hit something hard: a wooden chest!",
        f"Inside there was no gold, only a {s['color']} {s['thing']} and a note that said: Friends are the real treasure.",
        _say(rng, f, "That is true, you know."),
        f"{h.name} grinned, and they carried the chest home together.",
    ]


def _music(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name} wanted to play music at the village concert, but {h.he} felt {s['bad']}.",
        _say(rng, h, "What if I make a mistake in front of everybody?"),
        f"Every afternoon {h.he} practiced with {f.name}, who clapped along and hummed the tune.",
        "On the night of the concert, lanterns glowed and neighbors filled the benches.",
        f"{h.name}'s hands trembled. {_cap(h.he)} missed one note, then kept going.",
        "When the song ended, the crowd cheered and whistled.",
        _say(rng, f, "You were wonderful! Nobody even noticed."),
        f"{h.name} bowed, feeling {s['good']}. Being brave does not mean never being scared.",
    ]


def _rescue(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"While walking near {s['out']}, {h.name} heard a tiny squeak.",
        "A baby bird had fallen out of its nest and was shivering in the grass.",
        _say(rng, h, "Poor little thing. We must help it."),
        f"{f.name} the {f.kind} fetched a soft cloth while {h.name} gently lifted the bird.",
        "Together they climbed the ladder and placed it back beside its brothers and sisters.",
        "The mother bird swooped down and chirped loudly, as if saying thank you.",
        f"{h.name} and {f.name} watched from below, {s['good']} and quiet.",
        f"Every spring after that, the birds sang outside {h.name}'s window.",
    ]


PLOTS: List[Plot] = [
    _lost,
    _share,
    _bake,
    _storm,
    _race,
    _seed,
    _noise,
    _trip,
    _birthday,
    _lesson,
    _help,
    _snow,
    _treasure,
    _music,
    _rescue,
]

ENDINGS = [
    "The end.",
    "And they lived happily ever after.",
    "From that day on, {name} was never {bad} again.",
    "{name} smiled and went to sleep with a happy heart.",
    "That night, {name} dreamed of {out}.",
    "It was a day {name} would always remember.",
    "{name} could not wait for the next adventure.",
]


def story_rng(seed: int, index: int) -> random.Random:
    """The random stream of story `index` of the corpus with this seed; every language's
    corpus draws its story from one, so each story is a pure function of (seed, index)."""
    return random.Random(seed * 1_000_003 + index)


def paragraphs(rng: random.Random, opening: List[str], middle: List[str], end: str, space: str) -> str:
    """Paragraphs as in TinyStories: the opening, the plot in two halves (split near its
    middle), the last half followed by the ending; sentences joined by `space`."""
    half = len(middle) // 2 + rng.randint(-1, 1)
    return "\n".join(
        [space.join(opening), space.join(middle[:half]), space.join(middle[half:]) + space + end]
    )


@dataclass
class StoryFacts:
    """What story `index` is made of, for questions about it. `place` is drawn for every story
    but only some openings mention it; check `place in text` before asking about it."""

    hero: Character
    friend: Character
    place: str
    thing: str
    color: str
    food: str
    plot: str  # the plot's name, e.g. "lost", "bake"
    ending: str  # the last sentence


def generate_story(seed: int, index: int) -> str:
    """Story number `index` of the corpus with this seed (a pure function of both)."""
    return generate_story_with_facts(seed, index)[0]


def generate_story_with_facts(seed: int, index: int) -> Tuple[str, StoryFacts]:
    """Story number `index` and the facts it was built from (same text as generate_story)."""
    rng = story_rng(seed, index)
    hero = _character(rng)
    friend = _character(rng, avoid=hero.name)
    food, food2 = rng.sample(FOODS, 2)
    color, color2 = rng.sample(COLORS, 2)
    slots = dict(
        h=hero,
        f=friend,
        thing=rng.choice(THINGS),
        color=color,
        color2=color2,
        food=food,
        food2=food2,
        out=rng.choice(OUTINGS),
        good=rng.choice(GOOD),
        bad=rng.choice(BAD),
    )
    fill = dict(
        name=hero.name,
        kind=hero.kind,
        trait=rng.choice(TRAITS),
        place=rng.choice(PLACES),
        out=slots["out"],
        bad=slots["bad"],
    )
    opening = [rng.choice(OPENINGS).format(**fill)]
    if rng.random() < 0.5:
        opening.append(rng.choice(WEATHER))
    if rng.random() < 0.5:
        opening.append(f"{_cap(hero.he)} loved {hero.his} {color} {slots['thing']}.")
    plot = rng.choice(PLOTS)
    middle = plot(rng, slots)
    end = rng.choice(ENDINGS).format(**fill)
    facts = StoryFacts(
        hero, friend, fill["place"], slots["thing"], color, food, plot.__name__.lstrip("_"), end
    )
    return paragraphs(rng, opening, middle, end, space=" "), facts


def iter_stories(
    num_docs: int, seed: int, start: int = 0, story: Callable[[int, int], str] = generate_story
) -> Iterator[str]:
    """Stories start, start + 1, ..., start + num_docs - 1 of the corpus with this seed;
    `story(seed, index)` writes one (another language's generate_story, e.g.)."""
    for i in range(start, start + num_docs):
        yield story(seed, i)
