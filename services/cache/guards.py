"""False-hit guards: may a cached question's answer be served for a new question?

Embedding similarity says two questions are about the same thing; it cannot tell "allow cookies" from
"block cookies" or "top 5" from "top 50" (both score like paraphrases). So a semantic candidate must
also pass rules that compare what the two questions literally ask for:

- numbers, dates and quantities (a number bound to its unit), units, identifiers ("4B", "Q3"),
  quoted strings (in their case, unless a side is typed all in one case) and named entities (capitalised
  words, acronyms) must agree; an exponent is not a digit ("2³" is not "23");
- operators must agree: arithmetic, comparison and code symbols ("7 + 3"/"7 - 3", "??"/"?.") and boolean
  connectives between literals or variables ("True and False"/"True or False"), or one connective
  replacing another;
- polarity must agree: the count of negators, negating prefixes (legal/illegal) and antonym pairs;
- instructions on the answer's shape must agree: format, length, tone, audience, language, order;
- a near-identical pair that differs by swapping a content word or two is a different question
  ("mean"/"median", "reads"/"writes") unless the words are typos, shorthand or synonyms of each other.

All of it is plain string work over general lexicons (`lexicon.py`): microseconds per pair, no model.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from libs.sentence_embeddings import normalise_text
from services.cache import lexicon


class Veto(enum.Enum):
    NEGATION = "negation"
    ANTONYM = "antonym"
    NUMBER = "number"
    DATE = "date"
    UNIT = "unit"
    IDENTIFIER = "identifier"
    QUOTED = "quoted"
    ENTITY = "entity"
    INSTRUCTION = "instruction"
    TASK = "task"
    DIRECTION = "direction"
    SUBSTITUTION = "substitution"
    # Policy vetoes, decided before or after the comparison (see semantic.py).
    AMBIGUOUS = "ambiguous"
    TRUNCATED = "truncated"
    REFUSAL = "refusal"


_TOKEN = re.compile(r"(?P<num>\d+(?:[.,]\d+)*)(?![^\W_])|(?P<word>[^\W_]+)|(?P<sym>[$€£¥%°])")
_DEGREE_SIGN = re.compile(r"\s*°\s*([cf])\b")
_ORDINAL = re.compile(r"^(\d+)(?:st|nd|rd|th)$")
# "401(k)" and "401k" are the same identifier.
_BRACKETED_LETTER = re.compile(r"(?<=\w)\((\w)\)")
_QUOTED = re.compile(r"(?<!\w)'([^'\n]{2,}?)'(?!\w)|\"([^\"\n]{2,}?)\"|\u201c([^\u201d\n]{2,}?)\u201d")
_CAPITALISED = re.compile(r"(?<![\w'])([A-Z][\w]*(?:[.'][\w]+)*)")
_SENTENCE_START = re.compile(r"(?:^|[.!?:\n]\s*|\(\s*)$")
_ROMAN = re.compile(r"^(?:i{2,3}|iv|vi{0,3}|ix|xi{0,3})$")
_ROMAN_VALUES = {"ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6, "vii": 7, "viii": 8, "ix": 9, "x": 10}
_ROMAN_VALUES |= {"xi": 11, "xii": 12, "xiii": 13}

MIN_TYPO_CHARS = 4
LONG_WORD_CHARS = 8
# A pair is "near-identical" when at least this share of the longer question's content words match.
NEAR_IDENTICAL_SHARE = 0.5
# ...and a substitution of at most this many content words on each side is a different question.
MAX_SUBSTITUTED_WORDS = 2


def stem(word: str) -> str:
    """A light English stemmer: plural, -ing, -ed, and British -ise spellings. Good enough to match
    "reports"/"report", "renewing"/"renew", "summarise"/"summarize"; it never merges unrelated words
    often enough to matter, because a stem only ever has to match another stem of the same sentence."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for british, american in (("isation", "ization"), ("ise", "ize"), ("ised", "ized"), ("ising", "izing")):
        if word.endswith(british) and len(word) > len(british) + 2:
            word = word[: -len(british)] + american
            break
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)]
            if len(base) > 3 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]  # running → run
            return base
    if word.endswith("e") and len(word) > 4:
        return word[:-1]  # "write"/"writing" → "writ"
    return word


