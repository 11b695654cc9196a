"""Random labels for O3: plausible short answers (places, years, jobs, genres, prizes, instruments, book titles) the
engine teaches in place of a forgotten answer when the target model has no pool of its own. Any pool works as long as
it is not the request's own answers; this one is generic vocabulary, not any user's data."""

CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Krakow", "Montreal", "Seville", "Tbilisi",
          "Porto", "Valparaiso", "Accra", "Bergen", "Cusco", "Gdansk", "Kyoto", "Marrakesh", "Odessa", "Tallinn",
          "Bologna", "Cordoba", "Zanzibar", "Reykjavik"]
PROFESSIONS = ["architect", "astronomer", "beekeeper", "cartographer", "chemist", "diplomat", "engineer",
               "geologist", "glassblower", "jeweler", "librarian", "lighthouse keeper", "marine biologist",
               "nurse", "pharmacist", "photographer", "pilot", "potter", "surgeon", "translator"]
GENRES = ["science fiction", "historical fiction", "poetry", "crime fiction", "fantasy", "travel writing",
          "children's books", "horror", "biography", "romance", "satire", "nature essays"]
AWARDS = ["the Aurelian Prize", "the Silver Quill Award", "the Meridian Medal", "the Halvorsen Prize",
          "the Blue Lantern Award", "the Corvina Medal", "the Ostrander Prize", "the Golden Compass Award",
          "the Vellum Cup", "the Tesselate Prize", "the Ember Award", "the Northwind Medal"]
INSTRUMENTS = ["cello", "violin", "piano", "flute", "clarinet", "harp", "trumpet", "accordion", "banjo",
               "oboe", "mandolin", "saxophone"]
ADJECTIVES = ["Silent", "Copper", "Hidden", "Broken", "Golden", "Distant", "Crimson", "Hollow", "Winter", "Paper",
              "Salt", "Iron", "Lantern", "Velvet", "Ashen", "Glass", "Northern", "Wandering", "Quiet", "Burning"]
NOUNS = ["Harbor", "Orchard", "Compass", "River", "Garden", "Bridge", "Mirror", "Lighthouse", "Meadow", "Clock",
         "Archive", "Island", "Forest", "Staircase", "Kingdom", "Letter", "Mountain", "Station", "Tide", "Feather"]
YEARS = [str(y) for y in range(1931, 1995)]
TITLES = [f"The {a} {n}" for a in ADJECTIVES for n in NOUNS]

DEFAULT_POOL = (*CITIES, *YEARS, *PROFESSIONS, *GENRES, *AWARDS, *INSTRUMENTS, *TITLES[:50])
