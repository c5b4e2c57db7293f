"""Text checks and normalisation for synthesized speech data.

``normalize_for_speech`` rewrites written forms a TTS engine reads badly (numbers, currency,
symbols, abbreviations) into words. The checks return a reason string when a text should be
dropped, or None when it passes; the pipeline counts the reasons.
"""
from __future__ import annotations

import re
import unicodedata

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                  "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}


def _under_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else ""))
    elif n or not words:
        words.append(_ONES[n])
    return words


def number_to_words(n: int) -> str:
    """English words for an integer, e.g. 1204 -> 'one thousand two hundred four'."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"number_to_words expects an int, got {type(n).__name__}")
    if n < 0:
        return "minus " + number_to_words(-n)
    if n >= 10**15:
        # Beyond trillions nobody says the number: read it digit by digit.
        return " ".join(_ONES[int(d)] for d in str(n))
    words: list[str] = []
    for scale, name in _SCALES:
        if n >= scale:
            words += _under_thousand(n // scale) + [name]
            n %= scale
    if n or not words:
        words += _under_thousand(n)
    return " ".join(words)


def ordinal_to_words(n: int) -> str:
    """'first', 'twenty-second', 'one hundredth' for 1, 22, 100."""
    words = number_to_words(n)
    head, sep, last = words.rpartition(" ")
    stem_sep = "-" if "-" in last else ""
    prefix, _, unit = last.rpartition("-") if stem_sep else ("", "", last)
    if unit in _ORDINAL_WORDS:
        unit = _ORDINAL_WORDS[unit]
    elif unit.endswith("y"):
        unit = unit[:-1] + "ieth"
    else:
        unit += "th"
    last = prefix + stem_sep + unit
    return head + sep + last


def _year_to_words(n: int) -> str:
    if 2000 <= n <= 2009:
        return number_to_words(n)
    high, low = divmod(n, 100)
    if low == 0:
        return number_to_words(high) + " hundred"
    low_words = number_to_words(low) if low >= 10 else "oh " + number_to_words(low)
    return number_to_words(high) + " " + low_words


def _decimal_to_words(text: str) -> str:
    whole, _, frac = text.partition(".")
    return number_to_words(int(whole)) + " point " + " ".join(_ONES[int(d)] for d in frac)


_CURRENCIES = {"$": ("dollar", "dollars"), "£": ("pound", "pounds"), "€": ("euro", "euros")}
_ABBREVIATIONS = (
    (r"\be\.g\.", "for example"), (r"\bi\.e\.", "that is"), (r"\betc\.", "et cetera"),
    (r"\bvs\.?(?=\s)", "versus"), (r"\bDr\.(?=\s)", "Doctor"), (r"\bMr\.(?=\s)", "Mister"),
    (r"\bMrs\.(?=\s)", "Missus"), (r"\bMs\.(?=\s)", "Miz"), (r"\bSt\.(?=\s)", "Saint"),
    (r"\bapprox\.", "approximately"),
)
_SYMBOLS = {"&": " and ", "%": " percent", "+": " plus ", "=": " equals ", "@": " at ",
            "°": " degrees", "#": " number ", "×": " times ", "/": " slash ", "~": " about "}
_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"


def _spell_number(match: re.Match[str]) -> str:
    text = match.group(0).replace(",", "")
    if "." in text:
        return _decimal_to_words(text)
    value = int(text)
    plain = match.group(0).isdigit()
    if plain and len(text) == 4 and 1100 <= value <= 2099:
        return _year_to_words(value)
    return number_to_words(value)


def _spell_currency(match: re.Match[str]) -> str:
    singular, plural = _CURRENCIES[match.group(1)]
    amount = match.group(2).replace(",", "")
    scale = f" {match.group(3)}" if match.group(3) else ""
    whole, _, cents = amount.partition(".")
    words = number_to_words(int(whole))
    unit = singular if int(whole) == 1 and not scale else plural
    if cents and not scale and int(cents):
        return f"{words} {unit} and {number_to_words(int(cents.ljust(2, '0')[:2]))} cents"
    if cents and scale:
        words = _decimal_to_words(amount)
    return f"{words}{scale} {unit}"


def normalize_for_speech(text: str) -> str:
    """``text`` as a TTS engine should read it: numbers, ordinals, years, currency, percent and
    common symbols and abbreviations spelled out in English words; brackets and quotes dropped;
    whitespace collapsed. Letters and sentence punctuation are kept."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_for_speech expects a str, got {type(text).__name__}")
    out = unicodedata.normalize("NFKC", text)
    out = out.replace("\u2019", "'").replace("\u2018", "'").replace("\u2014", ", ")
    out = out.replace("\u2013", "-")
    for pattern, words in _ABBREVIATIONS:
        out = re.sub(pattern, words, out, flags=re.IGNORECASE)
    out = re.sub(r"([$£€])\s?(" + _NUMBER + r")(?:\s?(thousand|million|billion|trillion))?",
                 _spell_currency, out)
    out = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: ordinal_to_words(int(m.group(1))), out)
    out = re.sub(r"(?<![\w.])(" + _NUMBER + r")\s?-\s?(" + _NUMBER + r")(?![\w.])",
                 r"\1 to \2", out)
    out = re.sub(r"(?<![\w.])-(?=\d)", "minus ", out)
    out = re.sub(_NUMBER, _spell_number, out)
    for symbol, words in _SYMBOLS.items():
        out = out.replace(symbol, words)
    out = re.sub(r"[\"“”«»()\[\]{}*_<>|\\^`]", " ", out)
    out = re.sub(r"\s+([,.;:!?])", r"\1", out)
    return re.sub(r"\s+", " ", out).strip()