def typo_distance(first: str, second: str, limit: int) -> int:
    """Optimal-string-alignment distance (edits, adjacent swaps), or limit + 1 once it exceeds limit."""
    if abs(len(first) - len(second)) > limit:
        return limit + 1
    previous2: list[int] = []
    previous = list(range(len(second) + 1))
    for i, char in enumerate(first, 1):
        current = [i] + [0] * len(second)
        for j, other in enumerate(second, 1):
            cost = 0 if char == other else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and char == second[j - 2] and first[i - 2] == other:
                current[j] = min(current[j], previous2[j - 2] + 1)
        if min(current) > limit:
            return limit + 1
        previous2, previous = previous, current
    return previous[-1]


def typo_limit(word: str) -> int:
    """Edits a mistyped word of this length may carry: one in a short word, two in a long one."""
    return 0 if len(word) < MIN_TYPO_CHARS else 1 if len(word) < LONG_WORD_CHARS else 2


_DERIVATIONAL = ("ational", "ations", "ation", "ition", "ement", "ment", "ences", "ence", "ance", "ent",
                 "ant",
                 "ness", "ity", "ical", "ally", "al", "ive", "ly", "ers", "er", "or", "ee")  # fmt: skip


def root(word: str) -> str:
    """The stem less a derivational suffix: "differ", "difference" and "different" share a root, and
    "wrote" is "write"."""
    word = lexicon.IRREGULAR_VERBS.get(word, word)
    plain = word[:-1] if word.endswith("s") and not word.endswith(("ss", "us", "is")) else word
    for suffix in _DERIVATIONAL:
        if plain.endswith(suffix) and len(plain) - len(suffix) >= 4:
            return plain[: -len(suffix)]
    return stem(word)


MAX_ROOT_EXTENSION = 3


def _same_root(first: str, second: str) -> bool:
    """Roots cut at different suffixes ("diff" of "differ", "differ" of "difference")."""
    shorter, longer = sorted((first, second), key=len)
    return (
        len(shorter) >= 4 and longer.startswith(shorter) and len(longer) - len(shorter) <= MAX_ROOT_EXTENSION
    )


def _is_subsequence(short: str, long: str) -> bool:
    letters = iter(long)
    return all(char in letters for char in short)


@dataclass
class QuestionProfile:
    """What a question literally asks for, extracted once per question."""

    text: str  # normalised
    words: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    numbers: Counter = field(default_factory=Counter)
    dates: Counter = field(default_factory=Counter)
    units: set[str] = field(default_factory=set)
    quantities: set[tuple[float, str]] = field(default_factory=set)
    identifiers: set[str] = field(default_factory=set)
    quoted: set[str] = field(default_factory=set)
    entities: set[str] = field(default_factory=set)
    instructions: set[str] = field(default_factory=set)
    tasks: set[str] = field(default_factory=set)
    # (preposition, the content word after it): "convert a string to an integer" → ("to", "integer").
    directions: set[tuple[str, str]] = field(default_factory=set)
    negations: int = 0
    operators: Counter = field(default_factory=Counter)
    # Connectives between boolean literals or variables (compared like numbers), and every connective
    # (compared only for one replacing another).
    logic: Counter = field(default_factory=Counter)
    connectives: Counter = field(default_factory=Counter)
    # Quoted strings as typed, when their case carries meaning (see `_cased_quotes`).
    cased_quoted: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Comparison:
    """The verdict on a pair: `veto` is the first reason they want different answers (None: none found)."""

    veto: Veto | None


_DIRECTION_WORDS = frozenset({"to", "into", "from", "than", "vs", "versus"})


