"""General English lexicons the false-hit guards read: negators, antonym pairs, units, number words,
instruction words (format, length, tone, audience, language). They are written from general knowledge of
English and of what changes an answer, never collected from evaluation pairs, so they hold for questions
nobody has seen yet. Words are in their normalised form (lower case, apostrophes dropped).
"""

from __future__ import annotations

# Words that flip a statement's polarity. Contractions lose their apostrophe in normalisation.
NEGATORS = frozenset(
    """not no never none nobody nothing neither nor nowhere without cannot non
    dont doesnt didnt isnt arent wasnt werent wont cant couldnt shouldnt wouldnt hasnt havent hadnt
    mustnt neednt aint""".split()
)

# Prefixes that negate the word they are attached to (legal/illegal, install/uninstall).
NEGATING_PREFIXES = ("un", "non", "in", "im", "il", "ir", "dis", "de", "anti", "mis", "counter")

# Pairs whose members answer opposite questions. Each line is one pair; lemma forms (see guards.stem).
_ANTONYM_LINES = """
accept reject
accept decline
accept refuse
add remove
add subtract
add delete
advantage disadvantage
after before
agree disagree
all none
allow block
allow deny
allow forbid
allow prevent
allow prohibit
always never
approve reject
approve deny
arrive depart
ascend descend
ascending descending
asset liability
best worst
better worse
begin end
benefit risk
benefit drawback
benefit cost
big small
borrow lend
bottom top
buy sell
buyer seller
cheap expensive
cheapest priciest
client server
close open
closed open
cold hot
connect disconnect
cons pros
con pro
cost revenue
create delete
create drop
create destroy
credit debit
debtor creditor
decrease increase
decrypt encrypt
decode encode
compress decompress
deposit withdraw
dynamic static
earliest latest
early late
east west
easy hard
easy difficult
employee employer
empty full
enable disable
encourage discourage
end start
enter exit
entry exit
expense income
export import
external internal
fail pass
fail succeed
failure success
false true
fast slow
fastest slowest
female male
few many
fewer more
first last
freeze boil
freezing boiling
freeze melt
future past
gain loss
good bad
gross net
happy sad
hard soft
heavy light
hide show
high low
higher lower
highest lowest
hire fire
horizontal vertical
hot cold
inbound outbound
include exclude
input output
increase reduce
inside outside
join leave
landlord tenant
large small
largest smallest
least most
left right
lend borrow
less more
like dislike
load unload
local remote
lock unlock
long short
longest shortest
lose win
loss profit
love hate
lower raise
lower upper
lowercase uppercase
maximum minimum
max min
maximize minimize
merge split
minimum maximum
more less
morning evening
mutable immutable
new old
newest oldest
next previous
night day
north south
odd even
offline online
off on
old young
open shut
optional required
optional mandatory
oldest newest
over under
parent child
permit forbid
polite rude
positive negative
present absent
private public
pull push
question answer
raise cut
read write
reader writer
receive send
rise fall
safe dangerous
safe risky
same different
save delete
send receive
senior junior
short tall
smallest largest
start stop
start finish
strength weakness
strong weak
subscribe unsubscribe
summer winter
spring autumn
sync async
synchronous asynchronous
teacher student
temporary permanent
thick thin
top bottom
true false
upload download
up down
upper lower
valid invalid
vacant occupied
visible hidden
weekday weekend
wet dry
wide narrow
with without
worst best
yes no
""".strip().splitlines()

ANTONYMS: frozenset[frozenset[str]] = frozenset(frozenset(line.split()) for line in _ANTONYM_LINES)

# Unit words → canonical unit. Single letters (m, g, l, s) count as units only right after a number.
_UNIT_LINES = """
millimeter millimeters millimetre millimetres mm
centimeter centimeters centimetre centimetres cm
meter meters metre metres
kilometer kilometers kilometre kilometres km kms
inch inches
foot feet ft
yard yards yd yds
mile miles mi
acre acres
hectare hectares ha
milliliter milliliters millilitre millilitres ml
liter liters litre litres
gallon gallons gal gals
quart quarts qt qts
pint pints pt pts
cup cups
tablespoon tablespoons tbsp tbs
teaspoon teaspoons tsp
milligram milligrams mg
gram grams gr
kilogram kilograms kg kgs kilo kilos
pound pounds lb lbs
ounce ounces oz
ton tons tonne tonnes
stone stones
celsius centigrade °c
fahrenheit °f
kelvin
millisecond milliseconds ms
second seconds sec secs
minute minutes min mins
hour hours hr hrs hourly
day days daily
week weeks weekly
month months monthly
year years yr yrs annual annually yearly
decade decades
century centuries
byte bytes
kilobyte kilobytes kb
megabyte megabytes mb
gigabyte gigabytes gb
terabyte terabytes tb
bit bits
mph
kph
dollar dollars usd $
euro euros eur €
yen jpy ¥
sterling gbp £
percent percentage %
watt watts w
kilowatt kilowatts kw
calorie calories kcal
""".strip().splitlines()

