"""The rule strings of `plait prep filter --caption-rule / --image-rule / --basic-filter`: parsed once (a bad rule is a
one-line error naming it), then applied per sample, each failure a reject reason naming the rule and the value.

Caption rules (the caption the loader would read, `--caption-keys`):
  min-words=N, max-words=N   whitespace-separated words
  min-chars=N, max-chars=N   characters
  exclude=REGEX              case-insensitive search
  lang=CODE[,CODE...]        the caption's most likely language (py3langid, ISO 639 codes such as en, de, zh; its
                             model ships inside the wheel, nothing is downloaded) must be one of them
  lang-min-prob=P            with lang: ... and its probability at least P (0..1; default 0)
Image rules (the size in the shard's records, never decoded: the downloaded image's original_width/height, or the
stored width/height where a record has no original size):
  min-side=N, max-side=N     the shorter / longer side in pixels
  min-pixels=N               width x height
  max-aspect=R               longer side / shorter side
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

CAPTION_RULES = ("min-words", "max-words", "min-chars", "max-chars", "exclude", "lang", "lang-min-prob")
IMAGE_RULES = ("min-side", "max-side", "min-pixels", "max-aspect")


@dataclass(frozen=True)
class BasicFilter:
    caption_rules: tuple[str, ...]
    image_rules: tuple[str, ...]
    source: str
    """where the thresholds come from"""


BASIC_FILTERS = {
    # DataComp's "basic filtering" baseline: English captions (fastText language ID there, py3langid here), more than
    # two words and more than five characters, images whose shorter side is at least 200 px and whose aspect
    # ratio is at most 3 (of the original image, as DataComp's metadata records it). The counts go first: they
    # are cheaper, and the language of a caption that short is not a sure call, so its count is the better reason
    "datacomp": BasicFilter(("min-words=3", "min-chars=6", "lang=en"), ("min-side=200", "max-aspect=3"),
                            "Gadre et al., DataComp: In search of the next generation of multimodal datasets "
                            "(NeurIPS 2023, arXiv:2304.14108), the basic filtering baseline"),
}


@dataclass(frozen=True)
class CaptionRules:
    checks: tuple[tuple[str, str, Any], ...] = ()
    """(rule as given, name, parsed value), in the order given: the first that fails is the reason"""
    lang_min_prob: float = 0.0

    def verdict(self, caption: str | None) -> str | None:
        """The reason `caption` fails a rule, or None."""
        if not self.checks:
            return None
        if caption is None:
            return "caption rule (no caption)"
        words, chars = len(caption.split()), len(caption)
        for rule, name, value in self.checks:
            if name == "lang":
                reason = self._language_verdict(caption, value)
                if reason:
                    return reason
                continue
            if name == "exclude":
                if value.search(caption) is not None:
                    return f"caption rule exclude ({rule}: matched)"
                continue
            count, unit = (words, "words") if name.endswith("words") else (chars, "characters")
            if (count < value) if name.startswith("min") else (count > value):
                return f"caption rule {name} ({rule}: {count} {unit})"
        return None

    def _language_verdict(self, caption: str, languages: tuple[str, ...]) -> str | None:
        lang, prob = language_of(caption)
        if lang not in languages:
            return f"caption language {lang!r} (p={prob:.2f}), not {','.join(languages)}"
        if prob < self.lang_min_prob:
            return f"caption language {lang!r} (p={prob:.2f} < lang-min-prob={self.lang_min_prob:g})"
        return None


@functools.lru_cache(maxsize=1)
def _identifier():
    # loaded once per process (~1 s): the model is numpy arrays in an xz file inside the py3langid wheel
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_of(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability) of the most likely of the 140 languages py3langid knows."""
    lang, prob = _identifier().classify(text)
    return lang, float(prob)


def known_languages() -> tuple[str, ...]:
    return tuple(sorted(set(_identifier().nb_classes)))