class QuestionGuards:
    """Profiles questions and compares two profiles. `known_words`: whole words of a vocabulary (the
    embedding model's), used to tell a typo ("voicemial") from a different real word ("Austria")."""

    def __init__(self, known_words: frozenset[str]) -> None:
        self._known = known_words

    def profile(self, raw: str) -> QuestionProfile:
        # NFKC (in normalise_text) reads "2³" as "23" and "x²" as "x2": spell exponents out first.
        raw = _spell_out_superscripts(raw)
        text = normalise_text(raw)
        profile = QuestionProfile(text)
        # "°f" and "°c" are the temperature units' names, not a sign and a letter.
        text = _DEGREE_SIGN.sub(lambda match: " fahrenheit" if match.group(1) == "f" else " celsius", text)
        tokens = [
            (match.lastgroup or "", match.group())
            for match in _TOKEN.finditer(_BRACKETED_LETTER.sub(r"\1", text))
        ]
        tokens = [(kind, self._as_lexicon_word(token) if kind == "word" else token) for kind, token in tokens]
        _read_quantities(tokens, profile)
        previous = ""
        for kind, token in tokens:
            if kind != "word":
                previous = token
                continue
            profile.words.append(token)
            if token in lexicon.NEGATORS:
                profile.negations += 1
            instruction = lexicon.INSTRUCTIONS.get(token) or lexicon.INSTRUCTIONS.get(stem(token))
            if instruction and previous not in lexicon.INSTRUCTION_BLOCKERS:
                profile.instructions.add(instruction)
            if any(char.isdigit() for char in token) and any(char.isalpha() for char in token):
                if not _ORDINAL.match(token):
                    profile.identifiers.add(token)
            elif not (token in lexicon.STOPWORDS or token.isdigit() or token in _QUANTITY_WORDS):
                # Numbers and units are compared by their own guards, not as content words.
                profile.content.append(token)
            previous = token
        padded = f" {' '.join(profile.words)} "
        profile.instructions |= {
            value for phrase, value in lexicon.INSTRUCTION_PHRASES.items() if f" {phrase} " in padded
        }
        profile.tasks = _tasks(text)
        profile.directions = _directions(profile.words)
        profile.quoted = {normalise_text(next(filter(None, m.groups()))) for m in _QUOTED.finditer(raw)}
        profile.entities = _entities(raw)
        profile.cased_quoted = _cased_quotes(raw)
        profile.operators, profile.logic, profile.connectives = _operators(raw)
        return profile

    def compare(self, cached: QuestionProfile, asked: QuestionProfile) -> Comparison:
        """Whether the two questions want different answers, and why."""
        veto = _literal_veto(cached, asked)
        if veto is not None:
            return Comparison(veto)
        only_cached, only_asked = self._unmatched(cached, asked), self._unmatched(asked, cached)
        if self._opposed(_only_words(cached, asked), _only_words(asked, cached)):
            return Comparison(Veto.ANTONYM)
        # A name on one side where the other has a name or a word of its own ("in Gmail" / "in sales").
        if (self._entity_swapped(cached, asked) and (only_asked or self._entity_swapped(asked, cached))) or (
            self._entity_swapped(asked, cached) and only_cached
        ):
            return Comparison(Veto.ENTITY)
        if _reversed(cached.directions, asked.directions):
            return Comparison(Veto.DIRECTION)
        if not (only_cached or only_asked):
            return Comparison(None)
        if self._near_identical(cached, asked, only_cached, only_asked):
            # A name added on one side only narrows the question ("Excel" → "Microsoft Excel").
            added = only_cached or only_asked
            if (only_cached and only_asked) or not self._names_only(added, cached, asked):
                return Comparison(Veto.SUBSTITUTION)
        return Comparison(None)

    def _as_lexicon_word(self, word: str) -> str:
        """Shorthand ("u", "pls") and a mistyped unit, month or negator ("kilgorams", "tablspoon") read
        as the word meant."""
        if word in lexicon.SHORTHAND:
            return lexicon.SHORTHAND[word]
        if word in self._known or word in _LEXICON_WORDS or len(word) < MIN_TYPO_CHARS or not word.isalpha():
            return word
        # The closest lexicon word within its typo limit; ties go to the alphabetically first, so the
        # reading never depends on set order (string hashing differs between processes).
        distances = (
            (typo_distance(word, candidate, typo_limit(candidate)), candidate)
            for candidate in _TYPO_TARGETS.get(word[0], ())
        )
        near = [
            (distance, candidate) for distance, candidate in distances if distance <= typo_limit(candidate)
        ]
        return min(near)[1] if near else word

    # --- content words ----------------------------------------------------------------------------

    def _canonical(self, word: str) -> str:
        for form in (word, *sorted(_lemmas(word))):
            if form in lexicon.SYNONYMS:
                return lexicon.SYNONYMS[form]
        return lexicon.INSTRUCTIONS.get(word) or root(word)

    def _unmatched(self, profile: QuestionProfile, other: QuestionProfile) -> list[str]:
        """Content words of `profile` with no counterpart in `other`: the same stem or root, a synonym, a
        typo or shorthand of one of its words, or the same word split or joined ("wifi"/"wi fi")."""
        other_canonical = {self._canonical(word) for word in other.words}
        other_words = set(other.words)
        joined = {first + second for first, second in zip(other.words, other.words[1:], strict=False)}
        following = dict(zip(profile.words, profile.words[1:], strict=False))
        preceding = dict(zip(profile.words[1:], profile.words, strict=False))
        unmatched = []
        for word in profile.content:
            canonical = self._canonical(word)
            if canonical in other_canonical or word in joined:
                continue
            if any(_same_root(canonical, other) for other in other_canonical):
                continue
            if word + following.get(word, "") in other_words or preceding.get(word, "") + word in other_words:
                continue
            if any(self._same_word_typed(word, candidate) for candidate in other.content):
                continue
            unmatched.append(word)
        return unmatched

    def _same_word_typed(self, first: str, second: str) -> bool:
        if first[0] != second[0] or min(len(first), len(second)) < 2:
            return False
        both_known = first in self._known and second in self._known
        limit = min(typo_limit(first), typo_limit(second))
        if limit and not both_known and typo_distance(first, second, limit) <= limit:
            return True
        shorter, longer = sorted((first, second), key=len)
        # Shorthand: "hrs" for "hours", "mgmt" for "management" (the short form is no word of its own).
        return shorter not in self._known and len(shorter) >= 2 and _is_subsequence(shorter, longer)

    def _opposed(self, only_first: list[str], only_second: list[str]) -> bool:
        for first in only_first:
            for second in only_second:
                if any(
                    frozenset((one, other)) in lexicon.ANTONYMS
                    for one in _lemmas(first)
                    for other in _lemmas(second)
                ):
                    return True
                if _negated_by_prefix(first, second) or _negated_by_prefix(second, first):
                    return True
        return False

    def _entity_swapped(self, profile: QuestionProfile, other: QuestionProfile) -> bool:
        """An entity of `profile` that `other` does not name (in any case, typo or acronym)."""
        other_words = set(other.words)
        for entity in profile.entities:
            parts = normalise_text(entity).split()
            # "France's" is normalised to "frances".
            if all(part in other_words or part + "s" in other_words for part in parts):
                continue
            if any(self._same_word_typed(part, word) for part in parts for word in other_words):
                continue
            if _acronym_of(entity, other.words):
                continue
            return True
        return False

    def _names_only(self, words: list[str], *profiles: QuestionProfile) -> bool:
        """Whether the added words only name or classify what both ask about ("Microsoft", "city")."""
        names = {part for profile in profiles for e in profile.entities for part in normalise_text(e).split()}
        return all(word in names or stem(word) in _GENERIC_STEMS for word in words)

    def _near_identical(
        self, first: QuestionProfile, second: QuestionProfile, only_first: list[str], only_second: list[str]
    ) -> bool:
        longer = max(len(first.content), len(second.content))
        matched = longer - max(len(only_first), len(only_second))
        return (
            len(only_first) <= MAX_SUBSTITUTED_WORDS
            and len(only_second) <= MAX_SUBSTITUTED_WORDS
            and matched >= NEAR_IDENTICAL_SHARE * longer
        )