def words_of(text: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes inside words kept)."""
    return re.findall(r"[\w']+", text.lower().replace("-", " "))


_URL = re.compile(r"https?://|www\.|\b[\w-]+\.(com|org|net|io|edu|gov)\b|\S+@\S+\.\w+",
                  re.IGNORECASE)
_MARKUP = re.compile(r"```|`|\*\*|__|</?\w+[^>]*>|^\s*#|^\s*[-*•]\s|^\s*\d+\.\s|\|.*\|",
                     re.MULTILINE)
# '=' marks code or an equation, which TTS reads as a string of symbols.
_CODE_CHARS = re.compile(r"[{}\[\]<>\\^~;=]|->|\w\(\)|\w\.\w+\(")
_UNSPEAKABLE_SYMBOL = re.compile(r"[^\w\s.,;:!?'\"“”‘’()\-–—&%$£€+=@°#/×~]")


def unspeakable_reason(text: str) -> str | None:
    """Why ``text`` cannot be read aloud as one utterance (a URL, markup, code, a table, a
    multi-line layout, emoji or other symbols), or None when it can."""
    if "\n" in text.strip():
        return "multi-line text"
    if _URL.search(text):
        return "a URL or e-mail address"
    if _MARKUP.search(text):
        return "markup (markdown, HTML or a table)"
    if _CODE_CHARS.search(text):
        return "code-like symbols"
    bad = _UNSPEAKABLE_SYMBOL.search(text)
    if bad:
        return f"an unspeakable character {bad.group(0)!r}"
    if any(unicodedata.category(ch) == "Lo" for ch in text):
        return "letters outside the TTS voice's script"
    return None


_REPEATED_UNIT = re.compile(r"(.{2,40}?)\1{3,}", re.DOTALL)


def repetition_reason(text: str, *, min_distinct_trigrams: float = 0.5) -> str | None:
    """Why ``text`` looks like a generation loop, or None.

    Three signs: a short unit repeated four or more times back to back ("bombombombomb"), a
    word four times in a row, or (for 12 words or more) fewer than ``min_distinct_trigrams``
    of its word trigrams distinct (a sentence that keeps coming back)."""
    if _REPEATED_UNIT.search(text.lower()):
        return "a repeated character sequence"
    words = words_of(text)
    run = 1
    for previous, word in zip(words, words[1:]):
        run = run + 1 if word == previous else 1
        if run >= 4:
            return f"the word {word!r} four times in a row"
    if len(words) >= 12:
        trigrams = list(zip(words, words[1:], words[2:]))
        if len(set(trigrams)) / len(trigrams) < min_distinct_trigrams:
            return "repeated phrases"
    return None


def sentence_count(text: str) -> int:
    """Sentences in ``text``: pieces ended by '.', '!' or '?' plus any unended tail."""
    pieces = re.split(r"[.!?]+(?:\s+|$)", text.strip())
    return max(1, sum(1 for piece in pieces if piece.strip()))