def _whole(flag: str, rule: str, value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"{flag} {rule!r}: expected a whole number after '='")
    return int(value)


def _fraction(flag: str, rule: str, value: str, lo: float, hi: float | None) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number >= lo and (hi is None or number <= hi)) or number == float("inf"):
        span = f"a number in [{lo:g}, {hi:g}]" if hi is not None else f"a finite number >= {lo:g}"
        raise ValueError(f"{flag} {rule!r}: expected {span} after '='")
    return number


def _split(flag: str, rule: str, names: tuple[str, ...]) -> tuple[str, str]:
    name, eq, value = rule.partition("=")
    if not eq or name not in names:
        raise ValueError(f"{flag} {rule!r}: expected one of {', '.join(n + '=...' for n in names)}")
    return name, value


def parse_caption_rules(rules: tuple[str, ...] | list[str]) -> CaptionRules:
    flag = "--caption-rule"
    checks: list[tuple[str, str, Any]] = []
    min_prob = None
    for rule in rules:
        name, value = _split(flag, rule, CAPTION_RULES)
        if name == "exclude":
            try:
                checks.append((rule, name, re.compile(value, re.IGNORECASE)))
            except re.error as e:
                raise ValueError(f"{flag} {rule!r}: bad regular expression ({e})") from None
        elif name == "lang":
            codes = tuple(c.strip().lower() for c in value.split(","))
            if "" in codes:
                raise ValueError(f"{flag} {rule!r}: expected language codes after '=' (lang=en or lang=en,de)")
            unknown = [c for c in codes if c not in known_languages()]
            if unknown:
                raise ValueError(f"{flag} {rule!r}: {unknown[0]!r} is not a language code of the language-ID model "
                                 f"(ISO 639 codes: {', '.join(known_languages())})")
            checks.append((rule, name, codes))
        elif name == "lang-min-prob":
            min_prob = _fraction(flag, rule, value, 0.0, 1.0)
        else:
            checks.append((rule, name, _whole(flag, rule, value)))
    if sum(name == "lang" for _, name, _ in checks) > 1:
        raise ValueError(f"{flag}: give one lang=CODE[,CODE...] rule (list several languages in it)")
    if min_prob is not None and not any(name == "lang" for _, name, _ in checks):
        raise ValueError(f"{flag} 'lang-min-prob={min_prob:g}': needs a lang=CODE rule")
    return CaptionRules(tuple(checks), min_prob or 0.0)


def caption_verdict(caption: str | None, rules: CaptionRules) -> str | None:
    return rules.verdict(caption)


def parse_image_rules(rules: tuple[str, ...] | list[str]) -> list[tuple[str, str, float]]:
    flag = "--image-rule"
    parsed = []
    for rule in rules:
        name, value = _split(flag, rule, IMAGE_RULES)
        number = _fraction(flag, rule, value, 1.0, None) if name == "max-aspect" else _whole(flag, rule, value)
        parsed.append((rule, name, number))
    return parsed


def image_verdict(width: int | None, height: int | None, rules: list[tuple[str, str, float]]) -> str | None:
    """The reason an image of `width` x `height` fails a rule, or None; a record without a size fails."""
    if not rules:
        return None
    if not width or not height:
        return "image rule (no image size in the record)"
    short, long = min(width, height), max(width, height)
    for rule, name, value in rules:
        if name == "max-aspect":
            if long / short > value:
                return f"image rule max-aspect ({rule}: {width}x{height}, aspect {long / short:.2f})"
            continue
        measured = {"min-side": short, "max-side": long, "min-pixels": width * height}[name]
        if (measured < value) if name.startswith("min") else (measured > value):
            return f"image rule {name} ({rule}: {width}x{height})"
    return None


def image_size(record: dict[str, Any]) -> tuple[int | None, int | None]:
    """The size the image rules judge: the original download's, else the stored image's."""
    if record.get("original_width") and record.get("original_height"):
        return record["original_width"], record["original_height"]
    return record.get("width"), record.get("height")