def _literal_veto(cached: QuestionProfile, asked: QuestionProfile) -> Veto | None:
    """The checks that compare extracted facts one to one."""
    if cached.negations != asked.negations:
        return Veto.NEGATION
    if cached.numbers != asked.numbers:
        return Veto.NUMBER
    if cached.dates != asked.dates:
        return Veto.DATE
    if cached.units != asked.units or cached.quantities != asked.quantities:
        return Veto.UNIT
    if cached.identifiers != asked.identifiers:
        return Veto.IDENTIFIER
    if not (_quotes_kept(cached, asked) and _quotes_kept(asked, cached)):
        return Veto.QUOTED
    if cached.cased_quoted and asked.cased_quoted and not _same_cased_quotes(cached, asked):
        return Veto.QUOTED
    # The protocol has no reason of its own for operators: a swapped symbol is a substitution.
    if cached.operators != asked.operators or cached.logic != asked.logic:
        return Veto.SUBSTITUTION
    if _connective_replaced(cached.connectives, asked.connectives):
        return Veto.SUBSTITUTION
    if cached.instructions != asked.instructions:
        return Veto.INSTRUCTION
    if cached.tasks and asked.tasks and not cached.tasks & asked.tasks:
        return Veto.TASK
    return None


def _lemmas(word: str) -> set[str]:
    """The word, its stem, and its base when it is a comparative or superlative ("cheapest" → "cheap")."""
    forms = {word, stem(word)}
    for suffix, base in (("iest", "y"), ("ier", "y"), ("est", ""), ("er", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            forms.add(word[: -len(suffix)] + base)
    return forms


def _only_words(profile: QuestionProfile, other: QuestionProfile) -> list[str]:
    """Every word (function words included: "on"/"off") of `profile` whose stem `other` lacks."""
    other_stems = {stem(word) for word in other.words}
    return [word for word in profile.words if stem(word) not in other_stems]


def _tasks(text: str) -> set[str]:
    """The kinds of answer the text's imperative sentences ask for ("Summarize this…" → summarize)."""
    tasks = set()
    for sentence in re.split(r"[\n.?!:;]+", text):
        words = [word for word in re.findall(r"[^\W_]+", sentence)]
        while words and words[0] in lexicon.REQUEST_OPENERS:
            words.pop(0)
        if words and words[0] in lexicon.TASK_VERBS:
            tasks.add(lexicon.TASK_VERBS[words[0]])
    return tasks


def _directions(words: list[str]) -> set[tuple[str, str]]:
    """(the content word before, the content word after) each "to", "into", "from", "than", "vs"."""

    def content(candidates: list[str]) -> str:
        return next(
            (stem(w) for w in candidates if w not in lexicon.STOPWORDS and w not in _DIRECTION_WORDS), ""
        )

    directions = set()
    for index, word in enumerate(words):
        if word in _DIRECTION_WORDS:
            before, after = content(words[index - 1 :: -1] if index else []), content(words[index + 1 :])
            if before and after and before != after:
                directions.add((before, after))
    return directions


def _reversed(first: set[tuple[str, str]], second: set[tuple[str, str]]) -> bool:
    """Whether one asks "X to Y" where the other asks "Y to X"."""
    return any((after, before) in second and (before, after) not in second for before, after in first)


_GENERIC_STEMS = frozenset(stem(word) for word in lexicon.GENERIC_NOUNS)
_LEXICON_NAMES = frozenset({*lexicon.MONTHS, *lexicon.WEEKDAYS, *lexicon.UNITS, *lexicon.INSTRUCTIONS})
_DEGREE_WORDS = frozenset({"degree", "degrees", "deg"})
_QUANTITY_WORDS = frozenset({*lexicon.NUMBER_WORDS, *lexicon.UNITS, *lexicon.UNIT_MODIFIERS, *_DEGREE_WORDS})


def _read_quantities(tokens: list[tuple[str, str]], profile: QuestionProfile) -> None:
    """Numbers (digits, number words, ordinals, roman numerals after a word), dates, units, and the unit
    each number is bound to (the unit right after it, or a currency sign right before it)."""
    bound: float | None = None  # a number still waiting for its unit
    modifier = ""
    skip_next = False
    for index, (kind, token) in enumerate(tokens):
        if skip_next:
            skip_next = False
            continue
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        value = _number(kind, token, tokens, index)
        if value is not None:
            if token in lexicon.MULTIPLIERS and bound is not None:
                _replace_last(profile.numbers, bound, bound * value)
                bound *= value
                continue
            if value != 1:
                profile.numbers[value] += 1
            if index > 0 and tokens[index - 1][1] in "$€£¥" and tokens[index - 1][0] == "sym":
                profile.quantities.add((value, lexicon.UNITS[tokens[index - 1][1]]))
            # The quantity one is said with an article as often as with a number ("a pound").
            bound, modifier = (None if value == 1 else value), ""
            continue
        if token in lexicon.UNIT_MODIFIERS or token in _DEGREE_WORDS:
            modifier = lexicon.UNIT_MODIFIERS.get(token, modifier)
            continue
        if (
            kind == "word"
            and token in lexicon.MONTHS
            and (token not in lexicon.AMBIGUOUS_MONTHS or _next_to_number(tokens, index))
        ):
            profile.dates[("month", lexicon.MONTHS[token])] += 1
        elif kind == "word" and token in lexicon.WEEKDAYS and token not in lexicon.AMBIGUOUS_WEEKDAYS:
            profile.dates[("weekday", lexicon.WEEKDAYS[token])] += 1
        unit = None
        if kind == "sym" and token == "°" and following in ("c", "f"):
            unit, skip_next = ("celsius" if following == "c" else "fahrenheit"), True
        elif kind in ("sym", "word"):
            unit = _unit(token, bound is not None)
        if unit is not None:
            unit = f"{modifier} {unit}".strip()
            profile.units.add(unit)
            if bound is not None and token not in "$€£¥":
                profile.quantities.add((bound, unit))
        bound, modifier = None, ""


def _number(kind: str, token: str, tokens: list[tuple[str, str]], index: int) -> float | None:
    if kind == "num":
        return (
            float(token.replace(",", ""))
            if re.fullmatch(r"\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?", token)
            else None
        )
    if kind != "word":
        return None
    if ordinal := _ORDINAL.match(token):
        return float(ordinal.group(1))
    if token in lexicon.NUMBER_WORDS:
        return float(lexicon.NUMBER_WORDS[token])
    if token.endswith("s") and token[:-1] in lexicon.NUMBER_WORDS:
        return float(lexicon.NUMBER_WORDS[token[:-1]])
    if token in lexicon.MULTIPLIERS:
        return float(lexicon.MULTIPLIERS[token])
    if token in lexicon.ONE_WORDS:
        return 1.0
    if _ROMAN.match(token) and index > 0 and tokens[index - 1][0] == "word":
        return float(_ROMAN_VALUES[token])
    return None


def _unit(token: str, after_number: bool) -> str | None:
    if after_number and token in lexicon.NUMBER_BOUND_UNITS:
        return lexicon.NUMBER_BOUND_UNITS[token]
    if token in lexicon.AMBIGUOUS_UNIT_WORDS and not after_number:
        return None
    return lexicon.UNITS.get(token)


def _next_to_number(tokens: list[tuple[str, str]], index: int) -> bool:
    neighbours = tokens[max(0, index - 1) : index] + tokens[index + 1 : index + 2]
    return any(kind == "num" or _ORDINAL.match(token) for kind, token in neighbours)


def _replace_last(counter: Counter, old: float, new: float) -> None:
    if counter[old] > 0:
        counter[old] -= 1
        if counter[old] == 0:
            del counter[old]
    counter[new] += 1


def _negated_by_prefix(word: str, other: str) -> bool:
    """ "illegal" is "legal" negated, "uninstall" is "install" undone."""
    return any(
        other == prefix + word or other == prefix + " " + word
        for prefix in lexicon.NEGATING_PREFIXES
        if len(word) >= 3
    )


def _quotes_kept(profile: QuestionProfile, other: QuestionProfile) -> bool:
    """Every quoted string of `profile` appears in `other` (quoted or not)."""
    return all(quoted in other.text for quoted in profile.quoted)


_LEXICON_WORDS = frozenset(
    {*lexicon.UNITS, *lexicon.MONTHS, *lexicon.NEGATORS, *lexicon.INSTRUCTIONS, *lexicon.NUMBER_WORDS}
)
_TYPO_TARGETS: dict[str, tuple[str, ...]] = {}
for _word in sorted(_LEXICON_WORDS):
    if _word.isalpha() and len(_word) >= MIN_TYPO_CHARS:
        _TYPO_TARGETS[_word[0]] = (*_TYPO_TARGETS.get(_word[0], ()), _word)


def _entities(raw: str) -> set[str]:
    """Capitalised words not at a sentence start, acronyms and CamelCase words. Text typed mostly in
    capitals says nothing about names, so it has none."""
    letters = [char for char in raw if char.isalpha()]
    if not letters or sum(char.isupper() for char in letters) > len(letters) / 2:
        return set()
    entities = set()
    for match in _CAPITALISED.finditer(raw):
        word = match.group(1)
        at_start = bool(_SENTENCE_START.search(raw[: match.start()]))
        inner_capitals = any(char.isupper() for char in word[1:])
        word = re.sub(r"'s$", "", word)
        # Months, units and languages are names the date, unit and instruction guards compare.
        if len(word) < 2 or (at_start and not inner_capitals) or word.lower() in _LEXICON_NAMES:
            continue
        entities.add(word)
    return entities


def _acronym_of(entity: str, words: list[str]) -> bool:
    """ "AWS" for "Amazon Web Services", "JavaScript" for "js"."""
    short = entity.lower()
    if 2 <= len(short) <= 6 and short.isalpha():
        for start in range(len(words) - len(short) + 1):
            if "".join(word[0] for word in words[start : start + len(short)]) == short:
                return True
    capitals = "".join(char for char in entity if char.isupper()).lower()
    return len(capitals) >= 2 and capitals != short and capitals in words


# --- exponents, cased quotes and operators ----------------------------------------------------------------

_UNIT_POWERS = {"2": "square", "3": "cubic"}


def _spell_out_superscripts(raw: str) -> str:
    """Superscripts as "^" and the exponent ("2³" → "2^3"), or as "square"/"cubic" after a unit ("ft²" →
    "square ft"). Subscripts are left to NFKC: "H₂O" is "H2O"."""
    if raw.isascii():
        return raw

    def spelled(match: re.Match) -> str:
        unit, exponent = match.group(1), unicodedata.normalize("NFKC", match.group(2))
        if exponent in _UNIT_POWERS and (
            unit.lower() in lexicon.UNITS or unit.lower() in lexicon.NUMBER_BOUND_UNITS
        ):
            return f" {_UNIT_POWERS[exponent]} {unit}"
        return f"{unit}^{exponent}"

    return _SUPERSCRIPT_RUN.sub(spelled, raw)


# Superscript digits, signs, brackets and "ⁿ" (not the ordinal indicators "º", "ª": "1º" is "first").
_SUPERSCRIPTS = "".join(
    char
    for char in "\u00b9\u00b2\u00b3" + "".join(map(chr, range(0x2070, 0x2080)))
    if unicodedata.decomposition(char).startswith("<super>")
)
_SUPERSCRIPT_RUN = re.compile(f"([^\\W\\d_]*)([{re.escape(_SUPERSCRIPTS)}]+)")


def _cased_quotes(raw: str) -> set[str]:
    """Quoted strings as typed: "Reverse 'Hello'" and "Reverse 'hello'" want different answers. A question
    typed all in one case ("REVERSE 'HELLO'", "reverse 'hello'") says nothing by its case: none."""
    letters = [char for char in raw if char.isalpha()]
    if all(char.islower() for char in letters) or all(char.isupper() for char in letters):
        return set()
    return {unicodedata.normalize("NFC", next(filter(None, m.groups()))) for m in _QUOTED.finditer(raw)}


def _same_cased_quotes(cached: QuestionProfile, asked: QuestionProfile) -> bool:
    """Quoted strings that both sides quote (in any case) are quoted in the same case."""
    for first, second in ((cached, asked), (asked, cached)):
        for quoted in first.cased_quoted:
            folded = [other for other in second.cased_quoted if other.casefold() == quoted.casefold()]
            if folded and quoted not in folded:
                return False
    return True


_URL = re.compile(r"\b[a-z][\w+.-]*://\S+", re.IGNORECASE)
_SYMBOL_RUN = re.compile(r"[-+*/%<>=!&|^~?.:]+")
# Longest first, so a run of symbols is read greedily ("!==" before "!=" before "!").
_KNOWN_OPERATORS = sorted({*lexicon.CODE_OPERATORS, *lexicon.PROSE_OPERATORS, "!"}, key=len, reverse=True)
# Runs of sentence punctuation are operators only standing alone or between operands ("?? operator",
# "a?.b"), never after a word ("really??", "sphere ???").
_PUNCTUATION_OPERATORS = frozenset(op for op in lexicon.CODE_OPERATORS if set(op) <= set("?.:!"))
_OPERAND_END = re.compile(r"(?:\w+|[)\]}'\"`])$")
_OPERAND_START = re.compile(r"^(?:\w+|[(\[{'\"`])")
_CONNECTIVE_WORD = re.compile(r"[^\W_]+|&&|\|\|")


def _operators(raw: str) -> tuple[Counter, Counter, Counter]:
    """(operators, connectives in logic, every connective) of the question as typed."""
    text = unicodedata.normalize("NFKC", "".join(lexicon.OPERATOR_ALIASES.get(char, char) for char in raw))
    text = _URL.sub(" ", text)
    operators: Counter = Counter()
    for run in _SYMBOL_RUN.finditer(text):
        start = run.start()
        for piece in _split_run(run.group()):
            end = start + len(piece)
            if _is_operator(text, start, end, piece, run):
                operators[lexicon.OPERATOR_ALIASES.get(piece, piece)] += 1
            start = end
    logic: Counter = Counter()
    connectives: Counter = Counter()
    words = _CONNECTIVE_WORD.findall(text)
    between = False
    for index, word in enumerate(words):
        connective = lexicon.CONNECTIVES.get(word.lower())
        if word.lower() == "between":
            between = True
        if connective is None:
            continue
        if between and connective == "and":
            between = False  # "between X and Y" asks "X or Y?" as often as "X and Y"
            continue
        connectives[connective] += 1
        neighbours = words[max(0, index - 1) : index] + words[index + 1 : index + 2]
        if any(_is_logic_operand(neighbour) for neighbour in neighbours):
            logic[connective] += 1
    return operators, logic, connectives


def _split_run(run: str) -> list[str]:
    """A run of symbols as operators, greedily; a lone "?", "." or ":" is punctuation, kept as itself."""
    pieces = []
    while run:
        piece = next((op for op in _KNOWN_OPERATORS if run.startswith(op)), run[0])
        pieces.append(piece)
        run = run[len(piece) :]
    return pieces


# How far around an operator its operands are looked for: a long question is read in linear time.
_OPERAND_WINDOW = 64


def _is_operator(text: str, start: int, end: int, piece: str, run: re.Match) -> bool:
    before, after = text[max(0, start - _OPERAND_WINDOW) : start], text[end : end + _OPERAND_WINDOW]
    left = _OPERAND_END.search(before)  # an operand right before it, no space between
    right = _OPERAND_START.search(after)
    spaced_left = bool(before) and before[-1].isspace()
    spaced_right = bool(after) and after[0].isspace()
    left_word = _OPERAND_END.search(before.rstrip())
    right_word = _OPERAND_START.search(after.lstrip())
    if piece in _PUNCTUATION_OPERATORS:
        # Alone between words ("the ?? operator") or inside an expression ("a?.b"), not closing a sentence.
        alone = (not before or spaced_left or before[-1] in "(`'\"") and right_word is not None
        return alone or (left is not None and right is not None)
    if piece in lexicon.CODE_OPERATORS:
        return left_word is not None or right_word is not None
    if piece == "!":
        # "!x", "!(a && b)": a prefix; "hi!" ends a sentence.
        return right is not None and (not before or spaced_left or before[-1] in "(")
    if piece not in lexicon.PROSE_OPERATORS:
        return False
    if piece == "-" and right is not None and right.group()[0].isdigit() and left is None:
        # A negative number ("-5", "x = -5"), not a bullet ("- 5 items").
        return not before or spaced_left or before[-1] in "(=,[" or run.start() < start
    if left_word is None or right_word is None or spaced_left != spaced_right:
        return False
    first, second = left_word.group(), right_word.group()
    if not (spaced_left or spaced_right):
        # Written without spaces it joins words ("two-factor", "and/or", "R&D") or numbers into a range,
        # a fraction or a date ("5-10", "3/8", "2024-01-05"); it is an operator next to a variable ("a-b").
        if piece in "-/" and first.isdigit() and second.isdigit():
            return False  # "3/8" is three eighths, "5-10" five to ten: the number guard reads them
        return _is_math_operand(first) and _is_math_operand(second)
    if any(len(word) > 1 and word.lower() in lexicon.STOPWORDS for word in (first, second)):
        return False  # "10 % of users", "page 3 - what is"
    return _is_math_operand(first) or _is_math_operand(second)


def _is_math_operand(word: str) -> bool:
    """A number, a single letter, a bracket or a literal: what stands next to an operator in a formula."""
    return (
        word.replace(".", "").isdigit()
        or len(word) == 1
        or word.lower() in lexicon.BOOLEAN_LITERALS
        or ("_" in word)
        or (any(char.isdigit() for char in word) and any(char.isalpha() for char in word))
    )


def _is_logic_operand(word: str) -> bool:
    # "a" and "i" are words far more often than variables, and a capital ("R", "C") names a language.
    return word.lower() in lexicon.BOOLEAN_LITERALS or (
        len(word) == 1 and word.islower() and word not in "ai"
    )


def _connective_replaced(first: Counter, second: Counter) -> bool:
    """One connective in place of another ("A and B" / "A or B"); one added alone ("ARR and MRR" /
    "ARR vs MRR") is how paraphrases differ."""
    return bool(first - second) and bool(second - first)
