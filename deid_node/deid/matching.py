"""Text matching for identifying values: folding, token boundaries, and the forms in which
names, IDs, telephone numbers and dates get written.

Values are folded (case, accents, and letters NFKD keeps: ø, ł, æ, ß, þ) and compared by kind:
name parts, addresses and institution or station names on token boundaries (`MARY` is not in
`PRIMARY`), names in scripts written without spaces (山田太郎様) as substrings; IDs as
substrings (digits not inside a longer number, written with spaces, dots, hyphens or slashes,
with or without leading zeros); telephone numbers also by their last 7 digits; dates in the
formats people write them (19800102, 1980-01-02, 02.01.1980, 01/02/1980, 2 Jan 1980,
1980-Jan-02, 1980年1月2日 ...), the birth date also with a 2-digit year. Values shorter than 3
characters (initials) are never looked for.

A leaf: it imports nothing of ours, so that `deid.identifiers` (what to look for),
`deid.residual` (where) and their callers share one matcher.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

# Kinds of identifying value, as reported.
NAME = "name part"
ID = "ID"
DATE = "date"
BIRTH_DATE = "birth date"  # also matched with a 2-digit year (07.11.43)
ADDRESS = "address"
PHONE = "telephone"
INSTITUTION = "institution"
DEVICE = "device"
OTHER = "other"

_MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]


# Letters that NFKD does not decompose into a base letter and an accent.
_LETTERS = str.maketrans(
    {
        "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE",
        "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ß": "ss", "ħ": "h",
        "Ħ": "H", "ı": "i", "ŧ": "t", "Ŧ": "T", "ŋ": "ng", "Ŋ": "NG", "ĸ": "k",
    }
)  # fmt: skip


def fold(text: str) -> str:
    """Case and accents folded: 'Müller' and 'MULLER', 'Bjørn' and 'BJORN' compare equal."""
    if text.isascii():
        return text.lower()  # the same result, without a pass over every character
    decomposed = unicodedata.normalize("NFKD", text.translate(_LETTERS))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


_TOKEN = re.compile(r"[^\W\d_]+|\d+")


def tokenize(folded: str) -> list[str]:
    """The words and numbers of a folded text, separators dropped."""
    return _TOKEN.findall(folded)


def _long_enough(tokens: Sequence[str]) -> bool:
    # Initials and 2-letter fragments are everywhere; ideographic names are short but specific.
    joined = "".join(tokens)
    return len(joined) >= 3 or (len(joined) >= 2 and not joined.isascii())


class Matcher:
    """Finds the identifying values in a text, each by the rule of its kind."""

    def __init__(self, values: Iterable[str]) -> None:
        self._tokens: dict[str, str] = {}  # tokens run together -> kind
        self._substrings: dict[str, str] = {}  # scripts written without spaces (CJK names)
        self._compact: dict[str, str] = {}  # alphanumeric IDs
        self._digits: list[tuple[re.Pattern[str], str, bool]] = []  # (pattern, kind, short)
        self._dates: list[re.Pattern[str]] = []
        for value in values:
            kind = getattr(value, "kind", OTHER)
            self._add(str(value), kind)

    def _add(self, value: str, kind: str) -> None:
        folded = fold(value)
        if kind in (DATE, BIRTH_DATE):
            digits = re.sub(r"\D", "", folded)
            if len(digits) >= 8 and digits[:8] not in ("19000101",):
                pattern = _date_pattern(digits[:8], two_digit_year=kind == BIRTH_DATE)
                if pattern is not None:
                    self._dates.append(pattern)
            return
        tokens = tokenize(folded)
        if not tokens or not _long_enough(tokens):
            return
        compact = "".join(tokens)
        if len(set(compact)) == 1:
            return  # a placeholder ("000000000", "XXX"), not a person's value
        if kind == PHONE:
            digits = re.sub(r"\D", "", folded)
            if len(digits) >= 7:
                self._add_number(digits, kind)
                if len(digits) > 7:
                    # national and international forms share the subscriber number
                    tail = "[ ./()-]*".join(digits[-7:])
                    suffix = re.compile(rf"{tail}(?!\d)(?![.,]\d)")
                    self._digits.append((suffix, kind, True))
                return
        if compact.isdigit() or (kind in (ID, PHONE) and any(c.isdigit() for c in compact)):
            if compact.isdigit():
                self._add_number(compact, kind)
            elif len(compact) < 6:
                self._tokens[compact] = kind  # short codes only as whole tokens (MR1)
            else:
                self._compact[compact] = kind
            return
        if not compact.isascii():
            self._substrings[compact] = kind
            return
        self._tokens[compact] = kind

    def _add_number(self, digits: str, kind: str) -> None:
        """A number also as people write it: 123 456 78, 123-456-78, 123.456.789-09, and
        without its leading zeros (00123456 as 123456)."""
        significant = digits.lstrip("0") or digits
        short = len(significant) < 5
        body = digits if short else "(?:0[ -]?)*" + "[ ./-]?".join(significant)
        guarded = rf"(?<![\d])(?<!\d[.,]){body}(?![\d])(?![.,]\d)"
        self._digits.append((re.compile(guarded), kind, short))

    def __bool__(self) -> bool:
        return bool(
            self._tokens or self._substrings or self._compact or self._digits or self._dates
        )

    def find(self, text: str, coded: bool = False) -> str | None:
        """The kind of the first identifying value in `text`, or None. `coded`: the text is a
        number, age, date, time or code, where a short number is no evidence."""
        folded = fold(text)
        if self._tokens:
            kind = _find_on_token_boundaries(folded, self._tokens)
            if kind:
                return kind
        if self._substrings:
            joined = "".join(tokenize(folded))
            for needle, kind in self._substrings.items():
                if needle in joined:
                    return kind
        if self._compact:
            compact = "\n".join("".join(tokenize(part)) for part in folded.split("\\"))
            for needle, kind in self._compact.items():
                if needle in compact:
                    return kind
        for pattern, kind, short in self._digits:
            if short and coded:
                continue  # a 4-digit ID is any window width or slice count
            for match in pattern.finditer(folded):
                if coded and match[0].count(".") == 1:
                    continue  # a decimal number, not an ID written with dots
                return kind
        for pattern in self._dates:
            if pattern.search(folded):
                return DATE
        return None


def _find_on_token_boundaries(folded: str, needles: dict[str, str]) -> str | None:
    """A needle that starts where a token starts and ends where a token ends, the separators
    between tokens ignored: 'zyx wortha' and 'ZYXWORTHA' hold 'Zyxwortha', 'PRIMARY' no 'MARY'."""
    starts, ends = set(), set()
    pieces = []
    position = 0
    for token in _TOKEN.findall(folded):
        starts.add(position)
        pieces.append(token)
        position += len(token)
        ends.add(position)
    haystack = "".join(pieces)
    for needle, kind in needles.items():
        at = haystack.find(needle)
        while at >= 0:
            if at in starts and at + len(needle) in ends:
                return kind
            at = haystack.find(needle, at + 1)
    return None


def _date_pattern(yyyymmdd: str, two_digit_year: bool = False) -> re.Pattern[str] | None:
    """The date in the ways it gets written: ISO and DICOM, day first, month first, month names,
    CJK (1943年11月7日); with `two_digit_year` (a birth date) also 07.11.43, 11/7/43, 7 Nov 43."""
    y, m, d = yyyymmdd[:4], yyyymmdd[4:6], yyyymmdd[6:8]
    if not (1 <= int(m) <= 12 and 1 <= int(d) <= 31):
        return None
    mm, dd = rf"0?{int(m)}", rf"0?{int(d)}"
    month = _MONTHS[int(m) - 1]
    names = rf"(?:{month[:3]}[a-z]*\.?)"
    sep = r"[-/. ]"
    alternatives = [
        rf"{y}{m}{d}",
        rf"{y}(?P<s1>{sep}){mm}(?P=s1){dd}",
        rf"{d}{m}{y}",
        rf"{m}{d}{y}",
        rf"{dd}(?P<s2>{sep}){mm}(?P=s2){y}",
        rf"{mm}(?P<s3>{sep}){dd}(?P=s3){y}",
        rf"{dd}[-/. ]?{names}[-/., ]*{y}",
        rf"{names}[-/. ]?{dd}(?:st|nd|rd|th)?[,.]?[-/ ]*{y}",
        rf"{y}[-/., ]*{names}[-/. ]?{dd}",
        rf"{y}\s*[年년]\s*{mm}\s*[月월]\s*{dd}",
    ]
    if two_digit_year:
        yy = y[2:]
        alternatives += [
            rf"{dd}(?P<s4>[-/.]){mm}(?P=s4){yy}",
            rf"{mm}(?P<s5>[-/.]){dd}(?P=s5){yy}",
            rf"{dd}[-/. ]?{names}[-/., ]*'?{yy}",
            rf"{names}[-/. ]?{dd}(?:st|nd|rd|th)?[,.]?[-/ ]*'?{yy}",
        ]
    return re.compile(rf"(?<!\d)(?<!\d[.,])(?:{'|'.join(alternatives)})(?!\d)(?![.,]\d)")