UNITS: dict[str, str] = {word: line.split()[0] for line in _UNIT_LINES for word in line.split()}
# Abbreviations that are also ordinary words ("in", "min", "gal") count only right after a number.
NUMBER_BOUND_UNITS = {"m": "meter", "g": "gram", "l": "liter", "s": "second", "h": "hour", "in": "inch"}
AMBIGUOUS_UNIT_WORDS = frozenset({"min", "sec", "mi", "gal", "pt", "ha", "w", "gr", "stone", "stones", "ms"})
UNIT_MODIFIERS = {
    "square": "square",
    "sq": "square",
    "cubic": "cubic",
    "cu": "cubic",
    "fluid": "fluid",
    "fl": "fluid",
}

NUMBER_WORDS = {
    "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "dozen": 12, "half": 0.5, "quarter": 0.25,
    "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8, "ninth": 9,
    "tenth": 10, "twice": 2, "double": 2, "triple": 3, "thrice": 3,
}  # fmt: skip
# "one", "first", "single", "a": the quantity one is so often said with an article or a pronoun
# ("a square meter", "get a new one") that it is not compared at all.
ONE_WORDS = frozenset({"one", "first", "single", "once"})
MULTIPLIERS = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}

MONTHS = {
    "january": 1, "jan": 1, "february": 2, "feb": 2, "march": 3, "mar": 3, "april": 4, "apr": 4,
    "may": 5, "june": 6, "jun": 6, "july": 7, "jul": 7, "august": 8, "aug": 8, "september": 9,
    "sept": 9, "sep": 9, "october": 10, "oct": 10, "november": 11, "nov": 11, "december": 12, "dec": 12,
}  # fmt: skip
# Abbreviated months that are also ordinary words count only next to a number ("mar 3", "may 5").
AMBIGUOUS_MONTHS = frozenset({"mar", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec", "jan"})
WEEKDAYS = {
    "monday": 1, "mon": 1, "tuesday": 2, "tue": 2, "tues": 2, "wednesday": 3, "wed": 3, "thursday": 4,
    "thu": 4, "thurs": 4, "friday": 5, "fri": 5, "saturday": 6, "sat": 6, "sunday": 7, "sun": 7,
}  # fmt: skip
AMBIGUOUS_WEEKDAYS = frozenset({"mon", "tue", "wed", "thu", "fri", "sat", "sun"})

# What an answer must look like: two requests that ask for different values in one category want
# different answers. Words of one value are synonyms ("brief" and "short").
_INSTRUCTION_LINES = """
format:table table tables tabular
format:list bulleted bullet bullets checklist
format:numbered numbered
format:paragraph paragraph paragraphs prose narrative essay
format:sentence sentence sentences
format:word word words
format:json json
format:yaml yaml yml
format:xml xml
format:csv csv
format:markdown markdown md
format:html html
format:plain plain unformatted
format:diagram diagram chart graph
format:poem poem verse
format:haiku haiku
format:sonnet sonnet
format:limerick limerick
format:tweet tweet
format:press press
format:outline outline
format:timeline timeline
format:faq faq
format:slide slide slides deck
length:short short shorter brief briefly concise concisely succinct succinctly terse tldr
length:long long longer detailed detail thorough thoroughly comprehensive comprehensively
length:long depth lengthy extensive exhaustive
length:only only
length:step walkthrough
tone:formal formal formally professional professionally polished
tone:casual casual casually informal informally conversational relaxed
tone:friendly friendly warmly empathetic empathetically gentle encouraging supportive
tone:blunt blunt bluntly harsh brutal
tone:playful playful funny humorous witty lighthearted
tone:serious serious sober
tone:persuasive persuasive salesy
tone:neutral neutral
audience:child child children kid kids toddler grader
audience:beginner beginner beginners novice newbie layman layperson simple simply plain
audience:expert expert experts advanced technical specialist scientific academic
audience:expert professor phd college university
audience:executive executive executives leadership
audience:new hires newcomers onboarding
language:english english
language:spanish spanish
language:french french
language:german german
language:italian italian
language:portuguese portuguese
language:dutch dutch
language:chinese chinese mandarin cantonese
language:japanese japanese
language:korean korean
language:russian russian
language:arabic arabic
language:hindi hindi
language:polish polish
language:swedish swedish
language:turkish turkish
language:vietnamese vietnamese
language:greek greek
language:hebrew hebrew
language:british british uk
language:american american
case:lower lowercase
case:upper uppercase caps
case:title titlecase
order:alphabetical alphabetical alphabetically
order:chronological chronological chronologically
order:rank ranked rank importance priority
order:size size
voice:passive passive
""".strip().splitlines()

INSTRUCTIONS: dict[str, str] = {}
for _line in _INSTRUCTION_LINES:
    _value, *_words = _line.split()
    for _word in _words:
        INSTRUCTIONS.setdefault(_word, _value)

# Function words and the words questions and requests are framed with: they are matched loosely,
# and a difference in them alone never makes two questions different.
STOPWORDS = (
    frozenset(
        """a an the this that these those it its it is there here of in on at to for from by with about as
    into
    onto over per via and or but so if then than too very also just really
    i me my mine we us our ours you your yours he him his she her they them their it
    am is are was were be been being do does did doing done have has had having
    can could would should shall will may might must
    what whats which who whom whose when where why how hows whats
    please pls plz kindly hi hello hey thanks thank
    some any each every own such
    tell give show let lets want need like know get got go
    something anything thing things way ways one ones out up
    yes ok okay here following given then now currently
    between among within through during above below under across along around behind beyond near
    toward towards upon against via
    many much possible able best good better ideal recommended right correct proper
    explain describe mean means meaning meant concept define definition idea
    step steps process procedure method code snippet
    """.split()
    )
    - NEGATORS
)

# Words typed as shorthand in chat, and spelling variants, mapped to the word they stand for.
SHORTHAND = {
    "u": "you", "ur": "your", "r": "are", "pls": "please", "plz": "please", "thx": "thanks",
    "tnx": "thanks", "ty": "thanks", "b4": "before", "bc": "because", "cuz": "because", "w": "with",
    "wo": "without", "msg": "message", "info": "information", "approx": "approximately",
    "asap": "soon", "js": "javascript", "ts": "typescript", "py": "python", "db": "database",
    "k8s": "kubernetes", "repo": "repository", "config": "configuration", "app": "application",
    "apps": "applications", "docs": "documentation", "doc": "document", "pic": "picture", "pics": "pictures",
    "min": "minute", "mins": "minutes", "sec": "second", "secs": "seconds", "hr": "hour", "hrs": "hours",
    "yr": "year", "yrs": "years", "qty": "quantity", "mgr": "manager", "acct": "account",
    "dept": "department",
    "govt": "government", "intl": "international", "convo": "conversation", "ppl": "people",
    "tmrw": "tomorrow", "tmr": "tomorrow", "2day": "today", "2morrow": "tomorrow", "nite": "night",
    "wanna": "want", "gonna": "going", "gotta": "must", "ya": "you", "yall": "you",
}  # fmt: skip

# Verbs and nouns that ask for the same thing ("write" or "draft" a note). Each line is one meaning;
# the first word is the canonical one.
_SYNONYM_LINES = """
write draft compose pen author
explain describe clarify elaborate
summarize summarise summary condense recap
list enumerate
change modify update alter edit adjust switch
remove delete erase
fix repair resolve correct
make create build produce generate construct
find locate look search lookup
start begin launch
stop halt
end finish complete conclude
show display
help assist support
use utilize utilise employ
buy purchase
reply respond response answer
ask request
need require
big large
small little tiny
quick fast rapid
improve boost enhance increase raise
reduce cut lower decrease
choose pick select
check verify confirm
allow permit
message note
customer client
employee staff worker
apartment unit
tenant resident renter
building property community
tall high
colleague coworker teammate
price cost
problem issue trouble
car vehicle automobile
film movie
doctor physician
talk speak
job position role
salary pay wage compensation
photo picture image
phone telephone
house home
store shop
often frequently
usually typically normally generally
approximately roughly
whole entire
main primary principal
important significant crucial essential
tip technique strategy
cancel abort
speed velocity
""".strip().splitlines()

SYNONYMS: dict[str, str] = {}
for _line in _SYNONYM_LINES:
    _canonical, *_others = _line.split()
    for _word in (_canonical, *_others):
        SYNONYMS.setdefault(_word, _canonical)

# Phrases that name an instruction only as a whole ("step by step", not "steps to create").
INSTRUCTION_PHRASES = {
    "step by step": "length:step",
    "line by line": "length:step",
    "show your work": "length:step",
    "show the work": "length:step",
    "title case": "case:title",
    "plain text": "format:plain",
    "press release": "format:press",
    "bullet points": "format:list",
    "comma separated": "format:csv",
    "in detail": "length:long",
    "in depth": "length:long",
    "like im five": "audience:child",
    "yes or no": "format:word",
    "one word": "format:word",
}
# An instruction word right after one of these is part of a question ("how long does shipping take").
INSTRUCTION_BLOCKERS = frozenset({"how", "too", "so", "as"})

# The verb an imperative request starts with says what kind of answer it wants. Each line is one kind.
_TASK_LINES = """
explain explain describe clarify elaborate define
write write draft compose create generate make produce prepare craft
summarize summarize summarise condense recap shorten
translate translate
list list enumerate
suggest suggest recommend propose
rewrite rewrite rephrase reword paraphrase edit polish
fix fix debug repair correct troubleshoot proofread
calculate calculate compute solve estimate find
convert convert transform
compare compare contrast
review review critique evaluate assess analyze analyse grade
add add insert
test test
format format
sort sort order rank
delete delete remove drop
""".strip().splitlines()

TASK_VERBS: dict[str, str] = {}
for _line in _TASK_LINES:
    _kind, *_verbs = _line.split()
    for _verb in _verbs:
        TASK_VERBS.setdefault(_verb, _kind)
# Words a request may open with before its verb ("please write", "can you explain").
REQUEST_OPENERS = frozenset(
    {"please", "pls", "plz", "kindly", "can", "could", "would", "will", "you", "now", "then"}
)

# Irregular verb forms → the base form, so "who wrote" meets "who is the author" through "write".
IRREGULAR_VERBS = {
    "wrote": "write", "written": "write", "made": "make", "took": "take", "taken": "take", "gave": "give",
    "given": "give", "went": "go", "gone": "go", "did": "do", "done": "do", "saw": "see", "seen": "see",
    "knew": "know", "known": "know", "thought": "think", "brought": "bring", "bought": "buy", "sold": "sell",
    "sent": "send", "spent": "spend", "built": "build", "began": "begin", "begun": "begin", "ran": "run",
    "found": "find", "got": "get", "gotten": "get", "told": "tell", "said": "say", "paid": "pay",
    "left": "leave", "kept": "keep", "held": "hold", "met": "meet", "led": "lead", "lost": "lose",
    "won": "win", "chose": "choose", "chosen": "choose", "drove": "drive", "driven": "drive", "grew": "grow",
    "grown": "grow", "fell": "fall", "fallen": "fall", "broke": "break", "broken": "break", "froze": "freeze",
    "frozen": "freeze", "rose": "rise", "risen": "rise", "became": "become", "came": "come", "stole": "steal",
    "stolen": "steal", "forgot": "forget", "forgotten": "forget", "understood": "understand",
    "taught": "teach",
    "caught": "catch", "fought": "fight", "felt": "feel", "meant": "mean", "read": "read", "shut": "shut",
}  # fmt: skip

# Nouns that name the kind of a thing already named ("the capital city", "CRM software"): added on one
# side only, they do not change the question.
GENERIC_NOUNS = frozenset(
    """city town country state nation place area region company business organization organisation firm
    software tool tools app application program programme platform system service product products
    thing things item items stuff person people individual number value amount figure term word phrase
    process procedure method approach type kind sort version edition file document data information
    """.split()
)

# Operators of arithmetic, comparison, logic and code. Two questions that differ only in one of them
# ("7 + 3" / "7 - 3", "age > 30" / "age < 30", "a ?? b" / "a ?. b") embed as near-duplicates and share
# every word, so the guards compare them as symbols. Operators that prose never uses are read wherever
# they stand next to something.
CODE_OPERATORS = frozenset(
    """=== !== <=> **= //= >>= <<= == != <= >= <> && || ?? ?. // ** << >> := += -= *= /= %= &= |= ^= ::
    """.split()
)
# Symbols that prose uses too ("and/or", "R&D", "Settings > Privacy", "- item", "two-factor", "10% of")
# are operators only between two operands, one of them a number, a single letter or a literal.
PROSE_OPERATORS = frozenset("+ - * / % < > = ^ & | -> => <-".split())
# The same operator written another way.
OPERATOR_ALIASES = {
    "<>": "!=", "\u2260": "!=", "\u2264": "<=", "\u2265": ">=", "\u00d7": "*", "\u00f7": "/",
    "\u2212": "-", "\u2044": "/", "\u2215": "/", "\u2227": "&&", "\u2228": "||", "\u00ac": "!",
    "\u2192": "->", "\u21d2": "=>",
}  # fmt: skip
# Boolean connectives: "True and False" / "True or False". Prose adds "and" freely ("ARR and MRR" / "ARR
# vs MRR"), so the words count only next to a boolean literal or a single-letter variable, or when one
# connective replaces another.
CONNECTIVES = {"and": "and", "or": "or", "xor": "xor", "nand": "nand", "nor": "nor", "&&": "and", "||": "or"}
BOOLEAN_LITERALS = frozenset({"true", "false", "null", "none", "nil", "nan", "undefined"})
