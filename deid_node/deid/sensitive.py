"""Which burned-in text identifies a patient: the classifier behind REDACT_SENSITIVE_TEXT.

Default-deny for words: a text is kept only when every token is a number, a number with a
clinical unit, or a word of the clinical overlay vocabulary (L/R, depth, gain, MHz, cm, dB ...)
in data/clinical_terms.csv. Anything else that reads like a word is treated as a possible name.
Dates, times, long numbers, ID-like tokens, addresses, identifier labels and the original's own
identifiers (in any order, case or spelling within one OCR error) are identifying. Returned reasons are categories, never
the text itself, so they can be logged.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from importlib import resources


def _load_terms(name: str) -> frozenset[str]:
    """One column of upper-case words, `term`, from deid_node/deid/data/`name`."""
    text = resources.files("deid_node.deid").joinpath("data", name).read_text(encoding="utf-8")
    return frozenset(row["term"].strip().upper() for row in csv.DictReader(text.splitlines()))


# OCR confuses these; both sides are folded onto one character before comparing identifiers.
_CONFUSABLES = str.maketrans({"0": "O", "Q": "O", "1": "I", "L": "I", "5": "S", "8": "B", "2": "Z",
                              "6": "G", "|": "I", "!": "I"})  # fmt: skip

_MONTHS = "JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|SEPT|OCT|NOV|DEC"
_DATE_PATTERNS = [
    re.compile(r"(?<!\d)\d{1,4}\s?[-/.]\s?\d{1,2}\s?[-/.]\s?\d{2,4}"),
    re.compile(r"(?<!\d)(19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?!\d)"),
    re.compile(r"(?<!\d)(0[1-9]|[12]\d|3[01])(0[1-9]|1[0-2])(19|20)\d{2}(?!\d)"),
    re.compile(rf"\b\d{{1,2}}\s*[-/.]?\s*({_MONTHS})[A-Z]*\b"),
    re.compile(rf"\b({_MONTHS})[A-Z]*\.?\s*[-/]?\s*\d{{1,4}}\b"),
    re.compile(r"(?<![\d.])(19|20)\d{2}(?![\d.])"),
]
_TIME = re.compile(r"(?<!\d)\d{1,2}\s?[:h]\s?\d{2}(\s?:\s?\d{2})?(\s?[AP]\.?M\.?)?(?!\d)")
_LONG_NUMBER = re.compile(r"\d{5,}")
_ADDRESS = re.compile(
    r"\b\d+[A-Z]?\s+([A-Z]+\s+){1,3}(ST|STREET|RD|ROAD|AVE|AVENUE|LANE|LN|DR|DRIVE|BLVD|WAY|CT|"
    r"COURT|PL|PLACE|SQ|SQUARE|TERRACE|CRESCENT|CLOSE|HWY|HIGHWAY)\b"
)
_UNIT_NUMBER = re.compile(
    r"[-+]?\d+([.,]\d+)?(MHZ|KHZ|HZ|CM|MM|M|DB|FPS|BPM|MS|S|X|DEG|KV|KVP|MA|MAS|MGY|CM/S|M/S|%)?"
)
_LABELS = {
    "NAME", "PATIENT", "PAT", "PT", "DOB", "BIRTH", "BORN", "MRN", "ID", "PID", "ACC", "ACCESSION",
    "SSN", "NHS", "PHYSICIAN", "DOCTOR", "DR", "REF", "REFERRING", "OPERATOR", "SONOGRAPHER",
    "INSTITUTION", "HOSPITAL", "CLINIC", "CENTER", "CENTRE", "MEDICAL", "ADDRESS", "PHONE", "TEL",
    "STUDY", "EXAM", "DATE", "TIME",
}  # fmt: skip
_CLINICAL = _load_terms("clinical_terms.csv")
_RUNS = re.compile(r"[A-Z]+|\d+(?:[.,]\d+)?%?")
_TOKEN = re.compile(r"[A-Z0-9%./:+\-]+")


class SensitiveTextClassifier:
    """Decides for one OCR'd text whether it identifies the patient; built once per instance."""

    def __init__(self, identifiers: Sequence[str] = ()) -> None:
        tokens: set[str] = set()
        wholes: set[str] = set()
        for value in identifiers:
            if not value:
                continue
            upper = str(value).upper()
            whole = _fold(upper)
            if len(whole) >= 4:
                wholes.add(whole)
            for part in re.split(r"[\^\s,.\-/]+", upper):
                folded = _fold(part)
                if len(folded) >= 3:
                    tokens.add(folded)
        self._tokens = tokens
        self._wholes = wholes

    def reason(self, text: str | None) -> str | None:
        """The category that makes `text` identifying ("identifier", "date", ...), or None."""
        if not text or not text.strip():
            return None
        upper = text.upper()
        if self._matches_identifier(upper):
            return "identifier"
        if any(p.search(upper) for p in _DATE_PATTERNS):
            return "date"
        if _TIME.search(upper):
            return "time"
        if _ADDRESS.search(upper):
            return "address"
        if _LONG_NUMBER.search(upper.replace(" ", "")):
            return "id"
        return self._word_reason(upper)

    def _matches_identifier(self, upper: str) -> bool:
        folded = _fold(upper)
        if any(whole in folded for whole in self._wholes):
            return True
        if any(token in folded for token in self._tokens):
            return True
        words = [_fold(w) for w in re.split(r"[^A-Z0-9]+", upper) if len(w) >= 5]
        return any(
            abs(len(word) - len(token)) <= 1 and _within_one_edit(word, token)
            for word in words
            for token in self._tokens
            if len(token) >= 5
        )

    def _word_reason(self, upper: str) -> str | None:
        for token in _TOKEN.findall(upper):
            for part in re.split(r"[/:\-+]+", token):
                part = part.strip(".")
                if not part or part in _CLINICAL or _UNIT_NUMBER.fullmatch(part):
                    continue
                if part in _LABELS:
                    return "label"
                runs = _RUNS.findall(part)
                if len(runs) > 1 and all(r in _CLINICAL or _UNIT_NUMBER.fullmatch(r) for r in runs):
                    continue  # words and numbers run together by OCR: "DEPTH16CM"
                letters = sum(c.isalpha() for c in part)
                digits = sum(c.isdigit() for c in part)
                if letters and digits and len(part) >= 5:
                    return "id"
                if letters >= 2 and not digits:
                    return "word"  # short letter+digit tokens (C5, L12, 80Y) are probes and ages
        return None


def _fold(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper()).translate(_CONFUSABLES)


def _within_one_edit(a: str, b: str) -> bool:
    if a == b:
        return True
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) <= 1
    if len(a) > len(b):
        a, b = b, a
    return any(a == b[:i] + b[i + 1 :] for i in range(len(b)))
