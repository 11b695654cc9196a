"""Facts SmolLM2-135M-Instruct really knows, asked the way users ask: the data of bench/serving.py.

A family is one kind of fact with question templates ("What is the capital of {x}?") and the entities it is
asked about, each with the answers that grade a reply correct (whole words, case-insensitive; "a|b" = either).
A forget request names one entity of a family and sends the `sent` templates filled in with it; the `held_out`
templates are paraphrases it does not send; the family's other entities, asked with every template, are the
look-alikes (the same question about somebody else: the router's hard case).

Two disjoint sets, by family: TUNING chose the defaults (gate, router, O3 settings); EVALUATION is what
bench/serving.py reports by default. They share no fact and no question template (an entity such as Japan may
appear in both, with another relation: its capital is evaluated, its continent was tuned on). Every question here was
asked to the base model greedily in its chat template (`python bench/serving.py --check-facts` prints what it
answers); the entities kept are those it answers for most templates.

GENERAL: everyday questions the base model answers correctly, outside every family above: they must stay
unrouted and unchanged whatever is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    sent: tuple[str, ...]  # templates a forget request sends
    held_out: tuple[str, ...]  # paraphrases it does not send
    entities: dict[str, str]  # entity -> accepted answers ("a|b")
    forget: tuple[str, ...] = field(default=())  # entities whose fact a request forgets; the rest are look-alikes

    def ask(self, template: str, entity: str) -> str:
        q = template.format(x=entity)
        return q[0].upper() + q[1:]


EVALUATION = (
    Family("capital",
           ("What is the capital of {x}?", "What is the capital city of {x}?", "Which city is the capital of {x}?",
            "Name the capital of {x}.", "Tell me the capital of {x}.", "What city serves as the capital of {x}?"),
           ("Which city is {x}'s capital?", "What is the name of the capital city of {x}?",
            "In which city is the government of {x} based?", "I'm curious, what's the capital of {x}?"),
           {"Japan": "Tokyo", "Germany": "Berlin", "Russia": "Moscow", "Egypt": "Cairo", "China": "Beijing",
            "Greece": "Athens", "Canada": "Ottawa", "Australia": "Canberra", "Norway": "Oslo", "Thailand": "Bangkok",
            "South Korea": "Seoul"},
           forget=("Japan",)),
    Family("currency",
           ("What is the currency of {x}?", "What currency is used in {x}?", "Which currency does {x} use?",
            "What is the official currency of {x}?", "Name the currency of {x}.", "What money is used in {x}?"),
           ("What do people in {x} pay with?", "Tell me the name of {x}'s currency.",
            "If I travel to {x}, which currency do I need?", "What is the national currency of {x}?"),
           {"Switzerland": "franc", "the United States": "dollar", "India": "rupee", "Russia": "ruble|rouble",
            "South Korea": "won", "Japan": "yen"},
           forget=("Switzerland",)),
    Family("symbol",
           ("What is the chemical symbol for {x}?", "What is the symbol of {x} on the periodic table?",
            "Which chemical symbol stands for {x}?", "What is the element symbol for {x}?",
            "Give the chemical symbol of {x}.", "How is {x} written as a chemical symbol?"),
           ("What letters represent {x} in chemistry?", "Tell me the chemical symbol of the element {x}.",
            "On the periodic table, {x} has which symbol?", "What's {x}'s symbol in chemistry?"),
           {"potassium": "K", "gold": "Au", "silver": "Ag", "iron": "Fe", "lead": "Pb", "calcium": "Ca",
            "sodium": "Na", "copper": "Cu"},
           forget=("potassium",)),
    Family("language",
           ("What language is spoken in {x}?", "What is the official language of {x}?",
            "Which language do people speak in {x}?", "What language do they speak in {x}?",
            "What is the main language of {x}?", "Name the language spoken in {x}."),
           ("In {x}, what language do most people speak?", "Which language is the national language of {x}?",
            "If I visit {x}, which language will I hear?", "What language is used in {x}?"),
           {"Germany": "German", "China": "Chinese|Mandarin", "Russia": "Russian", "Japan": "Japanese",
            "Italy": "Italian", "France": "French", "Egypt": "Arabic", "Mexico": "Spanish"},
           forget=("Germany",)),
    Family("landmark",
           ("In which city is {x}?", "Where is {x} located?", "Which city is home to {x}?",
            "In what city can you find {x}?", "Name the city where {x} stands.", "Where can I see {x}?"),
           ("{x} is in which city?", "Which city has {x}?", "If I want to visit {x}, which city should I go to?",
            "What city is {x} in?"),
           {"the Sydney Opera House": "Sydney", "the Eiffel Tower": "Paris", "the Colosseum": "Rome",
            "the Kremlin": "Moscow", "the Brandenburg Gate": "Berlin", "the Golden Gate Bridge": "San Francisco",
            "the Statue of Liberty": "New York"},
           forget=("the Sydney Opera House",)),
)

TUNING = (
    Family("author",
           ("Who wrote {x}?", "Who is the author of {x}?", "Who wrote the book {x}?", "Which author wrote {x}?",
            "Name the writer of {x}.", "Who is {x} by?"),
           ("{x} was written by whom?", "Who penned {x}?", "Tell me who the author of {x} is.",
            "Which writer is known for writing {x}?"),
           {"The Great Gatsby": "Fitzgerald", "The Hobbit": "Tolkien", "Harry Potter": "Rowling",
            "Hamlet": "Shakespeare", "Romeo and Juliet": "Shakespeare", "The Odyssey": "Homer",
            "Jane Eyre": "Bronte|Brontë", "Pride and Prejudice": "Austen"},
           forget=("The Great Gatsby", "The Hobbit")),
    Family("founder",
           ("Who founded {x}?", "Who is the founder of {x}?", "Who started {x}?", "Which person founded {x}?",
            "Name the founder of {x}.", "Who created the company {x}?"),
           ("{x} was founded by whom?", "Who established {x}?", "Tell me who founded {x}.",
            "Which entrepreneur founded {x}?"),
           {"Tesla": "Musk|Eberhard|Tarpenning", "SpaceX": "Musk", "Apple": "Jobs|Wozniak", "Microsoft": "Gates|Allen"},
           forget=("Tesla",)),
    Family("discovery",
           ("Who invented {x}?", "Who is credited with inventing {x}?", "Which inventor created {x}?",
            "Who was the inventor of {x}?", "Name the person who invented {x}.", "Who came up with {x}?"),
           ("{x} was invented by whom?", "Who is known for inventing {x}?", "Tell me who invented {x}.",
            "Which person gave us {x}?"),
           {"the telephone": "Bell", "the theory of relativity": "Einstein"},
           forget=("the telephone",)),
    Family("continent",
           ("On which continent is {x}?", "Which continent is {x} in?", "{x} is located on which continent?",
            "What continent does {x} belong to?", "Name the continent where {x} is.", "Tell me the continent of {x}."),
           ("In what part of the world, by continent, is {x}?", "If I travel to {x}, which continent am I on?",
            "{x} is a country on what continent?", "Which of the continents contains {x}?"),
           {"Kenya": "Africa", "Egypt": "Africa", "Japan": "Asia", "India": "Asia", "Brazil": "South America",
            "Germany": "Europe", "Argentina": "South America"},
           forget=("Kenya",)),
    Family("country_of_city",
           ("In which country is {x}?", "Which country is {x} in?", "{x} is a city in which country?",
            "What country is the city of {x} located in?", "Name the country where {x} is.",
            "Where is {x}, which country?"),
           ("The city of {x} belongs to which country?", "If I fly to {x}, what country am I visiting?",
            "Tell me which nation {x} is part of.", "{x} lies in what country?"),
           {"Toronto": "Canada", "Tokyo": "Japan", "Beijing": "China", "Cairo": "Egypt", "Sydney": "Australia",
            "Madrid": "Spain"},
           forget=("Toronto",)),
)

# Look-alike stress families for the router's defaults, on the tuning side: short entities, so the question
# template is most of the sentence and MiniLM puts a question about another entity close to the request's text in
# the same template (the TUNING families above have no such pair: their look-alikes stay below cosine 0.72). Only
# routing is measured on them (bench/lookalikes.py): the base model need not know the answers, and
# bench/serving.py does not ask them.
ROUTING_TUNING = (
    Family("legs",
           ("How many legs does a {x} have?", "What is the number of legs on a {x}?", "A {x} has how many legs?",
            "Count the legs of a {x}.", "How many legs has a {x} got?", "Tell me how many legs a {x} has."),
           ("On how many legs does a {x} walk?", "What's the leg count of a {x}?", "A {x} stands on how many legs?",
            "How many legs would you count on a {x}?"),
           {"spider": "eight|8", "dog": "four|4", "ant": "six|6", "chicken": "two|2", "horse": "four|4",
            "beetle": "six|6", "cat": "four|4"},
           forget=("spider",)),
    Family("baby",
           ("What is a baby {x} called?", "What do you call a young {x}?", "What is the name for a baby {x}?",
            "A baby {x} is called what?", "Name the young of a {x}.", "What word means a baby {x}?"),
           ("How do we refer to an infant {x}?", "What is the term for a newborn {x}?",
            "Tell me what a {x}'s baby is called.", "When a {x} has young, what are they called?"),
           {"cat": "kitten", "dog": "puppy", "cow": "calf", "sheep": "lamb", "horse": "foal", "duck": "duckling"},
           forget=("cat",)),
)

GENERAL: tuple[tuple[str, str], ...] = (
    ("How many days are there in a week?", "seven|7"),
    ("What is 2 plus 2?", "four|4"),
    ("How many sides does a triangle have?", "three|3"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("What is the largest mammal?", "blue whale"),
    ("What is the hottest planet in our solar system?", "Venus"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What gas do humans need to breathe?", "oxygen"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("Who was the first man on the moon?", "Armstrong"),
    ("Who discovered penicillin?", "Fleming"),
    ("What is the longest river in Africa?", "Nile"),
    ("What is the largest desert in the world?", "Sahara|Antarctic"),
    ("What is the centre of an atom called?", "nucleus"),
    ("What is half of 100?", "50|fifty"),
    ("What force keeps us on the ground?", "gravity"),
    ("What is the smallest prime number?", "2|two"),
    ("Which season comes after summer?", "autumn|fall"),
    ("What is the name of our galaxy?", "Milky Way"),
    ("What is the star at the centre of our solar system?", "Sun"),
    ("What is the study of living things called?", "biology"),
    ("Who painted the Mona Lisa?", "Leonardo|da Vinci"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo"),
    ("Who formulated the laws of motion and universal gravitation?", "Newton"),
    ("Who proposed the theory of evolution by natural selection?", "Darwin"),
    ("What is the largest bone in the human body?", "femur"),
    ("What is the longest river in South America?", "Amazon"),
    ("What does a thermometer measure?", "temperature"),
    ("What does a barometer measure?", "pressure"),
    ("What instrument is used to see tiny cells?", "microscope"),
    ("What is the powerhouse of the cell?", "mitochondria|mitochondrion"),
    ("What is the largest land animal?", "elephant"),
    ("What do giant pandas mainly eat?", "bamboo"),
    ("What is the opposite of big?", "small|little"),
    ("What is the opposite of day?", "night"),
    ("Which organs do humans use to breathe?", "lungs"),
    ("Which sense organ do we use to see?", "eye|eyes"),
    ("How many degrees are in a right angle?", "90|ninety"),
    ("What is the name of the largest rainforest?", "Amazon"),
    ("What do we call a group of wolves?", "pack"),
    ("What is the main ingredient of bread?", "flour|wheat"),
    ("What is the name for a scientist who studies rocks?", "geologist"),
)
